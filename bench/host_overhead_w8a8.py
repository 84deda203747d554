"""Host (CPU) cost per call of each layer of the W8A8 stack, on a GPU, at a shape whose GPU time is tiny
(so a loop of calls is bound by the host): F.linear for scale, an empty Triton launch, each of our
kernels launched directly, the config lookup, the custom op and the public functions (also without
launch plans and through Triton's own launch path). Then a cProfile of the public function.
Writes host_overhead_w8a8.{json,md} to bench/results/ and --out ($OUT).

    python bench/host_overhead_w8a8.py [--out DIR]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton
from w8a8_common import (
    arg_parser,
    environment,
    import_kernels,
    layer_inputs,
    markdown_table,
    require_cuda,
    save_results,
)


@triton.jit
def _empty_kernel(x_ptr):
    pass


def host_us(fn, calls: int = 300) -> float:
    """Mean wall microseconds per call over a loop (one sync at the end)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


# Steps also timed with the cached launcher off (every launch through kernel[grid](...)).
THROUGH_TRITON = ("quantize_rows kernel (direct)", "GEMM kernel launch only", "w8a8_linear (public)")
# Steps also timed without launch plans (DIT_QUANT_LAUNCH_PLANS=0: key, lookup and preparation per launch).
WITHOUT_PLANS = ("w8a8_linear (public)", "int8_gemm (public)")


def _steps(kernels, t: dict, layer: tuple, config) -> dict:
    """name -> callable, one per layer of the stack, for one layer's tensors."""
    from dit_quant.kernels import dispatch, w8a8_triton
    from dit_quant.kernels.w8a8_autotune import choose_config

    m, n = t["x"].shape[0], t["weight"].shape[0]
    q, scale = kernels.quantize_rows(t["x"], backend="triton")
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")

    def gemm_launch():
        if config.kind in w8a8_triton.ONE_LAUNCH_KINDS:
            launcher, *spec = w8a8_triton._one_launch_spec(config, layer[0], *layer[1:], None, out)
            launcher.prepare(*spec)()
        else:
            w8a8_triton._prepare_gemm(config, q, scale, *layer[1:], out)()

    def descriptors():
        w8a8_triton.TensorDescriptor.from_tensor(q, [config.block_m, config.block_k])
        w8a8_triton.TensorDescriptor.from_tensor(layer[1], [config.block_n, config.block_k])
        w8a8_triton.TensorDescriptor.from_tensor(out, [config.block_m, config.block_n])

    return {
        "F.linear (bf16)": lambda: F.linear(t["x"], t["weight_bf16"], t["bias"]),
        "torch.empty (output)": lambda: torch.empty(m, n, dtype=torch.bfloat16, device="cuda"),
        "empty Triton kernel launch": lambda: _empty_kernel[(1,)](out),
        "quantize_rows kernel (direct)": lambda: w8a8_triton.quantize_rows_triton(t["x"]),
        "GEMM kernel launch only": gemm_launch,
        "TensorDescriptor.from_tensor x3": descriptors,
        "w8a8_linear_triton (direct)": lambda: w8a8_triton.w8a8_linear_triton(*layer, None, config),
        "choose_config": lambda: choose_config(*layer, None),
        "resolve_backend": lambda: dispatch.resolve_backend(torch.device("cuda:0"), "triton"),
        "torch.ops.dit_quant.w8a8_linear": lambda: torch.ops.dit_quant.w8a8_linear(*layer, None, "triton"),
        "w8a8_linear (public)": lambda: kernels.w8a8_linear(*layer, backend="triton"),
        "int8_gemm (public)": lambda: kernels.int8_gemm(q, scale, *layer[1:], torch.bfloat16,
                                                        backend="triton"),
    }


def main() -> None:
    parser = arg_parser(__doc__)
    args = parser.parse_args()
    require_cuda("host_overhead_w8a8")
    kernels = import_kernels()
    from dit_quant.kernels import dispatch, triton_launch
    from dit_quant.kernels.w8a8_autotune import choose_config

    env = environment()
    rows, records = [], {}
    for m in (1, 256):
        t = layer_inputs(m, 1024, 1024, seed=1)
        layer = (t["x"], t["weight"], t["weight_scale"], t["bias"])
        config = choose_config(*layer, None)
        steps = _steps(kernels, t, layer, config)
        host = {}
        for name, fn in steps.items():
            host[name] = host_us(fn)
            if name in THROUGH_TRITON:
                triton_launch.DIRECT_LAUNCH = False
                host[f"{name}, Triton's launch path"] = host_us(fn)
                triton_launch.DIRECT_LAUNCH = True
            if name in WITHOUT_PLANS:
                dispatch.USE_PLANS = False
                host[f"{name}, without launch plans"] = host_us(fn)
                dispatch.USE_PLANS = True
        records[m] = {"config": str(config), "host_us": host}
        rows += [[m, name, f"{us:.1f}"] for name, us in host.items()]
        if m == 1:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(300):
                kernels.w8a8_linear(*layer, backend="triton")
            torch.cuda.synchronize()
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
            records["profile_public_m1"] = stream.getvalue()
    markdown = (f"# Host cost per call of the W8A8 stack\n\n{env['gpu']}, torch {env['torch']}, triton "
                f"{env['triton']}\n\nCommand: `{env['command']}` ({env['date_utc']})\n\nK = N = 1024; mean "
                "wall µs per call over 300 calls (GPU time per call is far below these).\n\n"
                + markdown_table(["M", "step", "host µs/call"], rows) + "\n")
    save_results("host_overhead_w8a8", {"environment": env, "results": records}, markdown, args.out)
    print(markdown)
    print(records["profile_public_m1"])


if __name__ == "__main__":
    main()
