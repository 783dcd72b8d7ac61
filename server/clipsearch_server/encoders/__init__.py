"""The encoder seam: texts and images -> unit vectors.

`base.py` is the interface the service calls (Encoder, Embedded, ModelInfo); `local/` runs the
model in this process (the default), `ray_serve.py` calls a Ray Serve deployment
(`ray_deployment.py`) through Serve handles. `open_encoder` is the one place that chooses
between them, from `--encoder`, and imports only the chosen one: a front with `--encoder ray`
never loads torch or open_clip.
"""

from __future__ import annotations

from ..observability import Metrics
from ..settings import AnySettings
from .base import Embedded, Encoder, ModelInfo

__all__ = ["Embedded", "Encoder", "ModelInfo", "open_encoder"]


def open_encoder(settings: AnySettings, metrics: Metrics | None = None) -> Encoder:
    """The encoder `settings.encoder` names, ready to embed (blocking: call off the loop)."""
    if settings.encoder == "ray":
        from .ray_serve import RayEncoder

        return RayEncoder.connect(settings)
    from .local import LocalEncoder

    return LocalEncoder.start(settings, metrics)
