"""What the service needs of an encoder, whichever process runs the model.

The seam imports nothing from an implementation and nothing that imports torch: a front
with `--encoder ray` loads this module, never encoders/local/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import ClipSearchError

__all__ = ["Embedded", "Encoder", "ModelInfo", "TowerTuning"]


@dataclass
class Embedded:
    """A batch's vectors (failed rows are zero) and the errors of the rows that failed.

    `thumbnails`: for images embedded with a thumbnail size, one WebP per row (None where the
    row failed or its thumbnail could not be made); None when none were asked for.
    """

    vectors: np.ndarray
    errors: dict[int, ClipSearchError]
    thumbnails: list[bytes | None] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """The model behind an encoder: what GetServerInfo reports and what collections check."""

    name: str
    pretrained: str | None
    checkpoint: str | None
    random_weights: bool
    device: str
    precision: str
    precision_reason: str
    dim: int
    image_size: int
    fingerprint: str
    logit_scale: float  # the model's own zero-shot temperature (exp of its learned log)
    load_seconds: float = 0.0
    backend: str = "torch"  # or onnxruntime
    backend_reason: str = ""


@dataclass(frozen=True)
class TowerTuning:
    """What an encoder measured of one tower ("image", "text") and the bulk call size it chose."""

    tower: str
    batch_size: int
    inputs_per_second: float  # model time only: the ceiling for end-to-end throughput
    reason: str


class Encoder(Protocol):
    """Embeds texts and encoded images into the model's unit-length space.

    `deadline` is a time.monotonic() instant after which the work may be dropped; `bulk`
    marks ingest, which yields to interactive queries. Per-item failures (an undecodable
    image, an empty text) come back in `Embedded.errors`; a failure of the whole call raises
    a ClipSearchError (RESOURCE_EXHAUSTED when overloaded, UNAVAILABLE when the encoder
    cannot be reached).
    """

    info: ModelInfo

    async def embed_texts(self, texts: list[str], deadline: float | None = None,
                          bulk: bool = False) -> Embedded: ...

    async def embed_images(self, images: list[bytes], deadline: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        """With `thumbnail_size` (long side, pixels), also each image's WebP thumbnail, made
        from the picture decoded for the model: ingest decodes an image once."""
        ...

    def describe(self) -> str:
        """One line for the start-up log: where the model runs."""
        ...

    def tuning(self) -> list[TowerTuning]:
        """What was measured of each tower that has run so far, and chosen from it."""
        ...

    def close(self) -> None: ...
