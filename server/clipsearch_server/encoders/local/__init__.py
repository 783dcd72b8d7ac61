"""The in-process encoder (`--encoder local`, the default): torch and open_clip live here.

    encoder.py        LocalEncoder: the Encoder over towers loaded in this process
    backend.py        --backend: torch or ONNX Runtime, chosen and loaded
    model.py          open_clip loading and the two towers' forward passes (torch)
    onnx_towers.py    the towers exported to ONNX and run by ONNX Runtime (fp32, int8)
    preflight.py      are the pretrained weights cached or downloadable, before open_clip asks
    precision.py      which precision (fp32, bf16, fp16) suits this device
    preprocess.py     image bytes -> the model's input tensor (decoding itself: images.py)
    device_decode.py  JPEGs decoded on the GPU (nvjpeg) when there is one
    batcher.py        the cross-request batcher in front of the model
    decode_budget.py  bounds the decoded pixels held at once
    embedder.py       texts and images -> vectors, with per-item errors, off the event loop

Nothing outside this package imports it except `encoders.open_encoder` and the Ray replica
(`encoders/ray_deployment.py`), so a front with another encoder never loads torch.
"""

from __future__ import annotations

from .backend import load_towers, model_info
from .encoder import LocalEncoder, start_embedder

__all__ = ["LocalEncoder", "load_towers", "model_info", "start_embedder"]
