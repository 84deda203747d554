"""Public entry points of the fused DiT block ops and of the W8A8 GEMM on pre-quantized activations.

Each runs on the backend ``backend`` resolves to (see dispatch.py: Triton on CUDA sm_80+, else the
torch reference, logged once); the math and the shapes are documented in dit_fusions_reference.py.
"""

from __future__ import annotations

import torch

from .dispatch import as_fp32, last_dim_contiguous, run_op


def int8_gemm(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: str = "auto",
) -> torch.Tensor:
    """W8A8 linear on activations already quantized: int8 q [M, K] with fp32 row scales [M], int8 weight
    [N, K], fp32 weight_scale [N], bias [N] or None -> [M, N] out_dtype."""
    _check_quantized_rows("int8_gemm", q, scale, weight)
    return run_op("int8_gemm", q.device, backend, last_dim_contiguous(q), as_fp32(scale),
                  last_dim_contiguous(weight), as_fp32(weight_scale), bias, out_dtype)


def int8_gemm_gated_add(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    residual: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """A DiT block's gated residual update ``residual += gate * linear(h)`` with the linear on quantized
    rows (as ``int8_gemm``), in place: residual [B, L, N] (contiguous, 16-byte aligned), q [B*L, K],
    gate [B, N] or [B, 1, N] (or one row for all samples), any float dtype. The product is rounded to the
    residual's dtype before the add. On the Triton backend the add is the GEMM's epilogue (no [B*L, N]
    intermediate, one kernel). Returns ``residual``."""
    _check_quantized_rows("int8_gemm_gated_add", q, scale, weight)
    b, length, n = residual.shape
    gate = last_dim_contiguous(gate.reshape(gate.shape[0], gate.shape[-1]))
    if b * length != q.shape[0] or n != weight.shape[0] or gate.shape not in ((b, n), (1, n)):
        raise ValueError(f"DiT Quant: int8_gemm_gated_add got residual {tuple(residual.shape)}, rows "
                         f"{tuple(q.shape)}, weight {tuple(weight.shape)} and gate {tuple(gate.shape)}; "
                         f"expected residual [B, L, N] with B*L rows, N weight rows and gate [B or 1, N]")
    if not updatable_in_place(residual):
        raise ValueError("DiT Quant: int8_gemm_gated_add updates the residual in place and needs it "
                         "contiguous with a 16-byte aligned start")
    if residual.numel():
        rows_per_gate = length if gate.shape[0] > 1 else b * length
        run_op("int8_gemm_gated_add", q.device, backend, last_dim_contiguous(q), as_fp32(scale),
               last_dim_contiguous(weight), as_fp32(weight_scale), bias, gate, residual.view(b * length, n),
               rows_per_gate)
    return residual


def updatable_in_place(residual: torch.Tensor) -> bool:
    """Whether ``int8_gemm_gated_add`` can update ``residual`` in place: contiguous, 16-byte aligned."""
    return residual.is_contiguous() and residual.data_ptr() % 16 == 0


def _check_quantized_rows(op: str, q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor) -> None:
    if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != q.shape[:1]:
        raise ValueError(f"DiT Quant: {op} needs int8 rows [M, K] and fp32 scales [M], got {q.dtype} "
                         f"{tuple(q.shape)} and {tuple(scale.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != q.shape[1]:
        raise ValueError(f"DiT Quant: {op} weight must be int8 [N, {q.shape[1]}], got {weight.dtype} "
                         f"{tuple(weight.shape)}")


def layernorm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
    backend: str = "auto",
):
    """LayerNorm (no affine) then ``* (1 + scale) + shift``: x [B, L, K]; scale, shift [B, K] (or
    [B, 1, K]). Returns [B, L, K] in x.dtype, or with ``quantize`` (int8 [B*L, K], fp32 [B*L]) of the
    result divided by ``smooth`` fp32 [K]."""
    b, _, k = x.shape
    scale, shift = (last_dim_contiguous(t.reshape(t.shape[0], t.shape[-1])) for t in (scale, shift))
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape[-1] != k or t.shape[0] not in (1, b):
            raise ValueError(f"DiT Quant: layernorm_modulate {name} must be [{b}, {k}], got {tuple(t.shape)}")
    scale, shift = (t.expand(b, k) for t in (scale, shift))
    return run_op("layernorm_modulate", x.device, backend, last_dim_contiguous(x), scale, shift, eps,
                  as_fp32(smooth), quantize)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    pe: torch.Tensor | None,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    offset: int,
    eps: float = 1e-6,
    backend: str = "auto",
) -> None:
    """Fills q_out/k_out/v_out[:, :, offset:offset+L] ([B, H, T, D], one layout) from a fused projection
    qkv [B, L, 3*H*D]: RMS-normalized (weights [D]) and rotated (pe [B or 1, 1, T, D/2, 2, 2] fp32, or
    None) q and k, and v."""
    b, length, width = qkv.shape
    heads, head_dim = q_out.shape[1], q_out.shape[3]
    if width != 3 * heads * head_dim or q_out.shape[0] != b or offset + length > q_out.shape[2]:
        raise ValueError(f"DiT Quant: qk_norm_rope cannot place qkv {tuple(qkv.shape)} at {offset} in "
                         f"{tuple(q_out.shape)}")
    if not (q_out.stride() == k_out.stride() == v_out.stride()) or q_out.stride(-1) != 1:
        raise ValueError("DiT Quant: qk_norm_rope outputs must share one layout with contiguous heads")
    if pe is not None:
        pe = pe if pe.dtype == torch.float32 and pe[0, 0, 0].is_contiguous() else pe.float().contiguous()
    run_op("qk_norm_rope", qkv.device, backend, last_dim_contiguous(qkv), q_weight, k_weight, pe,
           q_out, k_out, v_out, offset, eps)


def gelu_concat(
    attn: torch.Tensor | None,
    mlp: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
    quantize: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
):
    """Row-wise [attn | gelu_tanh(mlp)]: attn [B, L, H, D] (any strides) or None, mlp [B, L, Kb] or None.
    Returns [B, L, H*D + Kb] (out_dtype, default the inputs'), or with ``quantize`` (int8 rows, fp32
    scales) of the row divided by ``smooth``."""
    if attn is None and mlp is None:
        raise ValueError("DiT Quant: gelu_concat needs an attention output, an MLP projection or both")
    device = (attn if attn is not None else mlp).device
    return run_op("gelu_concat", device, backend, None if attn is None else last_dim_contiguous(attn),
                  None if mlp is None else last_dim_contiguous(mlp),
                  as_fp32(smooth), quantize, out_dtype)
