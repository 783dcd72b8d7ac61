"""The in-process encoder: the model, its batcher and the decode pool in this process."""

from __future__ import annotations

from ...observability import Metrics
from ...settings import AnySettings
from ..base import Embedded, ModelInfo, TowerTuning
from .device_decode import device_decoder
from .embedder import Embedder
from .model import ClipModel, load_model


def model_info(model: ClipModel) -> ModelInfo:
    """What a loaded model tells the service about itself."""
    return ModelInfo(
        name=model.name, pretrained=model.pretrained,
        checkpoint=str(model.checkpoint) if model.checkpoint else None,
        random_weights=model.random_weights, device=str(model.device),
        precision=model.precision, precision_reason=model.precision_reason, dim=model.dim,
        image_size=model.image_size, fingerprint=model.fingerprint,
        logit_scale=float(model.module.logit_scale.detach().exp().item()),
        load_seconds=model.load_seconds)


def start_embedder(model: ClipModel, settings: AnySettings, metrics: Metrics | None) -> Embedder:
    """The decode pool, query cache and batcher in front of a loaded model, as configured."""
    decoder = device_decoder(model.transform, model.device, settings.max_image_pixels,
                             settings.device_decode)
    embedder = Embedder(model, settings.max_batch_size, settings.max_image_pixels,
                        settings.decode_threads, settings.max_queued_batches, metrics,
                        batch_wait_s=settings.batch_wait_ms / 1000,
                        text_cache_size=settings.text_cache_size,
                        jpeg_draft=settings.jpeg_draft, device_decoder=decoder,
                        max_decoded_bytes=settings.max_decoded_bytes)
    embedder.batcher.max_call_s = settings.max_model_call_ms / 1000
    return embedder


class LocalEncoder:
    """Encoder whose model runs in this process (the default, `--encoder local`)."""

    def __init__(self, model: ClipModel, embedder: Embedder) -> None:
        self.model = model
        self.embedder = embedder
        self.info = model_info(model)

    @classmethod
    def start(cls, settings: AnySettings, metrics: Metrics | None = None) -> LocalEncoder:
        """Load the model and start its embedder (blocking; raises ModelLoadError)."""
        model = load_model(settings)
        return cls(model, start_embedder(model, settings, metrics))

    async def embed_texts(self, texts: list[str], deadline: float | None = None,
                          bulk: bool = False) -> Embedded:
        return await self.embedder.embed_texts(texts, deadline, bulk)

    async def embed_images(self, images: list[bytes], deadline: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        return await self.embedder.embed_images(images, deadline, bulk, thumbnail_size)

    def describe(self) -> str:
        decoding = ("the model's device (nvjpeg)" if self.embedder.device_decoder
                    else "the CPU")
        return f"in-process on {self.info.device}; JPEG decoding on {decoding}"

    def tuning(self) -> list[TowerTuning]:
        return self.embedder.batcher.tuning()

    def close(self) -> None:
        self.embedder.close()
