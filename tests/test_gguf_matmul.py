"""The fused GGUF dequantize-and-multiply kernel, the INT8 Q8_0 kernel and the dispatch, against float64
references. On CPU the Triton kernels run in the interpreter; on a GPU natively.

Tolerances:
- fp32 activations: the kernel's dots are exact-fp32 (ieee); vs float64 on the same dequantized weight:
  relative L2 error <= 1e-5 (fp32 accumulation over K <= 1024).
- bf16 activations: the reference uses the same bf16-rounded activations and weights, so what remains is
  fp32 accumulation and the bf16 rounding of the output: |err| <= 2^-8 |ref| + 2^-8 max|ref|.
- INT8 Q8_0: integer dots are exact; vs the float64 evaluation of the same int8 sums: 1e-5 of max|ref|.
"""

import logging

import gguf
import pytest
import torch
from dit_quant.kernels import dispatch, gguf_dispatch, quantize_rows
from dit_quant.kernels.gguf_dequant_reference import dequantize_reference
from dit_quant.kernels.gguf_dispatch import MODES, fused_wins, gguf_linear
from dit_quant.kernels.gguf_matmul_triton import (
    FUSED_TYPES,
    K_MULTIPLE,
    gguf_linear_fused,
    gguf_linear_int8_q8_0,
)
from dit_quant.quant.gguf_kquants import quantize_kquant

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    if qtype.endswith("_K"):
        return quantize_kquant(weight, qtype).to(DEVICE)
    return torch.from_numpy(gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])).to(DEVICE)


def problem(qtype: str, m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    raw = quantized(weight, qtype)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    return x, raw, bias, dequantize_reference(raw, qtype, (n, k))


@pytest.mark.parametrize("qtype", FUSED_TYPES)
@pytest.mark.parametrize("m", [1, 37])
def test_fused_fp32_matches_float64(qtype, m):
    k = 256 if qtype.endswith("_K") else 384  # legacy types need K % 128 only
    x, raw, bias, weight = problem(qtype, m, 48, k, seed=m)
    out = gguf_linear_fused(x, raw, qtype, 48, k, bias)
    ref = x.double() @ weight.double().T + bias.double()
    assert out.dtype == torch.float32 and out.shape == (m, 48)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("qtype", FUSED_TYPES)
def test_fused_bf16_matches_rounded_reference(qtype):
    m, n, k = 40, 72, 512
    x, raw, bias, weight = problem(qtype, m, n, k, seed=3)
    x = x.bfloat16()
    out = gguf_linear_fused(x, raw, qtype, n, k, None)
    ref = x.double() @ weight.bfloat16().double().T
    assert out.dtype == torch.bfloat16
    bound = 2.0**-8 * (ref.abs() + ref.abs().max())
    assert ((out.double() - ref).abs() <= bound).all()


def test_int8_q8_0_matches_exact_integer_sums():
    m, n, k = 33, 40, 256
    x, raw, bias, _ = problem("Q8_0", m, n, k, seed=5)
    xq, x_scale = quantize_rows(x)
    out = gguf_linear_int8_q8_0(xq, x_scale, raw, n, k, bias, torch.float32)
    blocks = raw.view(n, k // 32, 34)
    qs = blocks[:, :, 2:].contiguous().view(torch.int8).double()
    d = blocks[:, :, :2].contiguous().view(torch.float16).double().squeeze(-1)
    sums = torch.einsum("mbk,nbk->mnb", xq.double().view(m, k // 32, 32), qs)
    ref = (sums * d[None]).sum(-1) * x_scale.double()[:, None] + bias.double()
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_fused_rejects_bad_inputs():
    x, raw, bias, _ = problem("Q4_K", 2, 16, 256, seed=1)
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_linear_fused(x[:, :128], raw, "Q4_K", 16, 128)
    with pytest.raises(ValueError, match="do not hold"):
        gguf_linear_fused(x, raw[:8], "Q4_K", 16, 256)
    with pytest.raises(ValueError, match="no fused GGUF kernel"):
        gguf_linear_fused(x, raw, "Q2_K", 16, 256)
    assert K_MULTIPLE["Q8_0"] == 128 and K_MULTIPLE["Q6_K"] == 256


@pytest.mark.parametrize("mode", MODES)
def test_dispatch_every_mode_gives_the_same_linear(mode):
    """On CPU every mode takes the dequantize + F.linear path; on a GPU the Triton paths. Either way the
    result is the float linear of the dequantized weight (int8: within activation quantization error)."""
    x, raw, bias, weight = problem("Q8_0", 6, 64, 256, seed=9)
    x3 = x.view(2, 3, 256)
    out = gguf_linear(x3, raw, "Q8_0", (64, 256), bias, mode)
    ref = (x.double() @ weight.double().T + bias.double()).view(2, 3, 64)
    bound = 2e-2 if mode == "int8" and DEVICE.type == "cuda" else 1e-5
    assert out.shape == (2, 3, 64)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= bound


def test_dispatch_rejects_unknown_mode():
    x, raw, bias, _ = problem("Q8_0", 2, 32, 128, seed=2)
    with pytest.raises(ValueError, match="unknown GGUF linear mode"):
        gguf_linear(x, raw, "Q8_0", (32, 128), bias, "fastest")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="native Triton tiles need a CUDA GPU")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q5_1"])
def test_every_tile_is_correct_on_gpu(qtype):
    """Each candidate tile (autotuning may pick any) and the default tile of each row count, natively."""
    from dit_quant.kernels.gguf_matmul_triton import CANDIDATES

    n, k = 320, 1024
    for m in (1, 40, 300, 2100):
        x, raw, bias, weight = problem(qtype, m, n, k, seed=m)
        x = x.bfloat16()
        ref = x.double() @ weight.bfloat16().double().T + bias.double()
        bound = 2.0**-8 * (ref.abs() + ref.abs().max())
        for config in (None, *CANDIDATES):
            out = gguf_linear_fused(x, raw, qtype, n, k, bias, config)
            assert ((out.double() - ref).abs() <= bound).all(), (m, config)


@pytest.mark.parametrize(
    "m, n, k, qtype, fused",
    [(1, 12288, 3072, "Q8_0", True), (16, 9216, 3072, "Q4_K", True), (16, 9216, 3072, "Q8_0", False),
     (17, 12288, 3072, "Q4_K", False), (1, 3072, 12288, "Q6_K", False), (1, 3072, 3072, "Q8_0", False),
     (4608, 21504, 3072, "Q4_K", False)],
)
def test_auto_runs_fused_only_where_it_measured_faster(m, n, k, qtype, fused):
    """The rule from the H100 measurements (bench/results/bench_gguf.md): few rows and a wide weight."""
    assert fused_wins(m, n, k, qtype) is fused


def test_torch_path_is_announced_once_per_device(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(gguf_dispatch, "_usable", {})
    caplog.set_level(logging.INFO, logger="dit_quant.kernels")
    weight = torch.randn(64, 256)
    raw = quantized(weight, "Q8_0").cpu()  # CPU tensors also on a GPU machine: the path under test
    x = torch.randn(3, 256)
    for _ in range(3):
        out = gguf_linear(x, raw, "Q8_0", (64, 256))
    torch.testing.assert_close(out, x @ dequantize_reference(raw, "Q8_0", (64, 256)).T, rtol=1e-5, atol=1e-5)
    messages = [r.getMessage() for r in caplog.records if "plain-torch dequantization path" in r.getMessage()]
    assert len(messages) == 1 and "cpu" in messages[0]
