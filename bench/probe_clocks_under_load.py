"""Sustained throughput, SM clock and power of bf16, cuBLAS fp8 and our W8A8 GEMMs under a long load.

Is the 8-bit ceiling at ~60% of the int8 peak a kernel limit or a power/clock limit? Each path runs as
CUDA-graph replays (20 calls per graph) for --seconds while a thread samples nvidia-smi (SM clock, power,
temperature) every 0.2 s; ours is checked against the torch reference first. The table gives TOPS from
the GPU time of the loop and the median samples of its second half (after the clocks settle).
Writes probe_clocks_under_load.{json,md}.

    python bench/probe_clocks_under_load.py [--seconds 4] [--out DIR]
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

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
)

SHAPES = ((4608, 12288, 3072), (4608, 3072, 21504))  # Flux: FFN down, single-block linear1
CALLS_PER_GRAPH = 20
QUERY = "clocks.sm,power.draw,temperature.gpu"


def _sample(stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            line = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                   "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            samples.append((time.perf_counter(), *map(float, line.strip().split(","))))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        stop.wait(0.2)


def sustained(fn, flops: float, seconds: float) -> dict:
    """Replays a graph of CALLS_PER_GRAPH calls of fn for ``seconds``; TOPS and clock/power medians."""
    from dit_quant.kernels.cuda_graphs import graph_of  # importable once main() has run import_kernels()

    graph = graph_of(fn, CALLS_PER_GRAPH)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(stop, samples), daemon=True)
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    sampler.start()
    started = time.perf_counter()
    start_event.record()
    replays = 0
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            graph.replay()
        replays += 10
        torch.cuda.synchronize()  # keeps the host's queue short, so the sampled window matches the load
    end_event.record()
    torch.cuda.synchronize()
    stop.set()
    sampler.join()
    gpu_s = start_event.elapsed_time(end_event) / 1e3
    settled = [s for s in samples if s[0] >= started + seconds / 2] or samples
    return {
        "tops": flops * replays * CALLS_PER_GRAPH / gpu_s / 1e12,
        "us_per_call": gpu_s / (replays * CALLS_PER_GRAPH) * 1e6,
        "sm_clock_mhz": statistics.median(s[1] for s in settled) if settled else None,
        "power_w": statistics.median(s[2] for s in settled) if settled else None,
        "temperature_c": max(s[3] for s in settled) if settled else None,
        "samples": len(settled),
    }


def _paths(t: dict, kernels) -> dict:
    """name -> callable: bf16 F.linear, ours, and cuBLAS's fp8 GEMM with operands already fp8 (sm_89+)."""
    x, w, ws, bias = t["x"], t["weight"], t["weight_scale"], t["bias"]
    paths = {"bf16 F.linear": lambda: F.linear(x, t["weight_bf16"], bias),
             "W8A8 (ours)": lambda: kernels.w8a8_linear(x, w, ws, bias, backend="triton")}
    if torch.cuda.get_device_capability() >= (8, 9):
        x_fp8, w_fp8 = x.to(torch.float8_e4m3fn), t["weight_bf16"].to(torch.float8_e4m3fn)
        ones_m = torch.ones(x.shape[0], 1, device="cuda")
        ones_n = torch.ones(1, w.shape[0], device="cuda")
        paths["fp8 rowwise GEMM only"] = lambda: torch._scaled_mm(
            x_fp8, w_fp8.t(), scale_a=ones_m, scale_b=ones_n, bias=bias, out_dtype=torch.bfloat16)
    return paths


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="load time per path and shape")
    args = parser.parse_args()
    require_cuda("probe_clocks_under_load")
    kernels = import_kernels()
    env = environment()
    env["limits"] = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm,power.limit", "--format=csv",
                                    "-i", "0"], capture_output=True, text=True, timeout=30).stdout.strip()
    records, rows = [], []
    for m, k, n in SHAPES:
        t = layer_inputs(m, k, n, seed=m + k + n)
        paths = _paths(t, kernels)
        layer = (t["x"], t["weight"], t["weight_scale"], t["bias"])
        check = compare(paths["W8A8 (ours)"](), kernels.w8a8_linear(*layer, backend="torch"))
        print(f"M={m} K={k} N={n}: ours against the torch reference {check}", flush=True)
        for name, fn in paths.items():
            result = {"m": m, "k": k, "n": n, "path": name, **sustained(fn, 2.0 * m * k * n, args.seconds)}
            if name == "W8A8 (ours)":
                result["check"] = check
            records.append(result)
            rows.append([m, k, n, name, f"{result['us_per_call']:.1f}", f"{result['tops']:.0f}",
                         result["sm_clock_mhz"], result["power_w"], result["temperature_c"]])
            print(rows[-1], flush=True)
            time.sleep(1.0)  # let the clocks recover between paths
    markdown = (
        f"# Sustained GEMM throughput, SM clock and power\n\n{env['gpu']}, driver {env['driver']}, torch "
        f"{env['torch']}, triton {env['triton']}; limits: {env['limits']!r}\n\n"
        f"Command: `{env['command']}` ({env['date_utc']})\n\n"
        f"CUDA-graph replays of {CALLS_PER_GRAPH} calls for {args.seconds} s per row; clock/power: median "
        "nvidia-smi samples of the second half; TOPS = 2·M·K·N per call over the loop's GPU time "
        "(W8A8 includes its activation quantization).\n\n"
        + markdown_table(["M", "K", "N", "path", "µs/call", "TOPS", "SM MHz", "power W", "max °C"], rows)
        + "\n")
    save_results("probe_clocks_under_load", {"environment": env, "results": records}, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
