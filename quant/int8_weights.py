"""Per-output-channel symmetric INT8 weight quantization (the W of W8A8)."""

import torch

INT8_MAX = 127


def quantize_weight_per_channel(
    weight: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes a Linear weight per output channel.

    weight: [N, K] any float dtype. smooth: optional fp32 [K]; the weight is multiplied by it first
    (SmoothQuant: activations are divided by the same vector at run time).
    Returns (int8 [N, K], fp32 scale [N]) with weight * smooth ≈ q * scale[:, None];
    symmetric, round-half-even, clamped to ±127. An all-zero row gets a tiny positive scale.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight [N, K], got shape {tuple(weight.shape)}")
    w = weight.float()
    if smooth is not None:
        if smooth.shape != (w.shape[1],):
            raise ValueError(f"smoothing vector shape {tuple(smooth.shape)} does not match K={w.shape[1]}")
        w = w * smooth.float().to(w.device)[None, :]
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_weight_per_channel``: int8 [N, K] × fp32 [N] (÷ smooth [K]) → [N, K]."""
    w = q.float() * scale.float()[:, None]
    if smooth is not None:
        w = w / smooth.float().to(w.device)[None, :]
    return w.to(dtype)
