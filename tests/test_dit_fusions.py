"""Fused DiT block ops and the W8A8 GEMM on pre-quantized rows: both backends against float64 math
written out here (not the reference module), on fresh random inputs. On CPU the Triton backend runs in
the interpreter; on a GPU natively.

Tolerances (stated once):
- float outputs vs float64: fp32 outputs 1e-5 relative to the output's magnitude (fp32 reductions and
  op order); bf16 outputs 2 bf16 ulps of the magnitude (the interpreter truncates instead of rounding,
  and qk_norm_rope rounds twice, after the norm as ComfyUI does and at the end);
- int8 outputs vs float64 quantization of the float64 result: no value off by more than 1, >= 99% equal
  (fp32 vs fp64 near .5 ties); row scales 1e-5 relative;
- int8_gemm: the int32 product is exact, so vs float64 only the fp32 epilogue's roundings (1e-6);
- int8_gemm_gated_add: one bf16 ulp of the gated product (rounded before the add) plus one of the sum
  (the interpreter truncates), plus the fp32 epilogue's 2**-20 of the product.
"""

from __future__ import annotations

import math

import pytest
import torch
from dit_quant.kernels import (
    available_backends,
    gelu_concat,
    int8_gemm,
    int8_gemm_gated_add,
    layernorm_modulate,
    qk_norm_rope,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if "triton" in available_backends() else [])
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def _randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _close(out: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    magnitude = expected64.abs().max().item()
    tol = 1e-5 * magnitude if dtype == torch.float32 else 2 * ULP[dtype] * magnitude
    err = (out.double() - expected64).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def _quantize64(y64: torch.Tensor, smooth: torch.Tensor | None):
    rows = y64.reshape(-1, y64.shape[-1])
    if smooth is not None:
        rows = rows / smooth.double()
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(rows / scale[:, None]).clamp(-127, 127), scale


def _check_quantized(result, y64, smooth) -> None:
    q, scale = result
    q64, scale64 = _quantize64(y64, smooth)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-5, atol=0)
    diff = (q.double() - q64).abs()
    assert diff.max().item() <= 1 and (diff == 0).double().mean().item() >= 0.99


def _layernorm_modulate64(x, scale, shift, eps=1e-6):
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    return (x64 - mean) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [96, 200])
def test_layernorm_modulate(backend, dtype, k):
    x = _randn(2, 7, k, seed=1, scale=3.0, dtype=dtype) + 0.5
    scale, shift = _randn(2, k, seed=2, scale=0.3), _randn(2, k, seed=3, scale=0.3)
    expected = _layernorm_modulate64(x, scale, shift)
    out = layernorm_modulate(x, scale, shift, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    _close(out, expected, dtype)
    smooth = torch.rand(k, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 3 + 0.25
    _check_quantized(layernorm_modulate(x, scale, shift, smooth=smooth, quantize=True, backend=backend),
                     expected, smooth)


def test_layernorm_modulate_broadcasts_one_modulation_row():
    x = _randn(3, 4, 64, seed=5)
    scale, shift = _randn(1, 1, 64, seed=6, scale=0.2), _randn(1, 1, 64, seed=7, scale=0.2)
    out = layernorm_modulate(x, scale, shift, backend="torch")
    one_row = (t.reshape(1, 64).expand(3, 64) for t in (scale, shift))
    expected = _layernorm_modulate64(x, *one_row)
    _close(out, expected, torch.float32)
    with pytest.raises(ValueError, match="scale must be"):
        layernorm_modulate(x, _randn(2, 64, seed=8), shift, backend="torch")


def _qk_norm_rope64(qkv, q_weight, k_weight, pe, heads, head_dim, dtype, eps=1e-6):
    b, length, _ = qkv.shape
    parts = qkv.double().view(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    results = []
    for src, weight in ((parts[0], q_weight), (parts[1], k_weight)):
        normed = src / torch.sqrt((src**2).mean(-1, keepdim=True) + eps) * weight.to(dtype).double()
        normed = normed.to(dtype).double()  # ComfyUI rounds the normalized q/k to the activation dtype
        even, odd = normed[..., 0::2], normed[..., 1::2]
        f = pe.double()[:, 0][:, None]  # [B, 1, L, D/2, 2, 2]
        rotated = torch.stack(
            [f[..., 0, 0] * even + f[..., 0, 1] * odd, f[..., 1, 0] * even + f[..., 1, 1] * odd], dim=-1
        )
        results.append(rotated.reshape(b, heads, length, head_dim))
    return results[0], results[1], parts[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_places_rotated_heads_at_offset(backend, dtype):
    b, length, heads, head_dim, total, offset = 2, 5, 3, 16, 9, 3
    qkv = _randn(b, length, 3 * heads * head_dim, seed=10, scale=2.0, dtype=dtype)
    q_weight = 1 + _randn(head_dim, seed=11, scale=0.1)
    k_weight = 1 + _randn(head_dim, seed=12, scale=0.1)
    angles = _randn(1, 1, total, head_dim // 2, seed=13, scale=3.0)
    pe = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], dim=-1).view(
        1, 1, total, head_dim // 2, 2, 2).expand(b, -1, -1, -1, -1, -1)
    outs = [torch.full((b, heads, total, head_dim), 7.0, dtype=dtype, device=DEVICE) for _ in range(3)]
    qk_norm_rope(qkv, q_weight, k_weight, pe, *outs, offset=offset, backend=backend)
    pe_rows = pe[:, :, offset:offset + length]
    expected = _qk_norm_rope64(qkv, q_weight, k_weight, pe_rows, heads, head_dim, dtype)
    rows = slice(offset, offset + length)
    for out, exp in zip(outs, expected, strict=True):
        _close(out[:, :, rows], exp, dtype)
        untouched = torch.cat([out[:, :, :offset], out[:, :, offset + length:]], dim=2)
        assert (untouched == 7.0).all()


def _gelu64(x):
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", ["both", "attn", "mlp"])
def test_gelu_concat(backend, dtype, parts):
    b, length, heads, head_dim, total, kb = 2, 4, 3, 16, 10, 40
    attn_out = _randn(b, heads, total, head_dim, seed=20, dtype=dtype)  # an attention output [B, H, T, D]
    attn = attn_out.transpose(1, 2)[:, 5:5 + length] if parts != "mlp" else None
    mlp_wide = _randn(b, length, kb + 24, seed=21, scale=2.5, dtype=dtype)
    mlp = mlp_wide[..., 24:] if parts != "attn" else None  # a column slice, as of a fused projection
    pieces = ([attn.double().reshape(b, length, -1)] if attn is not None else []) + (
        [_gelu64(mlp)] if mlp is not None else [])
    expected = torch.cat(pieces, dim=-1)
    out = gelu_concat(attn, mlp, backend=backend)
    assert out.shape == expected.shape and out.dtype == dtype
    _close(out, expected, dtype)
    smooth = torch.rand(expected.shape[-1], generator=torch.Generator().manual_seed(22)).to(DEVICE) + 0.5
    _check_quantized(gelu_concat(attn, mlp, smooth=smooth, quantize=True, backend=backend), expected, smooth)


def test_gelu_concat_needs_an_input():
    with pytest.raises(ValueError, match="needs an attention output"):
        gelu_concat(None, None, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("m", [3, 70])
def test_int8_gemm_matches_fp64(backend, has_bias, m):
    g = torch.Generator().manual_seed(30)
    k, n = 128, 96
    q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    scale = (torch.rand(m, generator=g) * 0.05 + 1e-3).to(DEVICE)
    weight_scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE) if has_bias else None
    out = int8_gemm(q, scale, weight, weight_scale, bias, torch.float32, backend=backend)
    expected = (q.double() @ weight.double().T) * scale.double()[:, None] * weight_scale.double()[None, :]
    if bias is not None:
        expected = expected + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def gated_add_inputs(rows: int, k: int, n: int, samples: int, has_bias: bool, seed: int):
    """Fresh int8 rows, row scales, int8 weight, scales, bias (or None), gate [samples, N] and residual
    [rows, N] (bf16, none of them zero) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(rows, generator=g) * 0.05 + 1e-3
    weight_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g) if has_bias else None
    gate = torch.randn(samples, n, generator=g).to(torch.bfloat16)
    residual = (torch.randn(rows, n, generator=g) * 30).to(torch.bfloat16)
    tensors = (q, scale, weight, weight_scale, bias, gate, residual)
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def check_gated_add(updated, before, q, scale, weight, weight_scale, bias, gate, rows_per_gate) -> None:
    """``updated`` (the residual after the op) against float64 math (tolerance in the module docstring)."""
    product = (q.double() @ weight.double().T) * scale.double()[:, None] * weight_scale.double()[None, :]
    if bias is not None:
        product = product + bias.double()
    gated = product * gate.double()[torch.arange(q.shape[0], device=q.device) // rows_per_gate]
    expected = before.double() + gated
    bound = ULP[torch.bfloat16] * (gated.abs() + expected.abs()) + 2.0**-20 * gated.abs()
    excess = (updated.double() - expected).abs() - bound
    assert (excess <= 0).all(), f"max error over the bound: {excess.max().item():.3g}"
    assert not torch.equal(updated, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("batch, length, gate_rows", [(1, 70, 1), (2, 64, 2), (2, 35, 2), (3, 9, 1)],
                         ids=["one-sample", "two-samples", "tiles-span-samples", "one-gate-for-all"])
def test_int8_gemm_gated_add_matches_fp64(backend, has_bias, batch, length, gate_rows):
    k, n = 96, 80
    q, scale, weight, weight_scale, bias, gate, residual = gated_add_inputs(
        batch * length, k, n, gate_rows, has_bias, seed=batch * length)
    before = residual.clone()
    x = residual.view(batch, length, n)
    out = int8_gemm_gated_add(q, scale, weight, weight_scale, bias, gate[:, None, :], x, backend=backend)
    assert out is x
    check_gated_add(residual, before, q, scale, weight, weight_scale, bias, gate,
                    length if gate_rows > 1 else batch * length)


def test_int8_gemm_gated_add_refuses_what_it_cannot_update_in_place():
    q, scale, weight, weight_scale, _, gate, residual = gated_add_inputs(8, 32, 16, 2, False, seed=4)
    x = residual.view(2, 4, 16)
    before = residual.clone()
    with pytest.raises(ValueError, match="contiguous"):
        int8_gemm_gated_add(q, scale, weight, weight_scale, None, gate, residual.new_ones(2, 4, 32)[..., ::2],
                            backend="torch")
    with pytest.raises(ValueError, match="gate"):
        int8_gemm_gated_add(q, scale, weight, weight_scale, None, gate[:, :8], x, backend="torch")
    assert torch.equal(residual, before)


def test_int8_gemm_rejects_float_rows():
    weight = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 rows"):
        int8_gemm(torch.zeros(2, 32), torch.ones(2), weight, torch.ones(4), None, torch.float32,
                  backend="torch")
