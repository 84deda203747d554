"""Per-token activation quantization (``quantize_rows``, Triton) at the shapes one Flux step quantizes, and
its share of a step: µs and GB/s (bf16 read + int8 written) per shape, summed with each shape's calls per
step. Checked against the torch reference first (bit-identical int8 rows and scales).

    python bench/bench_quantize_rows.py [--out DIR] [--sweep-warps]

--sweep-warps also times the kernel with every warp count as CUDA-graph replays (GPU time).

Writes bench_quantize_rows.{json,md} to bench/results/ and --out ($OUT).
"""

from __future__ import annotations

import sys

import torch
from w8a8_common import (
    arg_parser,
    environment,
    import_kernels,
    markdown_table,
    require_cuda,
    save_results,
    time_ms,
    writes_reference_rows,
)

# (M tokens, K, calls per flux-dev step at 1024x1024): double blocks (image 4096 / text 512 tokens; qkv,
# proj, mlp0 at K=3072, mlp2 at K=12288), single blocks (4608 tokens; linear1 at 3072, linear2 at 15360),
# modulation (one row, 76 calls).
FLUX_CASES = [
    (4096, 3072, 57),
    (4096, 12288, 19),
    (512, 3072, 57),
    (512, 12288, 19),
    (4608, 3072, 38),
    (4608, 15360, 38),
    (1, 3072, 76),
]


def _sweep_warps(x: torch.Tensor, q_ref: torch.Tensor, scale_ref: torch.Tensor) -> tuple[dict, bool]:
    """GPU ms of the quantize kernel with each warp count (timed as graph replays), and whether every
    variant wrote the reference's bits into poisoned outputs."""
    from dit_quant.kernels import w8a8_triton

    times, same = {}, True
    q, scale = torch.empty_like(q_ref), torch.empty_like(scale_ref)
    for warps in (1, 2, 4, 8, 16, 32):
        def launch(warps=warps):
            w8a8_triton._prepare_quantize(x, None, q, scale, num_warps=warps)()

        same &= writes_reference_rows(launch, q, scale, q_ref, scale_ref)
        times[warps] = time_ms(launch, graph=True)
    return times, same


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--sweep-warps", action="store_true", help="also time every warp count (GPU time)")
    args = parser.parse_args()
    require_cuda("bench_quantize_rows")
    import_kernels()
    from dit_quant.kernels.w8a8_reference import quantize_rows_reference
    from dit_quant.kernels.w8a8_triton import quantize_rows_triton

    results: dict = {"environment": environment(), "cases": []}
    rows, total_ms, status = [], 0.0, 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k, calls in FLUX_CASES:
        x = (torch.randn(m, k, device="cuda", generator=g) * 3).bfloat16()
        q, scale = quantize_rows_triton(x)
        q_ref, scale_ref = quantize_rows_reference(x)
        exact = torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        status |= not exact
        ms = time_ms(lambda x=x: quantize_rows_triton(x))
        graph_ms = time_ms(lambda x=x: quantize_rows_triton(x), graph=True)
        gbps = m * k * 3 / ms / 1e6
        total_ms += ms * calls
        case = {"m": m, "k": k, "calls_per_step": calls, "ms": ms, "graph_ms": graph_ms, "GBps": gbps,
                "matches_reference": exact}
        if args.sweep_warps:
            case["graph_ms_by_warps"], same = _sweep_warps(x, q_ref, scale_ref)
            status |= not same
            print(f"  M={m} K={k} graph us by warps: " + ", ".join(
                f"{w}: {t * 1e3:.1f}" for w, t in case["graph_ms_by_warps"].items()), flush=True)
        results["cases"].append(case)
        rows.append([m, k, calls, f"{ms * 1e3:.1f}", f"{graph_ms * 1e3:.1f}", f"{gbps:.0f}",
                     f"{ms * calls:.2f}", "yes" if exact else "NO"])
        print(
            f"  M={m} K={k}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s, x{calls} = {ms * calls:.2f} ms", flush=True
        )
    results["ms_per_step"] = total_ms
    env = results["environment"]
    markdown = "\n".join(
        [
            f"# quantize_rows at Flux shapes ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
            f"{env['date_utc']})",
            "",
            f"Command: `{env['command']}`",
            "",
            "Median of `triton.testing.do_bench` (L2 flushed); GB/s counts the bf16 read and the int8 write.",
            "",
            markdown_table(["M", "K", "calls/step", "µs", "graph µs", "GB/s", "ms/step", "= reference"],
                           rows),
            "",
            f"Sum over one flux-dev step: {total_ms:.2f} ms",
            "",
        ]
    )
    save_results("bench_quantize_rows", results, markdown, args.out)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
