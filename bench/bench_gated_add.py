"""Gated residual update of a DiT block, ``x += gate * linear(h)``, at the Flux shapes of the fused blocks:
the W8A8 GEMM with the add in its epilogue (``int8_gemm_gated_add``; on Hopper a TMA reduce-add) against
the GEMM writing a new tensor followed by ``x.addcmul_`` (the fused blocks before), both on int8 rows
already quantized, as the fused producers emit them. Each path is checked against the torch reference
first.

    python bench/bench_gated_add.py [--out DIR]

Times are medians of triton.testing.do_bench (L2 flushed), eager and as CUDA-graph replays (GPU time); the
ratio is the two-kernel path's time over the fused one's (> 1: the fused epilogue is faster).
Writes bench_gated_add.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import torch
from w8a8_common import (
    arg_parser,
    compare,
    environment,
    import_kernels,
    layer_inputs,
    markdown_table,
    require_cuda,
    save_results,
    time_ms,
)

# (batch, tokens, K, N, calls per flux-dev step at 1024x1024): double blocks' attention out (K 3072) and
# MLP out (K 12288) for the image (4096 tokens) and text (512) streams, single blocks' linear2 (4608 tokens,
# K 15360); the batch-2 rows exercise per-sample gates.
CASES = [
    (1, 4096, 3072, 3072, 19),
    (1, 4096, 12288, 3072, 19),
    (1, 512, 3072, 3072, 19),
    (1, 512, 12288, 3072, 19),
    (1, 4608, 15360, 3072, 38),
    (2, 4608, 15360, 3072, 0),
]


def _time_case(kernels, batch: int, tokens: int, k: int, n: int) -> dict:
    """Both paths at one shape: error against the torch reference, eager and graph milliseconds."""
    t = layer_inputs(batch * tokens, k, n, seed=tokens + k + batch)
    q, scale = kernels.quantize_rows(t["x"])
    layer = (q, scale, t["weight"], t["weight_scale"], t["bias"])
    g = torch.Generator(device="cuda").manual_seed(k)
    gate = (torch.randn(batch, 1, n, device="cuda", generator=g) * 0.1).bfloat16()
    start = (torch.randn(batch, tokens, n, device="cuda", generator=g) * 4).bfloat16()
    expected = start.clone()
    kernels.int8_gemm_gated_add(*layer, gate, expected, backend="torch")
    x = start.clone()

    def two_kernels():
        x.addcmul_(kernels.int8_gemm(*layer, torch.bfloat16).view(batch, tokens, n), gate)

    def fused():
        kernels.int8_gemm_gated_add(*layer, gate, x)

    record = {"batch": batch, "tokens": tokens, "k": k, "n": n, "paths": {}}
    for name, fn in (("two kernels", two_kernels), ("fused", fused)):
        x.copy_(start)
        fn()
        error = compare(x, expected)
        record["paths"][name] = {**error, "ms": time_ms(fn), "graph_ms": time_ms(fn, graph=True)}
    return record


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--stem", default="bench_gated_add", help="result file name (without suffix)")
    args = parser.parse_args()
    require_cuda("bench_gated_add")
    kernels = import_kernels()
    env = environment()
    rows, records = [], []
    per_step = {"two kernels": 0.0, "fused": 0.0}
    for batch, tokens, k, n, calls in CASES:
        record = _time_case(kernels, batch, tokens, k, n)
        record["calls_per_step"] = calls
        records.append(record)
        two, one = record["paths"]["two kernels"], record["paths"]["fused"]
        for name, entry in record["paths"].items():
            per_step[name] += calls * entry["graph_ms"]
        rows.append([batch, tokens, k, n, f"{two['graph_ms'] * 1e3:.1f}", f"{one['graph_ms'] * 1e3:.1f}",
                     f"{two['graph_ms'] / one['graph_ms']:.3f}", f"{two['ms'] / one['ms']:.3f}",
                     f"{two['max_rel_err']:.1e}", f"{one['max_rel_err']:.1e}", calls])
        print(f"B={batch} L={tokens} K={k} N={n}: two kernels {two['graph_ms'] * 1e3:.1f} us, fused "
              f"{one['graph_ms'] * 1e3:.1f} us (graph)", flush=True)
    headers = ["B", "tokens", "K", "N", "GEMM + addcmul_ µs (graph)", "fused µs (graph)", "ratio (graph)",
               "ratio (eager)", "GEMM + addcmul_ max rel err", "fused max rel err", "calls/step"]
    summary = {f"{name}_ms_per_flux_step": value for name, value in per_step.items()}
    markdown = "\n".join([
        f"# Gated residual add in the W8A8 GEMM epilogue ({env['gpu']}, driver {env['driver']}, torch "
        f"{env['torch']}, triton {env['triton']})", "",
        f"Command: `{env['command']}` ({env['date_utc']})", "",
        __doc__.split("\n\n")[0], "", markdown_table(headers, rows), "",
        f"Per flux-dev step (graph µs × calls): GEMM + addcmul_ {per_step['two kernels']:.2f} ms, fused "
        f"{per_step['fused']:.2f} ms.", ""])
    save_results(args.stem, {"environment": env, "summary": summary, "results": records}, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
