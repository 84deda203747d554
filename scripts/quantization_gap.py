"""Model of what keeps the per-layer W8A8 median below a target, from recorded benchmark results (no GPU).

    python scripts/quantization_gap.py [--layers bench/results/bench_w8a8_layers_large_run18.json]
                                       [--quantize bench/results/bench_quantize_rows_run18.json]

The activation quantization pass is fitted as ``fixed µs + 3 bytes per element / rate`` (least squares over
the quantize benchmark's cases with M >= 1024, CUDA-graph times). For every pair with M >= 1024 in the
per-layer results, the GEMM part is taken as our graph time less that fit, and the median speed-up over
bf16 (graph times) is printed as measured and for what-ifs: the pass removed, the GEMM part no slower
than cuBLAS's fp8 GEMM alone, and both of those with the pass kept but 3 µs cheaper. A model, not a
measurement: it says which change could reach a target, not what a change would measure.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
BYTES_PER_ELEMENT = 3  # bf16 read + int8 write
LARGE_M = 1024  # the pairs the per-layer target is about (M >= LARGE_M)
FIXED_COST_CUT_US = 3.0  # the last what-if: the pass this much cheaper per call
DEFAULT_LAYERS = RESULTS / "bench_w8a8_layers_large_run18.json"
DEFAULT_QUANTIZE = RESULTS / "bench_quantize_rows_run18.json"


def fit_quantize_cost(cases: list[dict]) -> tuple[float, float]:
    """(fixed µs, µs per byte) of the quantize pass, least squares over cases with M >= LARGE_M."""
    points = [(BYTES_PER_ELEMENT * c["m"] * c["k"], c["graph_ms"] * 1e3) for c in cases if c["m"] >= LARGE_M]
    if len(points) < 2:
        raise ValueError(f"the quantize results need two cases with M >= {LARGE_M} to fit a fixed cost "
                         "and a rate")
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def modelled_medians(layers: list[dict], fixed_us: float, us_per_byte: float) -> dict[str, float]:
    """Median speed-up over bf16 (graph times) of the M >= LARGE_M pairs, as measured and per what-if
    (``layers``: the per-layer benchmark's ``results``, keyed by its path names)."""
    names = ("as measured", "without the quantization pass", "GEMM part as fast as cuBLAS fp8",
             f"GEMM part as fast as cuBLAS fp8, pass {FIXED_COST_CUT_US:g} us cheaper")
    cases: dict[str, list[float]] = {name: [] for name in names}
    for row in layers:
        if row["m"] < LARGE_M:
            continue
        paths = row["paths"]
        bf16 = paths["bf16 F.linear"]["graph_ms"] * 1e3
        ours = paths["W8A8 (ours)"]["graph_ms"] * 1e3
        fp8_gemm = paths["fp8 rowwise GEMM only"]["graph_ms"] * 1e3
        quantize = fixed_us + us_per_byte * BYTES_PER_ELEMENT * row["m"] * row["k"]
        best_gemm = min(ours - quantize, fp8_gemm)
        times_us = (ours, ours - quantize, best_gemm + quantize, best_gemm + quantize - FIXED_COST_CUT_US)
        for name, time_us in zip(cases, times_us, strict=True):
            cases[name].append(bf16 / time_us)
    if not cases["as measured"]:
        raise ValueError(f"the per-layer results have no pair with M >= {LARGE_M}")
    return {name: statistics.median(speedups) for name, speedups in cases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=pathlib.Path, default=DEFAULT_LAYERS)
    parser.add_argument("--quantize", type=pathlib.Path, default=DEFAULT_QUANTIZE)
    args = parser.parse_args()
    layers = json.loads(args.layers.read_text())["results"]
    fixed_us, us_per_byte = fit_quantize_cost(json.loads(args.quantize.read_text())["cases"])
    print(f"quantization pass: {fixed_us:.1f} us + {BYTES_PER_ELEMENT} bytes/element "
          f"at {1e-6 / us_per_byte:.2f} TB/s")
    for name, median in modelled_medians(layers, fixed_us, us_per_byte).items():
        print(f"{name:55s} median {median:.3f}x bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
