"""Backend registry and dispatch of the W8A8 ops.

Public functions -> ``torch.library`` custom ops ``dit_quant::w8a8_linear`` / ``dit_quant::quantize_rows``
(with fake implementations, so torch.compile sees one opaque op) -> a registered backend:
- ``"torch"``: the plain-torch reference (any device);
- ``"triton"``: the Triton kernels (CUDA sm_80+, or CPU tensors under ``TRITON_INTERPRET=1``).

``"auto"`` picks Triton on CUDA GPUs of compute capability >= 8.0 when Triton imports, else the
reference, and logs the choice and its reason once per (device, reason). If a Triton kernel fails to
compile or launch under ``"auto"``, that device falls back to the reference for the rest of the
process, with one warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch

from .dit_fusions_reference import gelu_concat_reference, layernorm_modulate_reference, qk_norm_rope_reference
from .w8a8_reference import (
    int8_gemm_gated_add_reference,
    int8_gemm_reference,
    quantize_rows_reference,
    w8a8_linear_reference,
)

logger = logging.getLogger("dit_quant.kernels")

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                    torch.Tensor]
QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


class Backend(NamedTuple):
    """One implementation of the ops: the W8A8 linear and its parts (2-D activations [M, K]), and the
    fused DiT block ops that feed them (signatures in dit_fusions_reference.py)."""

    linear: LinearFn
    quantize_rows: QuantizeFn
    int8_gemm: Callable
    int8_gemm_gated_add: Callable
    layernorm_modulate: Callable
    qk_norm_rope: Callable
    gelu_concat: Callable


BACKENDS: dict[str, Backend] = {}
REQUESTS = ("auto", "triton", "torch")

# Appended to the backend line on GPUs with FP8 tensor cores (Ada sm_89, Hopper sm_90 and newer).
FP8_NOTE = (". This GPU also has FP8 tensor cores: ComfyUI's weight dtype 'fp8_e4m3fn_fast' is an "
            "alternative of the same size and similar speed, without per-channel scales or SmoothQuant "
            "(lower quality on outlier-heavy models). See docs/kernels.md, 'INT8 or FP8'")

_state_lock = threading.Lock()
_logged: set = set()  # keys of the messages log_once has written
_resolved: dict[tuple[str, str], str] = {}  # (device, request) -> backend, after the first resolution
_triton_failed_devices: set[str] = set()
_triton_import_error: str | None = None


def register_backend(name: str, backend: Backend) -> None:
    """Register (or replace) a backend under ``name``."""
    BACKENDS[name] = backend


def available_backends() -> list[str]:
    """Names of the registered backends ("torch" always; "triton" when Triton imports)."""
    return sorted(BACKENDS)


register_backend("torch", Backend(
    w8a8_linear_reference, quantize_rows_reference, int8_gemm_reference, int8_gemm_gated_add_reference,
    layernorm_modulate_reference,
    qk_norm_rope_reference, gelu_concat_reference,
))

try:
    from .dit_fusions_triton import gelu_concat_triton, layernorm_modulate_triton, qk_norm_rope_triton
    from .triton_launch import current_stream
    from .w8a8_autotune import choose_config, choose_gemm_config
    from .w8a8_triton import INTERPRETED as _TRITON_INTERPRETED
    from .w8a8_triton import (
        GatedAdd,
        build_gemm_plan,
        build_linear_plan,
        gemm_plan_key,
        int8_gemm_gated_add_triton,
        int8_gemm_triton,
        linear_plan_key,
        quantize_rows_triton,
        tiles_within_samples,
        w8a8_linear_triton,
    )

    # plan key -> LaunchPlan, or False where none could be bound (not retried); plans hold no tensors,
    # the bound only limits growth where weights move between calls (new addresses, new keys)
    _linear_plans: dict = {}
    _gemm_plans: dict = {}
    MAX_PLANS = 4096
    # Read per call (the host benchmark compares both): DIT_QUANT_LAUNCH_PLANS=0 takes the general path.
    USE_PLANS = os.environ.get("DIT_QUANT_LAUNCH_PLANS", "1") != "0"

    def _plan_for(plans: dict, key) -> tuple:
        """(plan or None/False, stream) where the plan serves the current device; else (it, None)."""
        plan = plans.get(key)
        if plan:
            device, stream = current_stream()
            if device == plan.device_index:
                return plan, stream
        return plan, None

    def _remember(plans: dict, key, build) -> None:
        if torch.cuda.is_current_stream_capturing():
            return  # the config of a call under capture was not tuned: plan after the capture
        if len(plans) >= MAX_PLANS:
            plans.clear()
        try:
            plans[key] = build() or False
        except Exception as exc:  # a plan is an optimization: the general path keeps serving these calls
            plans[key] = False
            log_once(("launch plan", type(exc).__name__), f"DiT Quant: no launch plan for a W8A8 call "
                     f"({type(exc).__name__}: {exc}); it keeps the general launch path", logging.WARNING)

    def _triton_linear(x2d, weight, weight_scale, bias, smooth):
        if x2d.shape[0] == 0:
            return x2d.new_empty((0, weight.shape[0]))
        key = linear_plan_key(x2d, weight, weight_scale, bias, smooth) if USE_PLANS and x2d.is_cuda else None
        plan, stream = _plan_for(_linear_plans, key)
        if stream is not None:
            return plan.linear(x2d, weight, weight_scale, bias, smooth, stream)
        config = choose_config(x2d, weight, weight_scale, bias, smooth)
        out = w8a8_linear_triton(x2d, weight, weight_scale, bias, smooth, config)
        if key is not None and plan is None:
            _remember(_linear_plans, key,
                      lambda: build_linear_plan(x2d, weight, weight_scale, bias, smooth, config))
        return out

    def _planned_gemm(q, scale, weight, weight_scale, bias, out_dtype, gated=None):
        """``int8_gemm_triton`` (with ``gated``: ``int8_gemm_gated_add_triton``, returning the residual)
        through the layer's launch plan once one is bound."""
        planned = USE_PLANS and q.is_cuda and q.shape[0] > 0
        key = gemm_plan_key(q, scale, weight, weight_scale, bias, out_dtype, gated) if planned else None
        plan, stream = _plan_for(_gemm_plans, key)
        if stream is not None:
            return plan.gemm(q, scale, weight, weight_scale, bias, stream, gated)
        config = choose_gemm_config(q, scale, weight, weight_scale, bias, out_dtype)
        if gated is None:
            out = int8_gemm_triton(q, scale, weight, weight_scale, bias, out_dtype, config)
        elif tiles_within_samples(config, gated.gate.shape[0], gated.rows_per_gate):
            int8_gemm_gated_add_triton(q, scale, weight, weight_scale, bias, gated, config)
            out = gated.residual
        else:  # rare (batch > 1 and tokens no multiple of the tile height): one launch per sample
            gate, length, residual = gated
            for sample in range(gate.shape[0]):
                rows = slice(sample * length, (sample + 1) * length)
                _planned_gemm(q[rows], scale[rows], weight, weight_scale, bias, out_dtype,
                              GatedAdd(gate[sample:sample + 1], length, residual[rows]))
            return gated.residual
        if key is not None and plan is None:
            _remember(_gemm_plans, key,
                      lambda: build_gemm_plan(q, scale, weight, weight_scale, bias, out_dtype, config, gated))
        return out

    def _triton_int8_gemm(q, scale, weight, weight_scale, bias, out_dtype):
        return _planned_gemm(q, scale, weight, weight_scale, bias, out_dtype)

    def _triton_int8_gemm_gated_add(q, scale, weight, weight_scale, bias, gate, residual, rows_per_gate):
        _planned_gemm(q, scale, weight, weight_scale, bias, residual.dtype,
                      GatedAdd(gate, rows_per_gate, residual))

    register_backend("triton", Backend(
        _triton_linear, quantize_rows_triton, _triton_int8_gemm, _triton_int8_gemm_gated_add,
        layernorm_modulate_triton,
        qk_norm_rope_triton, gelu_concat_triton,
    ))
except ImportError as exc:  # Triton is optional: the reference runs everywhere
    _triton_import_error = str(exc)
    _TRITON_INTERPRETED = False


def log_once(
    key: Hashable, message: str | None = None, level: int = logging.INFO, to: logging.Logger = logger
) -> None:
    """Log ``message`` (default: ``key`` itself) on ``to`` (default: the kernels' logger) the first time
    ``key`` is seen in this process."""
    with _state_lock:
        if key in _logged:
            return
        _logged.add(key)
    to.log(level, key if message is None else message)


def triton_unavailable(
    device: torch.device, import_error: str | None, interpreted: bool, failed_devices: set[str], kind: str
) -> str | None:
    """Why the Triton ``kind`` kernels ("INT8", "GGUF") cannot run natively on ``device``, or None.

    import_error: why Triton did not import (None if it did); interpreted: TRITON_INTERPRET=1 is set;
    failed_devices: devices where a kernel of this kind failed before.
    """
    if import_error is not None:
        return f"Triton is not importable ({import_error})"
    if device.type != "cuda":
        return f"{device.type} tensors have no Triton {kind} path"
    if interpreted:
        return "TRITON_INTERPRET=1 is set (the interpreter is for tests only)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"GPU sm_{major}{minor} has no Triton {kind} support"
    if str(device) in failed_devices:
        return f"the Triton {kind} kernel failed earlier on this device"
    return None


def _auto_choice(device: torch.device) -> tuple[str, str]:
    """(backend, reason) for ``"auto"`` on a device."""
    reason = triton_unavailable(
        device, _triton_import_error, _TRITON_INTERPRETED, _triton_failed_devices, "INT8"
    )
    if reason is not None:
        return "torch", reason
    major, minor = torch.cuda.get_device_capability(device)
    return "triton", f"GPU sm_{major}{minor} ({torch.cuda.get_device_name(device)})"


def resolve_backend(device: torch.device, requested: str = "auto") -> str:
    """Backend name ("triton" or "torch") that runs the W8A8 ops on ``device`` for a request.

    ``requested`` is "auto", "triton" or "torch". An explicit "triton" that cannot run raises
    RuntimeError; "auto" falls back to "torch" and logs the reason once per (device, reason).
    """
    cached = _resolved.get((str(device), requested))
    if cached is not None:
        return cached
    backend = _resolve_uncached(torch.device(device), requested)
    _resolved[(str(device), requested)] = backend
    return backend


def _resolve_uncached(device: torch.device, requested: str) -> str:
    if requested not in REQUESTS:
        raise ValueError(f"DiT Quant: unknown W8A8 backend {requested!r}; expected one of {REQUESTS}")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if "triton" not in BACKENDS:
            raise RuntimeError(f"DiT Quant: backend 'triton' requested but Triton is not importable "
                               f"({_triton_import_error})")
        if device.type == "cpu" and not _TRITON_INTERPRETED:
            raise RuntimeError("DiT Quant: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                               "before triton is imported; use backend='torch' or 'auto' on CPU")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            raise RuntimeError(f"DiT Quant: backend 'triton' needs a GPU of compute capability 8.0 or "
                               f"newer; this one is sm_{major}{minor}. Use backend='auto' or 'torch'")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"DiT Quant: backend 'triton' does not run on {device.type} tensors")
        return "triton"
    backend, reason = _auto_choice(device)
    suffix = "; using the torch reference path"
    if backend == "triton":
        suffix = FP8_NOTE if torch.cuda.get_device_capability(device) >= (8, 9) else ""
    log_once((str(device), reason), f"DiT Quant: W8A8 backend '{backend}' on {device}: {reason}{suffix}")
    return backend


def run_op(op_name: str, device: torch.device, requested: str, *args, **kwargs):
    """Run ``op_name`` (a field of ``Backend``) on the backend that ``requested`` resolves to for
    ``device``; under "auto" a failing Triton kernel falls back to the reference for good."""
    backend = resolve_backend(device, requested)
    impl = getattr(BACKENDS[backend], op_name)
    if backend != "triton" or requested != "auto":
        return impl(*args, **kwargs)
    try:
        return impl(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # compile/launch failure of the Triton kernel: fall back for good
        with _state_lock:
            _triton_failed_devices.add(str(device))
            _resolved.pop((str(device), "auto"), None)
        log_once((str(device), "triton failed"), f"DiT Quant: the Triton W8A8 kernel failed on {device} "
                  f"({type(exc).__name__}: {exc}); using the torch reference path from now on",
                  logging.WARNING)
        return getattr(BACKENDS["torch"], op_name)(*args, **kwargs)


def as_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as fp32 (None stays None). The dtype test first: ``.float()`` of an fp32 tensor still costs a
    dispatcher round trip per call."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (what the kernels need), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with K contiguous (a view when possible)."""
    return last_dim_contiguous(x.reshape(-1, x.shape[-1]))


def _w8a8_linear_impl(x, weight, weight_scale, bias, smooth, backend):
    weight = last_dim_contiguous(weight)
    out = run_op("linear", x.device, backend, _rows(x), weight, weight_scale, bias, smooth)
    return out.view(*x.shape[:-1], weight.shape[0])


def _w8a8_linear_fake(x, weight, weight_scale, bias, smooth, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _quantize_rows_impl(x, smooth, backend):
    return run_op("quantize_rows", x.device, backend, _rows(x), smooth)


def _quantize_rows_fake(x, smooth, backend):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32))


_OPS = {
    "w8a8_linear": ("w8a8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor? smooth, "
                    "str backend) -> Tensor", _w8a8_linear_impl, _w8a8_linear_fake),
    "quantize_rows": ("quantize_rows(Tensor x, Tensor? smooth, str backend) -> (Tensor, Tensor)",
                      _quantize_rows_impl, _quantize_rows_fake),
}


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.dit_quant, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _define_ops() -> torch.library.Library | None:
    """Define the custom ops unless another import of this package (ComfyUI's folder name vs
    ``dit_quant`` in tests) already did; then its definitions are reused."""
    if all(_op_defined(name) for name in _OPS):
        return None
    lib = torch.library.Library("dit_quant", "FRAGMENT")
    register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    for name, (schema, impl, fake) in _OPS.items():
        lib.define(schema)
        lib.impl(name, impl, "CompositeExplicitAutograd")
        register_fake(f"dit_quant::{name}", fake, lib=lib)
    return lib


# Kept alive for the life of the process: dropping the Library object unregisters the ops.
_LIBRARY = _define_ops()
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def call_w8a8_linear(x, weight, weight_scale, bias, smooth, backend):
    """The ``dit_quant::w8a8_linear`` op: through the dispatcher while torch.compile traces (so the
    graph holds one opaque op), called directly in eager mode, where the dispatcher's round trip into a
    Python-registered kernel cost ~50 µs per call on the H100 machine's host (bench/results)."""
    if _is_compiling():
        return torch.ops.dit_quant.w8a8_linear(x, weight, weight_scale, bias, smooth, backend)
    return _w8a8_linear_impl(x, weight, weight_scale, bias, smooth, backend)


def call_quantize_rows(x, smooth, backend):
    """The ``dit_quant::quantize_rows`` op, dispatched like ``call_w8a8_linear``."""
    if _is_compiling():
        return torch.ops.dit_quant.quantize_rows(x, smooth, backend)
    return _quantize_rows_impl(x, smooth, backend)
