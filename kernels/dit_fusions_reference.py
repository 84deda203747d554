"""Plain-torch reference of the fused DiT block ops (dit_fusions_triton.py computes the same math).

They replace chains of small elementwise ops around the Linear layers of a DiT block, and can emit the
next INT8 layer's activation directly (int8 rows + fp32 row scales, the math of
``w8a8_reference.quantize_rows_reference``), so the bf16 activation is written and read once fewer:

- ``layernorm_modulate``: LayerNorm without affine, then ``x * (1 + scale) + shift`` per batch item;
- ``qk_norm_rope``: split a fused qkv projection into heads, RMS-normalize q and k, apply rotary
  embeddings, and write q/k/v into attention buffers at a sequence offset (the concatenation of two
  streams happens in place);
- ``gelu_concat``: the concatenation of an attention output (in any head layout) and a tanh-GELU of an
  MLP projection, as one row.

All intermediate math is fp32; results are rounded once to the output dtype (stock ComfyUI rounds to
bf16 after each op, so results differ from it by about one bf16 ulp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .w8a8_reference import quantize_rows_reference

GELU_TANH_COEFF = 0.044715
SQRT_2_OVER_PI = 0.7978845608028654


def _emit(y: torch.Tensor, out_dtype: torch.dtype, smooth: torch.Tensor | None, quantize: bool):
    """fp32 [B, L, K] -> out_dtype [B, L, K], or (int8 [B*L, K], fp32 [B*L]) when quantizing."""
    if quantize:
        return quantize_rows_reference(y.reshape(-1, y.shape[-1]), smooth)
    return y.to(out_dtype)


def layernorm_modulate_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
):
    """LayerNorm(x) * (1 + scale) + shift. x [B, L, K] float; scale, shift [B, K]; smooth fp32 [K].

    Returns [B, L, K] in x.dtype, or with ``quantize`` (int8 [B*L, K], fp32 row scales [B*L]) of the
    result divided by ``smooth``.
    """
    xf = x.float()
    normed = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    y = normed * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return _emit(y, x.dtype, smooth, quantize)


def qk_norm_rope_reference(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    pe: torch.Tensor | None,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    offset: int,
    eps: float = 1e-6,
) -> None:
    """qkv [B, L, 3*H*D] (q | k | v, heads of D) -> q_out/k_out/v_out[:, :, offset:offset+L] ([B, H, T, D]).

    q and k: RMSNorm over D with weights [D] (rounded to qkv.dtype first, as ComfyUI casts them), rounded
    to qkv.dtype, then rotated by ``pe`` [B or 1, 1, T, D/2, 2, 2] fp32 at positions offset..offset+L
    (ComfyUI's Flux ``apply_rope`` layout); v is copied.
    """
    b, length, _ = qkv.shape
    heads, head_dim = q_out.shape[1], q_out.shape[3]
    q, k, v = qkv.view(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    rows = slice(offset, offset + length)
    for src, weight, dst in ((q, q_weight, q_out), (k, k_weight, k_out)):
        normed = F.rms_norm(src.float(), (head_dim,), weight.to(qkv.dtype).float(), eps).to(qkv.dtype)
        if pe is not None:
            pairs = normed.float().reshape(b, heads, length, head_dim // 2, 1, 2)
            freqs = pe[:, :, rows]
            normed = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
        dst[:, :, rows] = normed.reshape(b, heads, length, head_dim).to(dst.dtype)
    v_out[:, :, rows] = v


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU in the input's dtype (PyTorch's ``approximate="tanh"``)."""
    return F.gelu(x, approximate="tanh")


def gelu_concat_reference(
    attn: torch.Tensor | None,
    mlp: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Row-wise concatenation [attn | gelu_tanh(mlp)] -> [B, L, H*D + Kb].

    attn: [B, L, H, D] (any strides, e.g. an attention output [B, H, T, D] transposed and sliced) or
    None; mlp: [B, L, Kb] or None (at least one given). Returns out_dtype (default: the inputs' dtype)
    [B, L, H*D + Kb], or with ``quantize`` (int8 [B*L, H*D + Kb], fp32 [B*L]) of the row divided by
    ``smooth``.
    """
    parts = []
    if attn is not None:
        parts.append(attn.float().reshape(*attn.shape[:2], -1))
    if mlp is not None:
        parts.append(gelu_tanh(mlp.float()))
    if not parts:
        raise ValueError("DiT Quant: gelu_concat needs an attention output, an MLP projection or both")
    y = torch.cat(parts, dim=-1)
    dtype = out_dtype or (attn if attn is not None else mlp).dtype
    return _emit(y, dtype, smooth, quantize)
