"""Ahead-of-time compile of the GGUF Triton kernels for sm_80/86/89/90 without a GPU.

Proves on a CPU-only machine that the fused dequantize-and-multiply kernel builds (PTX + ptxas cubin) with
the tiles :func:`default_config` picks on each architecture, fits its shared memory, and runs on the
tensor cores (wgmma on sm_90, mma.sync elsewhere); likewise the INT8 Q8_0 kernel (s8 MMA) and the
dequantization kernel. Needs a Triton that carries ptxas (the 3.9 wheel does).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHS = {80: (8, 0), 86: (8, 6), 89: (8, 9), 90: (9, 0)}
SMEM_LIMIT_KB = {80: 163, 86: 99, 89: 99, 90: 227}
M_CLASSES = (1, 4608)  # the smallest and the largest default tiles
FUSED_CHECKED = ("Q8_0", "Q4_K", "Q6_K")  # the byte-heaviest legacy and K-quant layouts


def compile_all() -> dict[str, dict]:
    """Compile every case; runs in a subprocess without TRITON_INTERPRET (the interpreter's kernel objects
    cannot be compiled)."""
    from dit_quant.kernels import gguf_dequant_triton as dq
    from dit_quant.kernels import gguf_matmul_triton as mm
    from triton.backends.compiler import GPUTarget

    def build(fn, signature, constexprs, cc, warps, stages, aligned):
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in aligned}
        kernel = triton.compile(
            triton.compiler.ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        ptx = kernel.asm["ptx"]
        return {
            "shared": kernel.metadata.shared,
            "cubin_bytes": len(kernel.asm["cubin"]),
            "wgmma_bf16": bool(re.search(r"wgmma\.mma_async\S*\.bf16\.bf16", ptx)),
            "mma_bf16": bool(re.search(r"mma\.sync\S*\.bf16\.bf16", ptx)),
            "wgmma_s8": bool(re.search(r"wgmma\.mma_async\S*\.s8\.s8", ptx)),
            "mma_s8": bool(re.search(r"mma\.sync\S*\.s8\.s8", ptx)),
        }

    gemm_args = {
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_xm": "i32",
        "stride_om": "i32",
        "row_bytes": "i32",
        "M_BUCKET": "i32",
    }
    aligned = {
        "x_ptr",
        "xq_ptr",
        "xs_ptr",
        "w_ptr",
        "bias_ptr",
        "out_ptr",
        "K",
        "stride_xm",
        "stride_om",
        "row_bytes",
    }

    def plain(kernel):  # the JIT function itself when DIT_QUANT_GGUF_AUTOTUNE=1 wraps it in an autotuner
        return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel

    fused, int8 = plain(mm._gguf_matmul_kernel), plain(mm._q8_0_int8_kernel)
    results = {}
    for cc, capability in ARCHS.items():
        for m in M_CLASSES:
            config = mm.default_config(m, capability)
            tiles = dict(
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=8, HAS_BIAS=True, RNE_BF16=False
            )
            for qtype in FUSED_CHECKED:
                signature = dict(gemm_args, x_ptr="*bf16", w_ptr="*u8", bias_ptr="*bf16", out_ptr="*bf16")
                constexprs = dict(
                    tiles,
                    QTYPE=mm._QTYPE_ID[qtype],
                    TYPE_SIZE=mm.BLOCK_LAYOUT[qtype][1],
                    RUN=mm._RUN[qtype],
                    DOT_F32=False,
                )
                results[f"sm{cc}-fused-{qtype}-m{m}"] = build(
                    fused, signature, constexprs, cc, config.num_warps, config.num_stages, aligned
                )
            signature = dict(
                gemm_args, xq_ptr="*i8", xs_ptr="*fp32", w_ptr="*u8", bias_ptr="*bf16", out_ptr="*bf16"
            )
            results[f"sm{cc}-int8-m{m}"] = build(
                int8, signature, tiles, cc, config.num_warps, config.num_stages, aligned
            )
        signature = {"src": "*u8", "dst": "*bf16", "codebook": "*fp32", "n_blocks": "i32"}
        for qtype in ("Q4_K", "IQ4_XS"):
            block_size, type_size = dq.BLOCK_LAYOUT[qtype]
            constexprs = dict(
                QTYPE=dq._QTYPE_ID[qtype],
                BLOCK_SIZE=block_size,
                TYPE_SIZE=type_size,
                BLOCKS=dq._BLOCKS_PER_PROGRAM[qtype],
                OUT_BF16=True,
            )
            results[f"sm{cc}-dequant-{qtype}"] = build(
                dq._dequantize_kernel, signature, constexprs, cc, 4, 1, {"src", "dst", "codebook"}
            )
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = (
        f"import json, runpy, sys; sys.path.insert(0, {str(PACK_ROOT / 'scripts')!r}); "
        "from _pack import import_pack; import_pack(); "
        f"print(json.dumps(runpy.run_path({__file__!r})['compile_all']()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("m", M_CLASSES)
@pytest.mark.parametrize("qtype", FUSED_CHECKED)
def test_fused_kernel_builds_for_tensor_cores(compiled, cc, m, qtype):
    result = compiled[f"sm{cc}-fused-{qtype}-m{m}"]
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SMEM_LIMIT_KB[cc] * 1024
    assert result["wgmma_bf16"] if cc == 90 else result["mma_bf16"]


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("m", M_CLASSES)
def test_int8_kernel_builds_for_int8_tensor_cores(compiled, cc, m):
    result = compiled[f"sm{cc}-int8-m{m}"]
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SMEM_LIMIT_KB[cc] * 1024
    assert result["wgmma_s8"] if cc == 90 else result["mma_s8"]


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("qtype", ("Q4_K", "IQ4_XS"))
def test_dequant_kernel_builds(compiled, cc, qtype):
    assert compiled[f"sm{cc}-dequant-{qtype}"]["cubin_bytes"] > 0
