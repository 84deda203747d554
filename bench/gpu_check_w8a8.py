"""GPU check of the Triton W8A8 linear at Flux shapes: correctness vs the torch reference, then speed vs
bf16 ``F.linear`` in the same run. Writes gpu_check_w8a8.{json,md} to bench/results/ and --out ($OUT).

    python bench/gpu_check_w8a8.py [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

M_VALUES = (1, 77, 1024, 4608)
KN_PAIRS = ((3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072))


def main() -> None:
    parser = arg_parser(__doc__)
    args = parser.parse_args()
    require_cuda("gpu_check_w8a8")
    kernels = import_kernels()
    from dit_quant.kernels.w8a8_autotune import choose_config

    env = environment()
    rows, records, failures = [], [], 0
    for k, n in KN_PAIRS:
        for m in M_VALUES:
            t = layer_inputs(m, k, n, seed=m * 7 + k + n)
            layer = (t["x"], t["weight"], t["weight_scale"], t["bias"])
            q_tri, s_tri = kernels.quantize_rows(t["x"], backend="triton")
            q_ref, s_ref = kernels.quantize_rows(t["x"], backend="torch")
            q_diff = (q_tri.int() - q_ref.int()).abs()
            err = compare(kernels.w8a8_linear(*layer, backend="triton"),
                          kernels.w8a8_linear(*layer, backend="torch"))
            ok = (q_diff.max().item() <= 1 and (q_diff == 0).float().mean().item() >= 0.999
                  and torch.allclose(s_tri, s_ref, rtol=1e-6, atol=0) and err["finite"]
                  and err["max_rel_err"] <= 2.0**-6)
            failures += not ok
            ours = time_ms(lambda layer=layer: kernels.w8a8_linear(*layer, backend="triton"))
            bf16 = time_ms(lambda t=t: F.linear(t["x"], t["weight_bf16"], t["bias"]))
            config = choose_config(t["x"], t["weight"], t["weight_scale"], t["bias"], None)
            tops = 2 * m * n * k / (ours * 1e-3) / 1e12
            records.append({"m": m, "k": k, "n": n, "ok": ok,
                            "q_equal_frac": (q_diff == 0).float().mean().item(),
                            "q_max_diff": q_diff.max().item(), **err, "w8a8_ms": ours, "bf16_ms": bf16,
                            "speedup_vs_bf16": bf16 / ours, "w8a8_tops": tops, "config": str(config)})
            rows.append([m, k, n, "ok" if ok else "FAIL", f"{err['max_rel_err']:.2e}", f"{ours * 1e3:.1f}",
                         f"{bf16 * 1e3:.1f}", f"{bf16 / ours:.2f}", f"{tops:.0f}", config.kind])
            del t, layer, q_tri, q_ref
            torch.cuda.empty_cache()
    headers = ["M", "K", "N", "check", "max rel err", "W8A8 µs", "bf16 µs", "bf16/W8A8", "W8A8 TOPS", "kind"]
    table = markdown_table(headers, rows)
    markdown = (f"# W8A8 GPU check\n\n{env['gpu']} (sm_{env['compute_capability']}), driver {env['driver']}, "
                f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}\n\n"
                f"Command: `{env['command']}` ({env['date_utc']})\n\n"
                "Times: median of triton.testing.do_bench (L2 flushed, eager, quantization included, "
                f"bf16 in/out).\n\n{table}\n")
    save_results("gpu_check_w8a8", {"environment": env, "results": records}, markdown, args.out)
    print(markdown)
    print(f"{failures} failing case(s)")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
