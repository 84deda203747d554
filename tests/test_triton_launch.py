"""The cached Triton launcher: its specialization key (CPU), and on a GPU that direct launches compute
the same results as Triton's own launch path, including when a tensor's alignment or dtype changes."""

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from dit_quant.kernels import triton_launch, w8a8_linear, w8a8_triton
from dit_quant.kernels.triton_launch import (
    CachedLauncher,
    TensorDescriptor,
    ceil_div,
    next_power_of_2,
    specialization_key,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _affine_kernel(x_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, ADD_ONE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * alpha
    if ADD_ONE:
        y += 1.0
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _affine(launcher: CachedLauncher, x: torch.Tensor, alpha: float, add_one: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    launcher((triton.cdiv(x.numel(), 128),), (x, out, x.numel(), alpha),
             (("BLOCK", 128), ("ADD_ONE", add_one), ("num_warps", 4)))
    return out


def _affine_reference(x: torch.Tensor, alpha: float, add_one: bool) -> torch.Tensor:
    return (x.double() * alpha + (1.0 if add_one else 0.0)).to(x.dtype)


def test_host_integer_helpers_match_triton():
    """ceil_div / next_power_of_2 (plain Python, for launch arithmetic) agree with Triton's own."""
    for a in [*range(0, 70), 4095, 4096, 4097, 12288, 15360, 2**31 - 1]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64, 128, 256):
            assert ceil_div(a, b) == triton.cdiv(a, b), (a, b)


def test_specialization_key_follows_triton_rules():
    base = torch.empty(64, dtype=torch.bfloat16)
    assert specialization_key([base, base[1:], base[8:]]) == (
        (torch.bfloat16, True), (torch.bfloat16, False), (torch.bfloat16, True))  # [1:] is 2 bytes off
    # Triton turns an int equal to 1 into a constant; ints wider than 32 bits are i64
    assert specialization_key([1, 32, 33, 2**40]) == (1, (True, True, True), (False, True, True),
                                                       (True, False, True))
    assert specialization_key([True, None, 0.5, 2.0]) == ((bool, True), None, float, float)
    if TensorDescriptor is not None:
        descriptor = TensorDescriptor.from_tensor(torch.empty(64, 64, dtype=torch.int8), [32, 16])
        assert specialization_key([descriptor]) == ((torch.int8, (32, 16), "zero"),)
    with pytest.raises(TypeError, match="no specialization rule for a str"):
        specialization_key([base, "text"])


def test_specialization_key_separates_whatever_triton_separates():
    """Two arguments Triton compiles differently for must get different keys (else a kernel compiled for
    one would run the other); checked against Triton's own specialization function over a sample."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.empty(256, dtype=torch.float32)
    samples = [base, base[1:], base[4:], base.to(torch.bfloat16), base.to(torch.bfloat16)[8:],
               base.to(torch.int8)[3:], base.to(torch.int8)[16:], None, True, False, 0.5, -3.0,
               0, 1, -1, 15, 16, 17, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**40, 2**63 - 16, 2**63, 2**64 - 16]
    if TensorDescriptor is not None:
        int8_matrix = torch.empty(64, 64, dtype=torch.int8)
        samples += [TensorDescriptor.from_tensor(int8_matrix, [32, 32]),
                    TensorDescriptor.from_tensor(int8_matrix, [16, 32]),
                    TensorDescriptor.from_tensor(torch.empty(64, 64, dtype=torch.bfloat16), [32, 32])]
    for a in samples:
        for b in samples:
            if native(BaseBackend, a, False, True, True) != native(BaseBackend, b, False, True, True):
                assert specialization_key([a]) != specialization_key([b]), (a, b)


def test_launches_match_reference_on_any_device():
    """On CPU (interpreter) every launch goes through Triton; on a GPU later ones go direct."""
    launcher = CachedLauncher(_affine_kernel)
    x = torch.randn(1000, device=DEVICE, dtype=torch.float32)
    for _ in range(3):
        torch.testing.assert_close(_affine(launcher, x, 0.75, True), _affine_reference(x, 0.75, True))
    expected_direct = 2 if DEVICE.type == "cuda" else 0
    assert launcher.direct_launches == expected_direct


@pytest.mark.gpu
def test_direct_launches_respecialize_on_alignment_dtype_and_constants():
    launcher = CachedLauncher(_affine_kernel)
    buffer = torch.randn(4099, device="cuda", dtype=torch.bfloat16)
    cases = [
        (buffer[:4096], 0.5, False),
        (buffer[1:4097], 0.5, False),  # misaligned view: a kernel compiled for aligned loads would fault
        (buffer[3:4099], -2.0, True),
        (buffer[:4096].float(), 0.5, False),
        (buffer[:1], 3.0, True),  # n == 1 is a constant for Triton
    ]
    for _ in range(2):
        for x, alpha, add_one in cases:
            got = _affine(launcher, x, alpha, add_one)
            torch.testing.assert_close(got, _affine_reference(x, alpha, add_one), rtol=1e-2, atol=1e-2)
    torch.cuda.synchronize()
    assert launcher.direct_launches == len(cases)
    assert len(launcher._entries) == len(cases)


def _random_layer(m: int, k: int, n: int) -> tuple:
    """bf16 input [m, k], int8 weight [n, k], fp32 weight scales and bf16 bias [n], on the GPU."""
    return (torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
            torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
            torch.rand(n, device="cuda") * 1e-3 + 1e-4, torch.randn(n, device="cuda", dtype=torch.bfloat16))


W8A8_LAUNCHERS = (w8a8_triton._quantize_rows_launcher, w8a8_triton._pointer_gemm_launcher,
                  w8a8_triton._tma_gemm_launcher, w8a8_triton._gemv_launcher)


def _one_config_per_kind():
    if not torch.cuda.is_available():
        return []
    cc = w8a8_triton.arch_key(torch.cuda.get_device_capability())
    configs = [c for regime in ("small", "mid", "large") for c in w8a8_triton.candidate_configs(cc, regime)]
    return list({c.kind: c for c in reversed(configs)}.values())


@pytest.mark.gpu
@pytest.mark.parametrize("config", _one_config_per_kind(), ids=str)
def test_w8a8_linear_direct_launch_is_bit_identical_to_triton_path(monkeypatch, config):
    """Each kernel kind, the GEMM prepared before the quantization launch: direct launches give the same
    bits as Triton's own path, and both match the torch reference."""
    torch.manual_seed(0)
    for m, k, n in ((16, 512, 768), (300, 1024, 512), (2048, 1024, 1024)):
        x, weight, scale, bias = _random_layer(m, k, n)
        before = sum(launcher.direct_launches for launcher in W8A8_LAUNCHERS)
        direct = [w8a8_triton.w8a8_linear_triton(x, weight, scale, bias, None, config) for _ in range(3)][-1]
        assert sum(launcher.direct_launches for launcher in W8A8_LAUNCHERS) > before
        monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", False)
        through_triton = w8a8_triton.w8a8_linear_triton(x, weight, scale, bias, None, config)
        monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", True)
        assert torch.equal(direct, through_triton)
        reference = w8a8_linear(x, weight, scale, bias, backend="torch")
        torch.testing.assert_close(direct, reference, rtol=2e-2, atol=2e-2)


@triton.jit
def _scaled_copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, FACTOR: tl.constexpr = 2):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * FACTOR, mask=mask)


def test_a_defaulted_constexpr_keeps_tritons_path():
    """The direct path needs every constexpr's value; one left to its default keeps Triton's launch."""
    launcher = CachedLauncher(_scaled_copy_kernel)
    x = torch.randn(300, device=DEVICE)
    for _ in range(3):
        out = torch.empty_like(x)
        launcher((3,), (x, out, 300), (("BLOCK", 128),))
        torch.testing.assert_close(out, x * 2)
    assert launcher.direct_launches == 0
    positional = CachedLauncher(_affine_kernel)  # a constexpr passed positionally: its value is not keyed
    for block in (64, 128, 64):
        out = torch.empty_like(x)
        positional((triton.cdiv(300, block),), (x, out, 300, 1.5, block), (("ADD_ONE", False),))
        torch.testing.assert_close(out, x * 1.5)
    assert positional.direct_launches == 0


def test_gemm_row_parts_cover_the_rows_as_the_tail_rule_says():
    """Main launch over the row blocks that fill whole waves, tail launches over the rest, in order."""
    wide = w8a8_triton.GemmConfig("tma", 128, 256, 128, 8, 8, 4, split_epilogue=True)
    tail = w8a8_triton.GemmConfig("tma", 64, 128, 128, 8, 4, 4)
    with_tail = replace(wide, tail=tail)
    for m, n, slots in ((4608, 3072, 132), (1000, 3072, 132), (64, 512, 4), (4096, 3072, 132), (300, 512, 4)):
        assert w8a8_triton.gemm_row_parts(wide, m, n, slots) == [(wide, 0, m)]
        parts = w8a8_triton.gemm_row_parts(with_tail, m, n, slots)
        start = w8a8_triton.tail_start_row(m, n, with_tail, slots)
        expected = ([(with_tail, 0, m)] if start == m else [(tail, 0, m)] if start == 0
                    else [(with_tail, 0, start), (tail, start, m)])
        assert parts == expected, (m, n, slots)
    # 4608x3072 outputs: 432 tiles of 128x256, 396 fill 3 waves of 132 = 33 row blocks = 4224 rows
    rows = [part[1:] for part in w8a8_triton.gemm_row_parts(with_tail, 4608, 3072, 132)]
    assert rows == [(0, 4224), (4224, 4608)]


def test_linear_plan_key_separates_what_specializes_the_launches():
    buffer = torch.randn(2 * 64 * 256 + 8, dtype=torch.bfloat16)
    x = buffer[: 64 * 256].view(64, 256)
    weight = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    scale, bias = torch.rand(128), torch.randn(128, dtype=torch.bfloat16)
    key = w8a8_triton.linear_plan_key(x, weight, scale, bias, None)
    assert key == w8a8_triton.linear_plan_key(x.clone(), weight, scale, bias, None)  # fresh input, same plan
    others = [
        buffer[1 : 1 + 64 * 256].view(64, 256),  # misaligned
        buffer[: 32 * 256].view(32, 256),  # another M
        x.float(),  # another dtype
    ]
    for other in others:
        assert w8a8_triton.linear_plan_key(other, weight, scale, bias, None) != key
    assert w8a8_triton.linear_plan_key(x, weight.clone(), scale, bias, None) != key  # another layer
    assert w8a8_triton.linear_plan_key(x, weight, scale, bias.float(), None) != key
    assert w8a8_triton.linear_plan_key(x, weight, scale, None, None) != key
    assert w8a8_triton.linear_plan_key(x, weight, scale, bias, torch.rand(256)) != key


def _plan_configs():
    configs = _one_config_per_kind()
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        configs.append(w8a8_triton._HOPPER_WIDE_WITH_TAILS[1])  # main + tail launch over row slices
    return configs


@pytest.mark.gpu
@pytest.mark.parametrize("config", _plan_configs(), ids=str)
def test_linear_plan_is_bit_identical_to_the_general_path(config):
    torch.manual_seed(1)
    for m, k, n in ((16, 512, 768), (300, 1024, 512), (4608, 512, 3072)):
        x, weight, scale, bias = _random_layer(m, k, n)
        general = w8a8_triton.w8a8_linear_triton(x, weight, scale, bias, None, config)
        plan = w8a8_triton.build_linear_plan(x, weight, scale, bias, None, config)
        assert plan is not None
        before = sum(launcher.direct_launches for launcher in W8A8_LAUNCHERS)
        x_again = x.clone()  # another tensor of the same signature
        planned = plan.linear(x_again, weight, scale, bias, None, triton_launch.current_stream()[1])
        assert sum(launcher.direct_launches for launcher in W8A8_LAUNCHERS) > before
        assert torch.equal(planned, general), (m, k, n)
        if config.kind == "gemv":  # quantizes its own rows: no GEMM of quantized rows
            continue
        q, q_scale = w8a8_triton.quantize_rows_triton(x)
        general = w8a8_triton.int8_gemm_triton(q, q_scale, weight, scale, bias, torch.bfloat16, config)
        plan = w8a8_triton.build_gemm_plan(q, q_scale, weight, scale, bias, torch.bfloat16, config)
        assert plan is not None
        stream = triton_launch.current_stream()[1]
        planned = plan.gemm(q.clone(), q_scale.clone(), weight, scale, bias, stream)
        assert torch.equal(planned, general), (m, k, n)


@pytest.mark.gpu
def test_public_linear_plans_per_signature_streams_and_graphs():
    """The public call binds a plan after its first call per input signature; a misaligned input gets
    its own; plans launch on the caller's stream and record into CUDA graphs."""
    from dit_quant.kernels import dispatch

    torch.manual_seed(2)
    dispatch._linear_plans.clear()
    m, k, n = 300, 1024, 512
    weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scale = torch.rand(n, device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    buffer = torch.randn(m * k + 8, device="cuda", dtype=torch.bfloat16)
    for x in (buffer[: m * k].view(m, k), buffer[1 : 1 + m * k].view(m, k)):
        reference = w8a8_linear(x, weight, scale, bias, backend="torch")
        outs = [w8a8_linear(x, weight, scale, bias, backend="triton") for _ in range(3)]
        plan = dispatch._linear_plans[w8a8_triton.linear_plan_key(x, weight, scale, bias, None)]
        assert isinstance(plan, w8a8_triton.LaunchPlan)
        for out in outs:
            torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
            assert torch.equal(out, outs[0])
    assert len(dispatch._linear_plans) == 2

    from dit_quant.kernels import int8_gemm, quantize_rows

    dispatch._gemm_plans.clear()
    q, q_scale = quantize_rows(buffer[: m * k].view(m, k), backend="triton")
    reference = int8_gemm(q, q_scale, weight, scale, bias, torch.bfloat16, backend="torch")
    outs = [int8_gemm(q, q_scale, weight, scale, bias, torch.bfloat16, backend="triton") for _ in range(3)]
    key = w8a8_triton.gemm_plan_key(q, q_scale, weight, scale, bias, torch.bfloat16)
    assert isinstance(dispatch._gemm_plans[key], w8a8_triton.LaunchPlan)
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
        assert torch.equal(out, outs[0])

    x = buffer[: m * k].view(m, k)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = w8a8_linear(x, weight, scale, bias, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, outs[0])

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w8a8_linear(static_x, weight, scale, bias, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static_out = w8a8_linear(static_x, weight, scale, bias, backend="triton")
    fresh = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_out, w8a8_linear(fresh, weight, scale, bias, backend="torch"),
                               rtol=2e-2, atol=2e-2)
