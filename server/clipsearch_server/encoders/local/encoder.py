"""The in-process encoder: the towers, their batcher and the decode pool in this process."""

from __future__ import annotations

from ...observability import Metrics
from ...settings import AnySettings
from ..base import Embedded, ModelInfo, TowerTuning
from .backend import Towers, load_towers
from .device_decode import device_decoder
from .embedder import Embedder


def start_embedder(towers: Towers, settings: AnySettings, metrics: Metrics | None) -> Embedder:
    """The decode pool, query cache and batcher in front of loaded towers, as configured."""
    decoder = device_decoder(towers.transform, towers.device, settings.max_image_pixels,
                             settings.device_decode)
    embedder = Embedder(towers, settings.max_batch_size, settings.max_image_pixels,
                        settings.decode_threads, settings.max_queued_batches, metrics,
                        batch_wait_s=settings.batch_wait_ms / 1000,
                        text_cache_size=settings.text_cache_size,
                        jpeg_draft=settings.jpeg_draft, device_decoder=decoder,
                        max_decoded_bytes=settings.max_decoded_bytes)
    embedder.batcher.max_call_s = settings.max_model_call_ms / 1000
    return embedder


class LocalEncoder:
    """Encoder whose towers run in this process (the default, `--encoder local`)."""

    def __init__(self, towers: Towers, info: ModelInfo, embedder: Embedder) -> None:
        self.towers = towers
        self.embedder = embedder
        self.info = info

    @classmethod
    def start(cls, settings: AnySettings, metrics: Metrics | None = None) -> LocalEncoder:
        """Load the towers and start their embedder (blocking; raises ModelLoadError)."""
        towers, info = load_towers(settings)
        return cls(towers, info, start_embedder(towers, settings, metrics))

    async def embed_texts(self, texts: list[str], deadline: float | None = None,
                          bulk: bool = False) -> Embedded:
        return await self.embedder.embed_texts(texts, deadline, bulk)

    async def embed_images(self, images: list[bytes], deadline: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        return await self.embedder.embed_images(images, deadline, bulk, thumbnail_size)

    def describe(self) -> str:
        decoding = ("the model's device (nvjpeg)" if self.embedder.device_decoder
                    else "the CPU")
        return (f"in-process on {self.info.device} ({self.info.backend}); JPEG decoding on "
                f"{decoding}")

    def tuning(self) -> list[TowerTuning]:
        return self.embedder.batcher.tuning()

    def close(self) -> None:
        self.embedder.close()
