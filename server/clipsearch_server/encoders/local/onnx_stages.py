"""The ViT image tower cut into one ONNX graph per residual block, so that a bulk call can pause.

ONNX Runtime runs a graph to its end. With one graph per block, the batcher serves waiting
queries between blocks, as torch's forward hooks let it do (model.py): a query waits for one
block, a twelfth of a ViT-B-32 call, and bulk calls keep the batch size that runs fastest
instead of shrinking to fit a call budget (on an AVX2 CPU at fp32 that meant batches of one).
Stage 0 also holds the patch embedding, the last stage the pooling and projection. The cut is
checked against `encode_image` before it is exported; a tower it does not fit is exported
whole, and does not pause.
"""

from __future__ import annotations

import torch


def stage_count(module: torch.nn.Module) -> int:
    """Residual blocks of an open_clip VisionTransformer image tower; 0 for any other tower."""
    visual = getattr(module, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if (not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < 2
            or not all(hasattr(visual, name) for name in ("_embeds", "_pool", "proj"))
            or getattr(visual, "output_tokens", False)):
        return 0
    return len(blocks)


def stage_names(count: int) -> list[str]:
    """The cache names of the stages: image.00, image.01, ..."""
    return [f"image.{i:02d}" for i in range(count)]


class ImageStage(torch.nn.Module):
    """Block `index` of the image tower, with the embedding before the first and the head
    after the last: open_clip's VisionTransformer.forward, split where its blocks meet."""

    def __init__(self, visual: torch.nn.Module, index: int, count: int) -> None:
        super().__init__()
        self.visual = visual
        self.index = index
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        if self.index == 0:
            x = visual._embeds(x)
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        x = visual.transformer.resblocks[self.index](x)
        if not batch_first:
            x = x.transpose(0, 1)
        if self.index == self.count - 1:
            x, _ = visual._pool(x)
            if visual.proj is not None:
                x = x @ visual.proj
        return x


@torch.no_grad()
def stage_input(module: torch.nn.Module, index: int, pixels: torch.Tensor) -> torch.Tensor:
    """What stage `index` receives when the tower is given `pixels` (its example input)."""
    count = stage_count(module)
    x = pixels
    for i in range(index):
        x = ImageStage(module.visual, i, count)(x)
    return x


@torch.no_grad()
def stages_match(module: torch.nn.Module, pixels: torch.Tensor) -> bool:
    """Whether the stages, run in turn, give what encode_image gives (this open_clip's layout)."""
    count = stage_count(module)
    if not count:
        return False
    try:
        staged = ImageStage(module.visual, count - 1, count)(
            stage_input(module, count - 1, pixels))
    except (AttributeError, RuntimeError, TypeError):
        return False
    whole = module.encode_image(pixels)
    return staged.shape == whole.shape and torch.allclose(staged, whole, rtol=1e-4, atol=1e-5)
