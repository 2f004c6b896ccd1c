"""Images of one dataset brought to another's shape, for a server that distils on another dataset (FedDF's
out-of-domain distillation set, e.g. scikit-learn's 8 x 8 digits for a 28 x 28 Fashion-MNIST model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["resize_images"]


def resize_images(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` (n, C, H, W) as (n, *shape): bilinear resampling of H x W (``align_corners=False``, antialiased when
    shrinking), one channel repeated to three or three averaged to one; values keep their range (the inputs'
    scale is the dataset's own, e.g. [0, 1]). Other channel changes are refused."""
    c, h, w = (int(v) for v in shape)
    if x.ndim != 4:
        raise ValueError(f"images of shape (n, C, H, W) expected, got {tuple(x.shape)}")
    out = x.float()
    if out.shape[1] != c:
        if out.shape[1] == 1:
            out = out.expand(-1, c, -1, -1)
        elif c == 1:
            out = out.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot bring {out.shape[1]}-channel images to {c} channels (only 1 <-> C)")
    if tuple(out.shape[2:]) != (h, w):
        shrink = h < out.shape[2] or w < out.shape[3]
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
        out = out.clamp(float(x.min()), float(x.max()))
    return out.contiguous()
