"""The GPU benchmarks in bench/ import, describe themselves and, without a GPU, stop with a clear message.

Their measurements need a GPU (run through the device tool); this keeps a broken import or a traceback on a
machine without CUDA from reaching a user who runs one.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.stem.endswith("_common"))


def _run(script: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent)


def _interpreted(script: str) -> str:
    """Stdout of a Python ``script`` run under the Triton CPU interpreter (which must exit 0)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=BENCH.parent, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _sm90_report(probe: pathlib.Path) -> list[dict]:
    """The JSON lines of a probe's ``--aot`` report (compiled, not interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(probe), "--aot"], capture_output=True, text=True,
                            timeout=300, cwd=BENCH.parent, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_benchmark_is_listed():
    assert len(SCRIPTS) >= 7, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_help_shows_the_docstring(script):
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    first_line = script.read_text().split('"""')[1].splitlines()[0].strip()
    assert " ".join(first_line.split()[:4]) in " ".join(result.stdout.split()), result.stdout[:500]
    assert "--out" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_without_a_gpu_exits_2_with_one_line(script):
    result = _run(script)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"{script.stem} needs a CUDA GPU (torch {torch.__version__} sees none)"


def test_in_gemm_quantization_probe_compiles_for_sm90():
    """The probe's --aot report (no GPU): every variant it would time builds for sm_90 with int8 wgmma,
    fits the H100's 227 KB of shared memory per block and keeps its values in registers."""
    probe = BENCH / "probe_group_scaled_gemm.py"
    reports = _sm90_report(probe)
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(probe.read_text()).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "").endswith("_VARIANTS")}
    variants = lists["GROUP_VARIANTS"] + lists["ROWSCALE_VARIANTS"]
    assert [r["variant"] for r in reports] == [list(v) for v in variants], reports
    for report in reports:
        assert report["wgmma_s8"] and report["shared_bytes"] <= 227 * 1024, report
        assert report["stack_bytes"] == 0, report


def test_in_gemm_quantization_probe_kernels_match_their_schemes():
    """Under the CPU interpreter, the probe's "group" kernels (plain, two K steps per group, skewed)
    match the float64 evaluation of their scheme and its "rowscale" pass + GEMM matches the pack's own
    linear, within bf16 output rounding (max rel. err 1e-2, as the probe requires before timing)."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCH)!r})
import probe_group_scaled_gemm as probe
g = torch.Generator().manual_seed(5)
x = torch.randn(128, 256, generator=g).mul(2.0)
x[:, 3] *= 30.0
x = x.bfloat16()
w = torch.randint(-127, 128, (192, 256), dtype=torch.int8, generator=g)
ws = torch.rand(192, generator=g) * 0.01 + 1e-3
b = torch.randn(192, generator=g).bfloat16()
out = torch.full((128, 192), float("nan"), dtype=torch.bfloat16)
for variant in [(64, 64, 64, 4, 1, 1), (64, 64, 64, 4, 1, 2), (64, 64, 64, 4, 1, -1)]:
    probe.group_scaled_linear(x, w, ws, b, out, variant, 3)
    ref = probe.group_scaled_reference(x, w, ws, b, 64 * abs(variant[5]))
    print(probe.compare(out, ref)["max_rel_err"])
    out.fill_(float("nan"))
scale, inverse = torch.empty(128), torch.empty(128)
probe.rowscale_linear(x, w, ws, b, out, scale, inverse, (64, 64, 64, 4, 1, 0), 3)
print(probe.compare(out, probe.kernels.w8a8_linear(x, w, ws, b).double())["max_rel_err"])
"""
    stdout = _interpreted(script)
    errors = [float(line) for line in stdout.split()]
    assert len(errors) == 4 and all(0.0 <= e < 1e-2 for e in errors), errors


def test_coresident_quantization_probe_writes_the_reference_rows():
    """Under the CPU interpreter, the co-resident probe's strided quantize kernel (rows spread over a few
    programs, each row in several masked steps) writes exactly the reference's int8 rows and scales, as the
    probe checks on the GPU before timing."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCH)!r})
import probe_quant_coresident as probe
from dit_quant.kernels.w8a8_reference import quantize_rows_reference
g = torch.Generator().manual_seed(7)
x = torch.randn(37, 2500, generator=g).mul(3.0)
x[:, 11] *= 40.0
x = x.bfloat16()
q_ref, scale_ref = quantize_rows_reference(x)
q, scale = torch.empty_like(q_ref), torch.empty_like(scale_ref)
print(len(probe.SIDE_WARPS))
for warps in probe.SIDE_WARPS:
    print(probe.writes_reference_rows(lambda: probe.quantize_rows_strided(x, q, scale, 4, warps), q, scale,
                                      q_ref, scale_ref))
"""
    stdout = _interpreted(script)
    count, *checks = stdout.split()
    assert checks == ["True"] * int(count), stdout


def test_overlapped_quantization_probe_matches_todays_linear():
    """Under the CPU interpreter (programs one after another, so the counts are complete before the GEMM
    reads them), the co-resident probe's overlapped linear, which quantizes the first wave's rows with the
    pack's kernel, the rest with the counting strided kernel (rows in registers at K = 128, two passes at
    K = 1104) and runs a GEMM that waits per row block, writes exactly the output of the pack's linear with
    the same tiles; the counts are the rows per block. Its control (every row quantized first, no waits;
    200 rows, so the last block is partial) too, and so does the GEMM alone when no quantize program
    runs beside it: each waiting program gives up and quantizes its row block itself (2 blocks)."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCH)!r})
import probe_quant_coresident as probe
g = torch.Generator().manual_seed(9)
config = probe.wt.GemmConfig("tma", 64, 64, 64, 8, 4, 1)
for k in (128, 1104):
    x = torch.randn(200, k, generator=g).mul(3.0)
    x[:, 5] *= 25.0
    x = x.bfloat16()
    w = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=g)
    ws = torch.rand(64, generator=g) * 0.01 + 1e-3
    expected = probe.wt.w8a8_linear_triton(x, w, ws, None, None, config)
    out = torch.full_like(expected, float("nan"))
    linear = probe.OverlappedLinear(x, w, ws, out, config, 1, 2, 1, None, None)
    linear.run()
    print(linear.head_rows, linear.ready.tolist(), torch.equal(out, expected))
    out.fill_(float("nan"))
    control = probe.OverlappedLinear(x, w, ws, out, config, 1, 2, 1, None, None, wait=False)
    control.run()
    print(control.head_rows, torch.equal(out, expected))
    out.fill_(float("nan"))
    alone = probe.OverlappedLinear(x, w, ws, out, config, 1, 2, 1, None, None, quantize_beside=False,
                                   max_spins=2)
    alone.q.fill_(99)
    alone.run()
    print(alone.fallbacks.item(), torch.equal(out, expected))
"""
    stdout = _interpreted(script)
    assert stdout.split() == ["128", "[0,", "0,", "64,", "8]", "True", "200", "True", "2", "True"] * 2, stdout


def test_coresident_quantization_probe_compiles_for_sm90():
    """The co-resident probe's --aot report (no GPU): its GEMMs build for sm_90 with int8 wgmma, within 227
    KB of shared memory and without spills at every register cap, and every strided quantize program fits
    on an SM beside the waiting GEMM under each cap (which the overlapped version needs to make progress)."""
    probe = BENCH / "probe_quant_coresident.py"
    reports = _sm90_report(probe)
    gemms = [r for r in reports if r["kernel"].endswith("GEMM")]
    sides = [r for r in reports if r["kernel"] == "strided quantize"]
    assert len(gemms) == 6 and len(sides) == 6, reports
    for report in gemms:
        assert report["wgmma_s8"] and report["shared_bytes"] <= 227 * 1024, report
        assert report["stack_bytes"] == 0, report
    for report in sides:
        assert report["stack_bytes"] == 0 and all(report["fits_beside_waiting_gemm"].values()), report
