"""scripts/quantization_gap.py: the fit of the quantize pass and the modelled per-layer medians."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("quantization_gap", ROOT / "scripts" / "quantization_gap.py")
gap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gap)


def test_fit_recovers_a_fixed_cost_and_a_rate():
    rng = random.Random(7)
    fixed_us, tb_per_s = rng.uniform(2, 8), rng.uniform(2, 5)
    cases = [{"m": m, "k": k, "graph_ms": (fixed_us + 3 * m * k / (tb_per_s * 1e6)) / 1e3}
             for m in (1024, 4096, 9216) for k in (3072, 12288)]
    cases.append({"m": 16, "k": 3072, "graph_ms": 1.0})  # small M is left out of the fit
    fitted_fixed, us_per_byte = gap.fit_quantize_cost(cases)
    assert fitted_fixed == pytest.approx(fixed_us, rel=1e-9)
    assert 1e-6 / us_per_byte == pytest.approx(tb_per_s, rel=1e-9)


def test_fit_needs_two_large_cases():
    with pytest.raises(ValueError, match="two cases"):
        gap.fit_quantize_cost([{"m": 4096, "k": 3072, "graph_ms": 0.01}])


def _row(m, k, bf16_us, ours_us, fp8_us):
    return {"m": m, "k": k, "paths": {"bf16 F.linear": {"graph_ms": bf16_us / 1e3},
                                      "W8A8 (ours)": {"graph_ms": ours_us / 1e3},
                                      "fp8 rowwise GEMM only": {"graph_ms": fp8_us / 1e3}}}


def test_what_ifs_on_a_hand_checked_pair():
    # fixed 5 us, 1 us per 3 MB: M*K = 3e6 elements -> the pass costs 5 + 3 = 8 us of ours' 100 us
    rows = [_row(1000 * 3, 1000, bf16_us=160.0, ours_us=100.0, fp8_us=90.0), _row(16, 3072, 1.0, 1.0, 1.0)]
    medians = gap.modelled_medians(rows, fixed_us=5.0, us_per_byte=1e-6 / 3)
    assert medians["as measured"] == pytest.approx(1.6)
    assert medians["without the quantization pass"] == pytest.approx(160 / 92)
    assert medians["GEMM part as fast as cuBLAS fp8"] == pytest.approx(160 / 98)
    assert medians["GEMM part as fast as cuBLAS fp8, pass 3 us cheaper"] == pytest.approx(160 / 95)


def test_recorded_run_matches_its_own_summary():
    record = json.loads(gap.DEFAULT_LAYERS.read_text())
    quantize_cases = json.loads(gap.DEFAULT_QUANTIZE.read_text())["cases"]
    fixed_us, us_per_byte = gap.fit_quantize_cost(quantize_cases)
    medians = gap.modelled_medians(record["results"], fixed_us, us_per_byte)
    recorded_median = record["summary"]["graph_median_speedup_vs_bf16_m_ge_1024"]
    assert medians["as measured"] == pytest.approx(recorded_median)
    assert medians["without the quantization pass"] > medians["as measured"]
