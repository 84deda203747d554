"""Ahead-of-time compile of the Triton W8A8 kernels for sm_80/86/89/90 without a GPU.

Proves, on a CPU-only CI machine, that every config the dispatcher may pick on an architecture builds
(PTX and ptxas cubin), lowers the int8 dot to the int8 tensor-core instruction, fits the
architecture's shared memory and keeps its values in registers (no spills to local memory, read from the
cubin with cuobjdump). Needs a Triton that carries ptxas and cuobjdump (the 3.9 wheel does). The
kernels are compiled with the 16-byte alignment hints the JIT gives real aligned tensors: without them
Triton cannot pipeline the loads through shared memory and the large tiles spill.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")
from dit_quant.kernels import w8a8_triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ARCHS = (80, 86, 89, 90)
# Maximum shared memory per block (opt-in) from the CUDA programming guide, by compute capability.
PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
SMEM_LIMIT_KB = {80: 163, 86: 99, 89: 99, 90: 227}
MMA_SYNC_S8 = re.compile(r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32")
WGMMA_S8 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8")
FLOAT_TO_INT = re.compile(r"cvt\.r[nzmp]i(\.sat)?\.[su](8|16|32)\.f32")
POINTER_TYPES = {"a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                 "bias_ptr": "*bf16", "smooth_ptr": "*fp32", "out_ptr": "*bf16"}
GATE_TYPES = {"gate_ptr": "*bf16", "gate_stride": "i32", "rows_per_gate": "i32", "first_row": "i32"}


def _resource_usage(cubin: bytes) -> dict[str, int] | None:
    """Registers per thread and stack bytes per thread (spills) of a cubin, read with the cuobjdump that
    the Triton wheel carries; None where this Triton has none."""
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(match.group(1)), "stack_bytes": int(match.group(2))}


def _compile(fn, signature, constexprs, cc, num_warps, num_stages, **options):
    for name in constexprs:
        signature[name] = "constexpr"
    # The JIT marks 16-byte aligned pointers and multiple-of-16 ints the same way for real tensors.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature.get(name, "constexpr") != "constexpr"
               and name not in ("M", "N", "num_programs", "gate_stride", "rows_per_gate", "first_row")
               and not signature[name].startswith("tensordesc")}
    source = triton.compiler.ASTSource(fn, signature, constexprs, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, **options})
    ptx = kernel.asm["ptx"]
    return {"mma_sync_s8": bool(MMA_SYNC_S8.search(ptx)), "wgmma_s8": bool(WGMMA_S8.search(ptx)),
            "tma_reduce_add": bool(re.search(r"cp\.reduce\.async\.bulk\.tensor\.\S*add", ptx)),
            "div_rn": "div.rn.f32" in ptx, "float_to_int": bool(FLOAT_TO_INT.search(ptx)),
            "shared": kernel.metadata.shared,
            "gdc_wait": "griddepcontrol.wait" in ptx, "prefetch_l2": "prefetch.global.L2" in ptx,
            "gdc_launch_dependents": "griddepcontrol.launch_dependents" in ptx,
            "cubin_bytes": len(kernel.asm["cubin"]), "resources": _resource_usage(kernel.asm["cubin"]),
            "wgmma_wait_pendings": sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)))}


def _case_id(cc, config):
    return (f"sm{cc}-{config.kind}-{config.block_m}x{config.block_n}x{config.block_k}-w{config.num_warps}"
            f"-s{config.num_stages}{'-split' if config.split_epilogue else ''}"
            f"{'-prefetch' if config.prefetch_weights else ''}")


ALL_CASES = list(dict.fromkeys((cc, launch) for cc in ARCHS for regime in ("small", "mid", "large")
                               for config in w8a8_triton.candidate_configs(cc, regime)
                               for launch in config.launches()))
GEMM_CASES = [(cc, config) for cc, config in ALL_CASES if config.kind != "gemv"]
GEMV_CASES = [(cc, config) for cc, config in ALL_CASES if config.kind == "gemv"]


def _compile_gemv(cc: int, config) -> dict:
    signature = dict(POINTER_TYPES, x_ptr="*bf16", N="i32", K="i32", stride_xm="i32", stride_bn="i32",
                     stride_om="i32")
    for name in ("a_ptr", "a_scale_ptr"):
        del signature[name]
    constexprs = {"HAS_BIAS": True, "HAS_SMOOTH": True, "AMAX_BLOCK": w8a8_triton.GEMV_AMAX_BLOCK,
                  "PREFETCH_WEIGHTS": config.prefetch_weights, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k}
    return _compile(w8a8_triton._w8a8_gemv_kernel, signature, constexprs, cc, config.num_warps,
                    config.num_stages, enable_fp_fusion=False)


def tma_descriptor_types(config) -> dict[str, str]:
    """The signature types of the TMA GEMM's A, weight and output descriptors for ``config``."""
    out_n = config.block_n // 2 if config.split_epilogue else config.block_n
    return {"a_desc": f"tensordesc<i8[{config.block_m}, {config.block_k}]>",
            "b_desc": f"tensordesc<i8[{config.block_n}, {config.block_k}]>",
            "out_desc": f"tensordesc<bf16[{config.block_m}, {out_n}]>"}


def compile_all(shard: int, num_shards: int) -> dict[str, dict]:
    """Compile one shard of the cases; runs in a subprocess where TRITON_INTERPRET is unset (the
    interpreter's kernel objects cannot be compiled)."""
    results = {}
    for cc, config in ALL_CASES[shard::num_shards]:
        # programmatic dependent launch as on a GPU of this architecture (w8a8_triton.uses_pdl)
        tiles = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                 "GROUP_M": config.group_m, "WAIT_FOR_PRODUCER": cc >= 90}
        if config.kind == "gemv":
            results[_case_id(cc, config)] = _compile_gemv(cc, config)
            continue
        # the GEMMs of quantized rows also with the gated residual add of DiT blocks in their epilogue
        for gated in (False, True) if config.kind != "fused" else (False,):
            if config.kind == "tma":
                signature = {**tma_descriptor_types(config), "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                             "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "num_programs": "i32",
                             **GATE_TYPES}
                kernel = w8a8_triton._w8a8_gemm_tma_kernel
                constexprs = dict(tiles, HAS_BIAS=True, GATED_ADD=gated, ADD_IN_L2=True,
                                  SPLIT_EPILOGUE=config.split_epilogue)
            else:
                quantize_a = config.kind == "fused"
                signature = dict(POINTER_TYPES, M="i32", N="i32", K="i32", stride_am="i32", stride_bn="i32",
                                 stride_om="i32", a_ptr="*bf16" if quantize_a else "*i8", **GATE_TYPES)
                kernel = w8a8_triton._w8a8_gemm_kernel
                prefetch_k = config.block_k * config.num_stages if config.prefetch_weights else 0
                constexprs = dict(tiles, QUANTIZE_A=quantize_a, HAS_BIAS=True, HAS_SMOOTH=quantize_a,
                                  EVEN_K=False, GATED_ADD=gated, PREFETCH_K=prefetch_k,
                                  WAIT_FOR_PRODUCER=cc >= 90 and not quantize_a)
            results[_case_id(cc, config) + ("-gated" if gated else "")] = _compile(
                kernel, signature, constexprs, cc, config.num_warps, config.num_stages)
    for cc in ARCHS[shard::num_shards]:
        signature = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*fp32",
                     "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
        for one_tile in (True, False):  # rows in registers (K <= 16384) / two passes over longer rows
            constexprs = {"HAS_SMOOTH": True, "BLOCK_K": w8a8_triton.QUANT_ONE_TILE_MAX_K,
                          "ONE_TILE": one_tile, "LAUNCH_DEPENDENTS": cc >= 90}
            results[f"sm{cc}-quantize_rows-{one_tile}"] = _compile(
                w8a8_triton._quantize_rows_kernel, dict(signature), constexprs, cc, 16, 2)
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    num_shards = max(2, os.cpu_count() or 1)
    workers = []
    for shard in range(num_shards):
        code = (f"import json, runpy, sys; sys.path.insert(0, {str(PACK_ROOT / 'scripts')!r}); "
                "from _pack import import_pack; import_pack(); "
                f"print(json.dumps(runpy.run_path({__file__!r})['compile_all']({shard}, {num_shards})))")
        workers.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env))
    results = {}
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr[-4000:]
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize(("cc", "config"), GEMM_CASES, ids=[_case_id(cc, c) for cc, c in GEMM_CASES])
def test_gemm_compiles_to_int8_tensor_cores(compiled, cc, config):
    result = compiled[_case_id(cc, config)]
    assert result["cubin_bytes"] > 0
    if cc == 90 and config.block_m >= 64:
        assert result["wgmma_s8"], "sm_90 GEMM does not use wgmma s8"
    else:  # small-M tiles on Hopper use mma.sync, as Ampere/Ada do
        assert result["mma_sync_s8"], f"sm_{cc} GEMM does not use mma.sync s8"
    assert result["shared"] <= SMEM_LIMIT_KB[cc] * 1024, (
        f"{result['shared']} B of shared memory > {SMEM_LIMIT_KB[cc]} KB on sm_{cc}")
    # Hopper waits for the quantize kernel in the GEMM (programmatic dependent launch)
    assert result["gdc_wait"] == (cc >= 90 and config.kind != "fused" and w8a8_triton.HAS_PDL)
    # the weight prefetch runs while waiting for the quantization: only with dependent launch
    assert result["prefetch_l2"] == config.prefetch_weights  # listed only where it runs (sm_90)
    _assert_no_spills(result, cc)


GATED_CASES = [(cc, config) for cc, config in GEMM_CASES if config.kind != "fused"]


@pytest.mark.parametrize(("cc", "config"), GATED_CASES, ids=[_case_id(cc, c) for cc, c in GATED_CASES])
def test_gemm_with_gated_residual_add_fits_like_the_plain_one(compiled, cc, config):
    """The epilogue that adds ``gate * result`` to a residual in place (DiT blocks) costs no spill and
    no shared memory beyond the architecture's; on Hopper's TMA kernel the add is a TMA reduction."""
    result = compiled[_case_id(cc, config) + "-gated"]
    assert result["wgmma_s8"] or result["mma_sync_s8"]
    assert result["shared"] <= SMEM_LIMIT_KB[cc] * 1024
    assert result["tma_reduce_add"] == (config.kind == "tma")
    _assert_no_spills(result, cc)


@pytest.mark.parametrize(("cc", "config"), GEMV_CASES, ids=[_case_id(cc, c) for cc, c in GEMV_CASES])
def test_gemv_compiles_without_spills(compiled, cc, config):
    """The one-launch kernel for a few rows: CUDA-core dot products, its own IEEE-divided row scales, no
    producer to wait for; the weight prefetch where the config asks for it."""
    result = compiled[_case_id(cc, config)]
    assert result["cubin_bytes"] > 0 and result["div_rn"] and not result["gdc_wait"]
    assert not result["mma_sync_s8"] and not result["wgmma_s8"]
    assert result["prefetch_l2"] == config.prefetch_weights
    assert result["shared"] <= SMEM_LIMIT_KB[cc] * 1024
    _assert_no_spills(result, cc)


def _assert_no_spills(result: dict, cc: int) -> None:
    """Register spills (stack memory per thread) would put local-memory traffic in the inner loop."""
    if result["resources"] is None:
        pytest.skip("this Triton carries no cuobjdump to read the cubin's register use")
    assert result["resources"]["stack_bytes"] == 0, f"sm_{cc}: spills {result['resources']}"
    assert result["resources"]["registers"] <= 255


@pytest.mark.parametrize("one_tile", [True, False])
@pytest.mark.parametrize("cc", ARCHS)
def test_quantize_rows_kernel_compiles(compiled, cc, one_tile):
    result = compiled[f"sm{cc}-quantize_rows-{one_tile}"]
    assert result["cubin_bytes"] > 0
    assert result["div_rn"]  # IEEE division, so the quantized ints match torch's
    # the int8 is the rounded float's low byte: no float-to-int conversion (quarter rate)
    assert not result["float_to_int"]
    assert result["gdc_launch_dependents"] == (cc >= 90 and w8a8_triton.HAS_PDL)
    _assert_no_spills(result, cc)
