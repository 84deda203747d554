"""W8A8 linear: both backends against a float64 computation of the same math, the custom op, the
dispatcher. On CPU the Triton backend runs in the interpreter (TRITON_INTERPRET=1, set by conftest.py);
on a GPU natively.

Tolerances (stated once, used below):
- quantized ints vs a float64 quantization: >= 99.9% equal, none off by more than 1 (fp32 vs fp64
  division can land on the other side of a .5 tie);
- row scales vs float64: relative 1e-6 (two fp32 roundings);
- outputs vs the float64 epilogue applied to the backend's own int8 rows: one ulp of the output dtype
  relative (the interpreter truncates fp32 -> bf16/fp16 instead of rounding), plus 2**-21 of the
  magnitude of the fp32 terms (product and bias) for the fp32 epilogue's own roundings.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import types

import pytest
import torch
from dit_quant.kernels import available_backends, dispatch, quantize_rows, resolve_backend, w8a8_linear
from dit_quant.kernels.w8a8_reference import int8_matmul_exact

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if "triton" in available_backends() else [])
ULP_REL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}


def _inputs(m_shape, k, n, dtype, has_bias, has_smooth, seed):
    """Fresh random activation (with a few outlier channels), int8 weight, scales, bias, smooth."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g)
    outliers = torch.randperm(k, generator=g)[:3]
    x[..., outliers] *= 40.0  # DiT-like outlier channels
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g) if has_bias else None
    smooth = torch.rand(k, generator=g) * 4.0 + 0.25 if has_smooth else None
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(x.to(dtype)), move(weight), move(weight_scale), move(bias), move(smooth)


def _quantize_fp64(x2d, smooth):
    xs = x2d.double() / (smooth.double() if smooth is not None else 1.0)
    scale = xs.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(xs / scale[:, None]).clamp(-127, 127), scale


def _check_quantized(q, scale, x2d, smooth):
    q64, scale64 = _quantize_fp64(x2d, smooth)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)
    diff = (q.double() - q64).abs()
    assert diff.max().item() <= 1, f"quantized ints off by {diff.max().item()}"
    assert (diff == 0).double().mean().item() >= 0.999


CASES = [  # (leading shape, K, N, dtype, bias, smooth)
    ((1,), 256, 96, torch.bfloat16, True, True),  # M = 1 (small-M path)
    ((77,), 200, 72, torch.bfloat16, False, True),  # K not a multiple of 64, ragged N
    ((77,), 192, 40, torch.float16, True, False),
    ((130,), 200, 100, torch.bfloat16, True, False),  # large-M path, M not a multiple of the tile
    ((130,), 128, 64, torch.float32, False, True),
    ((2, 33), 96, 48, torch.float16, True, True),  # 3-D input
    ((3, 5), 64, 24, torch.float32, True, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{'x'.join(map(str, c[0]))}-k{c[1]}-n{c[2]}-"
                         f"{str(c[3])[6:]}-bias{int(c[4])}-smooth{int(c[5])}")
def test_w8a8_linear_matches_fp64(backend, case):
    lead, k, n, dtype, has_bias, has_smooth = case
    x, weight, weight_scale, bias, smooth = _inputs(lead, k, n, dtype, has_bias, has_smooth,
                                                    seed=CASES.index(case))
    out = w8a8_linear(x, weight, weight_scale, bias, smooth, backend=backend)
    assert out.shape == (*lead, n) and out.dtype == dtype and out.device.type == DEVICE.type

    _check_against_fp64(out.reshape(-1, n), x.reshape(-1, k), weight, weight_scale, bias, smooth, backend)


def _check_against_fp64(out, x2d, weight, weight_scale, bias, smooth, backend):
    """Quantized rows vs fp64 quantization, then out vs the fp64 epilogue of those rows (tolerances above)."""
    q, scale = quantize_rows(x2d, smooth, backend=backend)
    _check_quantized(q, scale, x2d, smooth)
    product = (q.double() @ weight.double().t()) * scale.double()[:, None] * weight_scale.double()[None, :]
    bias64 = bias.double() if bias is not None else torch.zeros_like(product[0])
    expected = product + bias64
    bound = ULP_REL[out.dtype] * expected.abs() + 2.0**-21 * (product.abs() + bias64.abs()) + 1e-30
    err = (out.double() - expected).abs()
    assert (err <= bound).all(), f"max error / bound = {(err / bound).max().item():.3g}"


def _kind_configs():
    """One config of every kernel kind: the interpreter's small tiles on CPU, the arch's own on a GPU."""
    from dit_quant.kernels import w8a8_triton

    if DEVICE.type == "cpu":
        return [*(w8a8_triton.GemmConfig(kind, 16 if kind == "fused" else 64, 64, 64, 8, 4, 1, split)
                  for kind, split in [("int8", False), ("fused", False), ("tma", False), ("tma", True)]),
                w8a8_triton.GemmConfig("gemv", 1, 32, 64, 1, 4, 1)]
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    return list(dict.fromkeys(c for regime in ("small", "mid", "large")
                              for c in w8a8_triton.candidate_configs(cc, regime)))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
@pytest.mark.parametrize("config", _kind_configs() if "triton" in BACKENDS else [], ids=str)
@pytest.mark.parametrize("shape", [(130, 192, 72), (5, 256, 40)], ids=lambda s: "m{}-k{}-n{}".format(*s))
def test_every_kernel_kind_matches_fp64(config, shape):
    from dit_quant.kernels.w8a8_triton import w8a8_linear_triton

    m, k, n = shape
    x, weight, weight_scale, bias, smooth = _inputs((m,), k, n, torch.bfloat16, True, config.kind != "tma",
                                                    seed=m + k + n)
    out = w8a8_linear_triton(x, weight, weight_scale, bias, smooth, config)
    _check_against_fp64(out, x, weight, weight_scale, bias, smooth, "triton")


def test_tail_start_row_keeps_the_full_waves_in_the_main_launch():
    from dit_quant.kernels.w8a8_triton import GemmConfig, tail_start_row

    tail = GemmConfig("tma", 128, 128, 128, 8, 4, 5)
    wide = GemmConfig("tma", 128, 256, 128, 8, 8, 4, True, tail)
    # 4608x3072 on 132 SMs: 36 row blocks x 12 column tiles = 432 tiles; 3 full waves = 396 = 33 row blocks
    assert tail_start_row(4608, 3072, wide, 132) == 33 * 128
    # 1024x9216: 8 x 36 = 288 tiles; 2 full waves = 264 tiles hold 7 whole row blocks
    assert tail_start_row(1024, 9216, wide, 132) == 7 * 128
    # 4096x3072: 32 x 12 = 384 tiles, 2 full waves = 264 = 22 row blocks
    assert tail_start_row(4096, 3072, wide, 132) == 22 * 128
    assert tail_start_row(1024, 3072, wide, 132) == 0  # 96 tiles: not one full wave, the tail runs all
    assert tail_start_row(33 * 128, 4 * 256, wide, 132) == 33 * 128  # 132 tiles fill one wave: no tail
    assert tail_start_row(4608, 3072, GemmConfig("tma", 128, 256, 128, 8, 8, 4, True), 132) == 4608


def _tail_configs():
    """(main config with a tail, the same without) pairs that split the tail test's shape on this device."""
    from dit_quant.kernels import w8a8_triton

    if DEVICE.type == "cpu":
        main = w8a8_triton.GemmConfig("tma", 64, 64, 64, 8, 4, 1)
        tails = [w8a8_triton.GemmConfig("tma", 32, 64, 64, 8, 4, 1),
                 w8a8_triton.GemmConfig("int8", 16, 32, 64, 8, 4, 1)]
        return [(dataclasses.replace(main, tail=t), main) for t in tails]
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    with_tails = dict.fromkeys(c for regime in ("mid", "large")
                               for c in w8a8_triton.candidate_configs(cc, regime) if c.tail)
    return [(c, c.launches()[0]) for c in with_tails]


TAIL_SHAPE = (300, 128, 160) if DEVICE.type == "cpu" else (4608, 256, 3072)  # M, K, N


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
@pytest.mark.parametrize("configs", _tail_configs() if "triton" in BACKENDS else [],
                         ids=lambda c: str(c[0].tail))
def test_tail_launch_matches_fp64_and_the_single_launch(configs):
    from dit_quant.kernels import w8a8_triton

    with_tail, single = configs
    m, k, n = TAIL_SHAPE
    start = w8a8_triton.tail_start_row(m, n, with_tail, w8a8_triton.program_slots(DEVICE))
    assert 0 < start < m, "the test shape must split into a main and a tail launch"
    x, weight, weight_scale, bias, _ = _inputs((m,), k, n, torch.bfloat16, True, False, seed=m + n)
    out = w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, bias, None, with_tail)
    _check_against_fp64(out, x, weight, weight_scale, bias, None, "triton")
    # int32 accumulation is exact and the epilogue is per element: the split changes no bit
    reference = w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, bias, None, single)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


GATED_SHAPE = (128, 128, 160) if DEVICE.type == "cpu" else (4608, 256, 3072)  # M, K, N; 2 samples


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
@pytest.mark.parametrize("config", [c for c in _kind_configs() if c.kind != "gemv"] if "triton" in BACKENDS
                         else [], ids=str)
def test_every_gemm_kind_adds_its_gated_result_in_place(config):
    """The gated-add epilogue of each GEMM kind (on Hopper the TMA reduction) against float64, with two
    samples, so each tile must pick its own sample's gate row."""
    from dit_quant.kernels.w8a8_triton import GatedAdd, int8_gemm_gated_add_triton, tiles_within_samples
    from test_dit_fusions import check_gated_add, gated_add_inputs

    m, k, n = (512, 192, 72)  # samples of 256 rows: whole tiles of every config
    q, scale, weight, weight_scale, bias, gate, residual = gated_add_inputs(m, k, n, 2, True, seed=k + n)
    assert tiles_within_samples(config, 2, m // 2)
    before = residual.clone()
    int8_gemm_gated_add_triton(q, scale, weight, weight_scale, bias, GatedAdd(gate, m // 2, residual), config)
    check_gated_add(residual, before, q, scale, weight, weight_scale, bias, gate, m // 2)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
@pytest.mark.parametrize("configs", _tail_configs() if "triton" in BACKENDS else [],
                         ids=lambda c: str(c[0].tail))
def test_tail_launch_adds_the_gate_of_its_own_rows(configs):
    """A tail launch's rows start past row 0: its tiles must still find their sample's gate row."""
    from dit_quant.kernels import w8a8_triton
    from test_dit_fusions import check_gated_add, gated_add_inputs

    with_tail, _ = configs
    m, k, n = GATED_SHAPE
    start = w8a8_triton.tail_start_row(m, n, with_tail, w8a8_triton.program_slots(DEVICE))
    assert m // 2 <= start < m, "the tail must lie in the second sample"
    q, scale, weight, weight_scale, bias, gate, residual = gated_add_inputs(m, k, n, 2, False, seed=m + k)
    before = residual.clone()
    w8a8_triton.int8_gemm_gated_add_triton(q, scale, weight, weight_scale, bias,
                                           w8a8_triton.GatedAdd(gate, m // 2, residual), with_tail)
    check_gated_add(residual, before, q, scale, weight, weight_scale, bias, gate, m // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input_and_zero_rows(backend):
    x, weight, weight_scale, bias, smooth = _inputs((40,), 64, 32, torch.bfloat16, True, True, seed=7)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    torch.testing.assert_close(w8a8_linear(x_t, weight, weight_scale, bias, smooth, backend=backend),
                               w8a8_linear(x, weight, weight_scale, bias, smooth, backend=backend),
                               rtol=0, atol=0)
    # An all-zero row quantizes to zeros with the floor scale; its output is the bias (within 1 bf16 ulp).
    x[3] = 0
    out = w8a8_linear(x, weight, weight_scale, bias, smooth, backend=backend)
    torch.testing.assert_close(out[3].float(), bias.float(), rtol=2.0**-7, atol=0)
    empty = w8a8_linear(x[:0], weight, weight_scale, bias, smooth, backend=backend)
    assert empty.shape == (0, 32)


def test_backends_agree_on_larger_problem():
    """Both backends compute the same function: quantized rows equal, outputs within 1 bf16 ulp."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not importable here")
    x, weight, weight_scale, bias, smooth = _inputs((200,), 320, 136, torch.bfloat16, True, True, seed=11)
    ref = w8a8_linear(x, weight, weight_scale, bias, smooth, backend="torch").float()
    out = w8a8_linear(x, weight, weight_scale, bias, smooth, backend="triton").float()
    assert ((out - ref).abs() <= 2.0**-7 * ref.abs() + 1e-6).all()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [64, 200, 3072])
def test_quantize_rows_triton_matches_torch_bit_for_bit(k, dtype):
    """The torch backend's ints and scales exactly: half-way ties, values at +-127 and rows whose
    magnitudes span 1e-30 to 1e30 (the kernel takes the int8 from the rounded float's bits without a
    clamp, which relies on |x * inverse| <= 127 at every magnitude)."""
    from dit_quant.kernels import w8a8_triton

    g = torch.Generator().manual_seed(k)
    x = (torch.randn(33, k, generator=g) * 4).clamp(-120, 120)
    x[1::2] *= 10.0 ** (torch.rand(16, 1, generator=g) * 60 - 30)
    x[::2, k - 1] = 127.0  # even rows: amax 127, scale 1, so the .5 values below are exact ties
    x[::2, :8] = torch.tensor([0.5, -0.5, 1.5, -2.5, 100.5, -126.5, 3.25, -127.0])
    x = x.to(DEVICE, dtype)
    q, scale = w8a8_triton.quantize_rows_triton(x)
    q_ref, scale_ref = quantize_rows(x, backend="torch")
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    assert q[0, :8].tolist() == [0, 0, 2, -2, 100, -126, 3, -127] and q[0, k - 1] == 127
    assert (q.abs() == 127).sum() >= 33  # every row reaches +-127 at its amax


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_quantize_rows_two_pass_for_long_rows(monkeypatch):
    """Rows longer than QUANT_ONE_TILE_MAX_K are quantized in two passes; same ints as one pass."""
    from dit_quant.kernels import w8a8_triton

    x, _, _, _, smooth = _inputs((9,), 200, 8, torch.bfloat16, False, True, seed=13)
    one_pass = w8a8_triton.quantize_rows_triton(x, smooth)
    monkeypatch.setattr(w8a8_triton, "QUANT_ONE_TILE_MAX_K", 64)
    q, scale = w8a8_triton.quantize_rows_triton(x, smooth)
    _check_quantized(q, scale, x, smooth)
    assert torch.equal(q, one_pass[0]) and torch.equal(scale, one_pass[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_programmatic_dependent_launch_gives_the_same_bits(monkeypatch):
    """With and without programmatic dependent launch (sm_90+), the linear's output is bit-identical,
    also with the quantize kernel and the GEMM back to back in many launches (a GEMM reading its int8
    activation before the quantize kernel finished would differ)."""
    from dit_quant.kernels import w8a8_triton

    if not w8a8_triton.uses_pdl(DEVICE):
        pytest.skip("programmatic dependent launch needs sm_90+ and a Triton with launch_pdl")
    x, weight, weight_scale, bias, _ = _inputs((4608,), 3072, 3072, torch.bfloat16, True, False, seed=17)
    outputs = {}
    for pdl in (False, True):
        monkeypatch.setattr(w8a8_triton, "USE_PDL", pdl)
        outputs[pdl] = [w8a8_linear(x * (1 + i), weight, weight_scale, bias, backend="triton")
                        for i in range(8)]
    for plain, dependent in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(plain, dependent)


@pytest.mark.parametrize("k", [300, 2100])
def test_exact_int8_matmul_paths(k, monkeypatch):
    """int8 x int8 -> int32 product is exact on both reference paths (_int_mm and chunked fp32)."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (5, k), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (9, k), generator=g, dtype=torch.int8).to(DEVICE)
    exact = (q.long() @ w.long().t()) if DEVICE.type == "cpu" else (q.double() @ w.double().t()).long()
    assert torch.equal(int8_matmul_exact(q, w).long(), exact)
    from dit_quant.kernels import w8a8_reference

    monkeypatch.setattr(w8a8_reference, "_int_mm_failed_devices", {str(q.device)})
    assert torch.equal(int8_matmul_exact(q, w).long(), exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_opcheck(backend):
    x, weight, weight_scale, bias, smooth = _inputs((2, 5), 64, 48, torch.bfloat16, True, True, seed=3)
    torch.library.opcheck(torch.ops.dit_quant.w8a8_linear.default,
                          (x, weight, weight_scale, bias, smooth, backend))
    torch.library.opcheck(torch.ops.dit_quant.quantize_rows.default, (x[0], smooth, backend))


def test_torch_compile_fullgraph_no_graph_break():
    x, weight, weight_scale, bias, smooth = _inputs((3, 7), 64, 32, torch.bfloat16, True, True, seed=5)

    class Block(torch.nn.Module):
        def forward(self, h):
            return w8a8_linear(torch.nn.functional.gelu(h), weight, weight_scale, bias, smooth) * 2.0

    block = Block()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)


def test_input_validation_errors():
    x, weight, weight_scale, bias, smooth = _inputs((4,), 64, 16, torch.bfloat16, True, True, seed=1)
    with pytest.raises(ValueError, match="int8"):
        w8a8_linear(x, weight.float(), weight_scale)
    with pytest.raises(ValueError, match="K=64"):
        w8a8_linear(x[:, :32], weight, weight_scale)
    with pytest.raises(ValueError, match="weight_scale"):
        w8a8_linear(x, weight, weight_scale[:8])
    with pytest.raises(ValueError, match="smooth"):
        w8a8_linear(x, weight, weight_scale, smooth=smooth[:10])
    with pytest.raises(ValueError, match="unknown W8A8 backend"):
        w8a8_linear(x, weight, weight_scale, backend="cuda")


# ---------------------------------------------------------------- dispatcher


@pytest.fixture
def fresh_dispatch_state(monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_triton_failed_devices", set())
    monkeypatch.setattr(dispatch, "_resolved", {})
    return monkeypatch


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(dispatch, "_TRITON_INTERPRETED", False)


def test_auto_on_cpu_picks_reference_and_logs_once(fresh_dispatch_state, caplog):
    caplog.set_level(logging.INFO, logger="dit_quant.kernels")
    assert resolve_backend(torch.device("cpu"), "auto") == "torch"
    assert resolve_backend(torch.device("cpu"), "auto") == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "torch reference path" in messages[0] and "cpu" in messages[0]
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_auto_on_gpus_by_compute_capability(fresh_dispatch_state, caplog):
    caplog.set_level(logging.INFO, logger="dit_quant.kernels")
    _fake_gpu(fresh_dispatch_state, (7, 5))
    assert resolve_backend(torch.device("cuda:0"), "auto") == "torch"
    assert "GPU sm_75 has no Triton INT8 support; using the torch reference path" in caplog.text
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        resolve_backend(torch.device("cuda:0"), "triton")
    _fake_gpu(fresh_dispatch_state, (8, 6))
    caplog.clear()
    assert resolve_backend(torch.device("cuda:1"), "auto") == "triton"
    assert resolve_backend(torch.device("cuda:1"), "auto") == "triton"
    assert len(caplog.records) == 1 and "sm_86" in caplog.text and "FP8" not in caplog.text
    _fake_gpu(fresh_dispatch_state, (8, 9))
    caplog.clear()
    assert resolve_backend(torch.device("cuda:2"), "auto") == "triton"
    assert len(caplog.records) == 1 and "sm_89" in caplog.text and "fp8_e4m3fn_fast" in caplog.text


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_explicit_triton_on_cpu_needs_interpreter(fresh_dispatch_state):
    fresh_dispatch_state.setattr(dispatch, "_TRITON_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"), "triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_triton_failure_falls_back_once(fresh_dispatch_state, caplog):
    caplog.set_level(logging.INFO, logger="dit_quant.kernels")
    _fake_gpu(fresh_dispatch_state, (8, 0))
    calls = []

    def broken_linear(*args):
        calls.append(1)
        raise RuntimeError("PTX JIT compilation failed")

    fresh_dispatch_state.setitem(dispatch.BACKENDS, "triton",
                                 dispatch.BACKENDS["triton"]._replace(linear=broken_linear))
    x, weight, weight_scale, bias, smooth = _inputs((6,), 64, 16, torch.float32, True, False, seed=2)
    fake_gpu = torch.device("cuda:3")
    expected = dispatch.BACKENDS["torch"].linear(x, weight, weight_scale, bias, None)
    for _ in range(2):
        out = dispatch.run_op("linear", fake_gpu, "auto", x, weight, weight_scale, bias, None)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(calls) == 1  # the failing kernel is not retried
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PTX JIT compilation failed" in warnings[0].getMessage()
    assert resolve_backend(fake_gpu, "auto") == "torch"
    with pytest.raises(RuntimeError, match="PTX JIT"):  # an explicit request surfaces the error
        dispatch.run_op("linear", fake_gpu, "triton", x, weight, weight_scale, bias, None)


def test_second_import_under_another_name_reuses_ops():
    """ComfyUI imports the pack under its folder name while tests use ``dit_quant``: both must work."""
    alias = types.ModuleType("dit_quant_alias_for_test")
    alias.__path__ = list(sys.modules["dit_quant"].__path__)
    sys.modules[alias.__name__] = alias
    try:
        import importlib

        kernels_copy = importlib.import_module(f"{alias.__name__}.kernels")
        assert kernels_copy.w8a8_linear is not w8a8_linear
        x, weight, weight_scale, bias, smooth = _inputs((5,), 64, 16, torch.bfloat16, True, True, seed=4)
        copy_out = kernels_copy.w8a8_linear(x, weight, weight_scale, bias, smooth, backend="torch")
        own_out = w8a8_linear(x, weight, weight_scale, bias, smooth, backend="torch")
        torch.testing.assert_close(copy_out, own_out, rtol=0, atol=0)
    finally:
        for name in [n for n in sys.modules if n.startswith(alias.__name__)]:
            del sys.modules[name]


def test_import_without_triton_uses_reference():
    script = (
        "import sys, types, logging\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        f"pkg = types.ModuleType('dit_quant'); pkg.__path__ = {list(sys.modules['dit_quant'].__path__)!r}\n"
        "sys.modules['dit_quant'] = pkg\n"
        "import torch\n"
        "from dit_quant.kernels import available_backends, w8a8_linear\n"
        "assert available_backends() == ['torch'], available_backends()\n"
        "x = torch.randn(3, 32); w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)\n"
        "print(tuple(w8a8_linear(x, w, torch.rand(8)).shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(3, 8)" in done.stdout
    assert "Triton is not importable" in done.stderr


def test_triton_backend_registers_where_triton_imports():
    """The Triton backend's imports fail quietly (Triton is optional), so an import cycle among our own
    modules would silently leave only the reference: where Triton imports, the backend must be there."""
    pytest.importorskip("triton", reason="Triton is not installed here")
    assert "triton" in available_backends(), dispatch._triton_import_error


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    x, weight, weight_scale, bias, smooth = _inputs((300,), 512, 256, torch.bfloat16, True, True, seed=9)
    eager = w8a8_linear(x, weight, weight_scale, bias, smooth)  # also tunes/caches outside the capture
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = w8a8_linear(static_x, weight, weight_scale, bias, smooth)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    expected = w8a8_linear(fresh, weight, weight_scale, bias, smooth)
    torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
    assert not torch.equal(static_out, eager)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_weight_prefetch_candidates():
    """Without programmatic dependent launch a prefetching "int8" config would compile to its plain twin;
    "gemv" prefetches before its amax pass on every architecture."""
    from dit_quant.kernels import w8a8_triton

    for cc in (80, 86, 89, 90):
        small = w8a8_triton.candidate_configs(cc, "small")
        prefetching = [c for c in small if c.prefetch_weights and c.kind == "int8"]
        assert bool(prefetching) == (cc >= 90 and w8a8_triton.HAS_PDL), cc
        plain = {dataclasses.replace(c, prefetch_weights=False) for c in prefetching}
        assert plain <= set(small), "each prefetching config has a plain twin to be tuned against"
        gemv = [c for c in small if c.kind == "gemv"]
        assert any(c.prefetch_weights for c in gemv) and not all(c.prefetch_weights for c in gemv), cc
        assert all(c.block_m == 1 for c in gemv)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable here")
def test_gemv_serves_only_a_few_rows_of_unquantized_activations():
    from dit_quant.kernels import w8a8_triton
    from dit_quant.kernels.w8a8_autotune import applicable_configs

    small = w8a8_triton.candidate_configs(90, "small")
    for m in (1, 2, w8a8_triton.GEMV_MAX_M, w8a8_triton.GEMV_MAX_M + 1, 16):
        kinds = {c.kind for c in applicable_configs(small, m, 3072, True, False, 132)}
        assert ("gemv" in kinds) == (m <= w8a8_triton.GEMV_MAX_M) and "int8" in kinds, m
        prequantized = {c.kind for c in applicable_configs(small, m, 3072, True, True, 132)}
        assert prequantized.isdisjoint(w8a8_triton.ONE_LAUNCH_KINDS), m
    x, weight, weight_scale, bias, _ = _inputs((2,), 64, 32, torch.bfloat16, True, False, seed=3)
    q, scale = quantize_rows(x, backend="triton")
    with pytest.raises(ValueError, match="quantizes its own activation rows"):
        w8a8_triton.int8_gemm_triton(q, scale, weight, weight_scale, bias, torch.bfloat16,
                                     w8a8_triton.GemmConfig("gemv", 1, 16, 64, 1, 4, 1))


def _prefetching_configs():
    from dit_quant.kernels import w8a8_triton

    if not torch.cuda.is_available():
        return []
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    return [c for c in w8a8_triton.candidate_configs(cc, "small") if c.prefetch_weights]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (interpreter: no prefetch)")
@pytest.mark.parametrize("config", _prefetching_configs(), ids=str)
@pytest.mark.parametrize("shape", [(16, 3000, 200), (1, 640, 96)], ids=lambda s: "m{}-k{}-n{}".format(*s))
def test_weight_prefetch_changes_no_bit(config, shape):
    """The L2 prefetch of the first weight columns (K longer and shorter than the prefetched columns)
    is only a hint: the same bits as the config without it."""
    from dit_quant.kernels import w8a8_triton

    m, k, n = shape
    x, weight, weight_scale, bias, smooth = _inputs((m,), k, n, torch.bfloat16, True, True, seed=k + n)
    out = w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, bias, smooth, config)
    plain = dataclasses.replace(config, prefetch_weights=False)
    expected = w8a8_triton.w8a8_linear_triton(x, weight, weight_scale, bias, smooth, plain)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    _check_against_fp64(out, x, weight, weight_scale, bias, smooth, "triton")
