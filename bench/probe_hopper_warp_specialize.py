"""Does Triton's automatic warp specialization run on this GPU? A probe for the W8A8 GEMM's next step.

Triton 3.6 compiles ``tl.range(..., warp_specialize=True)`` on sm_90 into a warp-specialized kernel
(num_warps=4 becomes 12 warps: one TMA producer group and two wgmma consumer groups), but its docs say
the feature is for Blackwell. This probe launches the same small TMA GEMM with and without it, fp16 and
int8, each case in its own process under a time limit (a hung kernel cannot be interrupted from
Python), checks every finished result against a float64 reference and times it against cuBLAS.

    python bench/probe_hopper_warp_specialize.py [--timeout-s 30] [--out DIR]

Writes probe_hopper_warp_specialize.{json,md} to bench/results/ and --out ($OUT). Re-run it after a
Triton upgrade: if the warp-specialized int8 case runs and beats the control, the persistent TMA GEMM
(kernels/w8a8_triton.py) is worth porting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import triton
import triton.language as tl
from w8a8_common import arg_parser, environment, markdown_table, require_cuda, save_results, time_ms

M, K, N = 4608, 3072, 12288  # a Flux single-block linear1-sized product
CASES = {  # name -> (int8 operands, row/column scales in the epilogue, warp-specialized K loop)
    "fp16 control": (False, False, False),
    "fp16 warp-specialized": (False, False, True),
    "int8 control": (True, True, False),
    "int8 warp-specialized": (True, False, True),
    "int8 + scales warp-specialized": (True, True, True),
}
BLOCK_M, BLOCK_N, STAGES = 128, 256, 3


@triton.jit
def _probe_gemm_kernel(a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INT8: tl.constexpr, SCALES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of a @ b.T per program (M, N multiples of the tile), bf16 out."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    off_m = (tl.program_id(0) // tiles_n) * BLOCK_M
    off_n = (tl.program_id(0) % tiles_n) * BLOCK_N
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([off_m, k])
        b = b_desc.load([off_n, k])
        if INT8:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b.T, acc)
    out = acc.to(tl.float32)
    if SCALES:
        out = out * tl.load(a_scale_ptr + rows)[:, None] * tl.load(b_scale_ptr + cols)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(tl.bfloat16))


def run_case(name: str) -> dict:
    """Launch, check and time one case in this process."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    int8, scales, warp_specialize = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    if int8:
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
        block_k, cublas = 128, (lambda: torch._int_mm(a, b.T))
    else:
        a = torch.randn(M, K, device="cuda", generator=g).half()
        b = torch.randn(N, K, device="cuda", generator=g).half()
        block_k, cublas = 64, (lambda: a @ b.T)
    a_scale = torch.rand(M, device="cuda", generator=g) + 0.5
    b_scale = torch.rand(N, device="cuda", generator=g) + 0.5
    ref = a.double() @ b.double().T
    if scales:
        ref = ref * a_scale.double()[:, None] * b_scale.double()[None, :]
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, block_k])
    b_desc = TensorDescriptor.from_tensor(b, [BLOCK_N, block_k])

    def launch():
        _probe_gemm_kernel[((M // BLOCK_M) * (N // BLOCK_N),)](
            a_desc, b_desc, out, a_scale, b_scale, N, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
            INT8=int8, SCALES=scales, WARP_SPECIALIZE=warp_specialize, num_warps=4, num_stages=STAGES)

    launch()
    torch.cuda.synchronize()
    rel_err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    us = time_ms(launch, graph=True) * 1e3
    return {"status": "ran", "rel_err": rel_err, "us": us, "tops": 2 * M * N * K / us / 1e6,
            "cublas_us": time_ms(cublas, graph=True) * 1e3}


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="limit per case (a hang is killed)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in a child
    args = parser.parse_args()
    if args.case:  # child process
        print(json.dumps(run_case(args.case)), flush=True)
        return 0
    require_cuda("probe_hopper_warp_specialize")
    results: dict = {"environment": environment(), "shape": {"m": M, "k": K, "n": N}, "cases": {}}
    rows, status = [], 0
    for name in CASES:
        try:
            child = subprocess.run([sys.executable, "-u", __file__, "--case", name], capture_output=True,
                                   text=True, timeout=args.timeout_s)
            lines = child.stdout.strip().splitlines()
            result = (json.loads(lines[-1]) if child.returncode == 0 and lines
                      else {"status": "failed", "error": child.stderr.strip().splitlines()[-1:]})
        except subprocess.TimeoutExpired:
            result = {"status": f"hung (killed after {args.timeout_s:.0f} s)"}
        results["cases"][name] = result
        correct = result["status"] == "ran" and result["rel_err"] < 1e-2
        if "control" in name and not correct:
            status = 1  # the probe itself is broken if the plain kernel does not run correctly
        print(f"  {name}: {result}", flush=True)
        rows.append([name, result["status"], *(
            [f"{result['rel_err']:.1e}", f"{result['us']:.1f}", f"{result['tops']:.0f}",
             f"{result['cublas_us']:.1f}"] if result["status"] == "ran" else ["-"] * 4)])
    env = results["environment"]
    markdown = "\n".join([
        f"# Triton warp specialization probe ({env['gpu']}, driver {env['driver']}, torch {env['torch']}, "
        f"triton {env['triton']}, {env['date_utc']})", "",
        f"Command: `{env['command']}`", "",
        f"{M}x{K} @ {N}x{K}.T, {BLOCK_M}x{BLOCK_N} tiles, {STAGES} stages, num_warps=4; CUDA-graph timing.",
        "",
        markdown_table(["case", "status", "rel err vs float64", "µs", "TFLOP/s or TOPS", "cuBLAS µs"], rows),
        "",
    ])
    save_results("probe_hopper_warp_specialize", results, markdown, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
