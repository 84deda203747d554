"""Low-host-overhead launches of ``@triton.jit`` kernels.

``kernel[grid](*args, **constants)`` re-binds and re-specializes every argument, builds its cache key
(including ``str()`` of the options) and re-checks the kernel's globals on every call: 20-60 µs of host
time per launch on the H100 machine's host (bench/results/host_overhead_w8a8*.md), more than the GPU time
of a small layer. A ``CachedLauncher`` takes Triton's normal path the first time it sees a
specialization, keeps the compiled kernel that path returns, and later launches it directly through the
compiled kernel's launcher (the same call Triton makes at the end of its own path). It skips Triton's
per-call check that the kernel's global constants have not changed since compilation (ours are module
constants) and keeps Triton's path for kernels with per-call pre-run hooks.

The specialization key replicates what Triton specializes a compiled kernel on: each tensor's dtype and
16-byte alignment, each integer's width, divisibility by 16 and equality to 1, the constexpr values and
compile options (``constants``), Triton's debug switch, and the current device. Under
``TRITON_INTERPRET=1`` (no compiled kernels), or with ``DIT_QUANT_DIRECT_LAUNCH=0`` in the environment,
every call takes Triton's path.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import triton

logger = logging.getLogger("dit_quant.kernels")

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4 keeps its launch hooks elsewhere; the direct path is then off
    _knobs = None

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4 has no host-side TMA descriptors
    TensorDescriptor = None


def ceil_div(a: int, b: int) -> int:
    """Host-side ``triton.cdiv``: the latter is a Triton constexpr function, a few µs per call from
    Python, and launches compute several of these."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """Host-side ``triton.next_power_of_2`` (same reason as ``ceil_div``), for n >= 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# Read per call, so benchmarks and tests can compare both paths in one process.
DIRECT_LAUNCH = os.environ.get("DIT_QUANT_DIRECT_LAUNCH", "1") != "0"

_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


def _other_specialization(arg: Any) -> Hashable:
    if isinstance(arg, float):
        return float
    if TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape), arg.padding
    raise TypeError(f"no specialization rule for a {type(arg).__name__} argument")


def specialization_key(args: Sequence[Any]) -> tuple:
    """What Triton's compiled code depends on in runtime arguments: a tensor's dtype and 16-byte
    alignment; an int's equality to 1, divisibility by 16 and width; a bool's value; None; a float's
    type; a TMA descriptor's dtype, block shape and padding. (One expression, not a call per argument:
    this runs on every launch.)"""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else None if a is None
        else (bool, a) if a.__class__ is bool  # tagged: True == 1 in Python, but Triton compiles them apart
        else (1 if a == 1 else (a % 16 == 0, _I32_MIN <= a <= _I32_MAX, a <= _I64_MAX)) if isinstance(a, int)
        else _other_specialization(a)
        for a in args
    )


class CachedLauncher:
    """Launches one ``@triton.jit`` kernel, directly through its compiled kernel after the first call of
    each specialization.

    Callers pass the kernel's runtime (non-constexpr) arguments positionally, in signature order, and
    ``constants``: a hashable tuple of ``(name, value)`` pairs holding every constexpr parameter (which
    must follow the runtime ones in the signature) and compile option (``num_warps``...).
    """

    def __init__(self, kernel: triton.JITFunction) -> None:
        self.kernel = kernel
        self._entries: dict[tuple, tuple[Any, tuple]] = {}
        self._current_device: Callable[[], int] | None = None  # set once a compiled kernel came back
        self._current_stream: Callable[[int], int] | None = None
        self._broken = False  # a direct launch raised TypeError: this Triton's launcher differs
        self.direct_launches = 0  # direct launches prepared so far (for tests and benchmarks)

    def __call__(self, grid: Sequence[int], args: tuple, constants: tuple[tuple[str, Any], ...]) -> None:
        """Launch on ``grid`` (1 to 3 program counts) on the current device's current stream."""
        self.prepare(grid, args, constants)()

    def prepare(
        self, grid: Sequence[int], args: tuple, constants: tuple[tuple[str, Any], ...]
    ) -> Callable[[], None]:
        """Everything before the launch itself (key, lookup, stream); calling the result launches. Lets a
        caller prepare a second kernel before launching the first, so that the GPU does not wait for the
        host's preparation between the two."""
        if self._current_device is None or not DIRECT_LAUNCH:
            return functools.partial(self._launch_through_triton, grid, args, constants)
        key = self._key(args, constants)
        if key is None:  # an argument type without a rule here: Triton's path handles it
            return functools.partial(self._launch_through_triton, grid, args, constants)
        entry = self._entries.get(key)
        if entry is None:
            return functools.partial(self._launch_through_triton, grid, args, constants, key)
        compiled, constexpr_values = entry
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        stream = self._current_stream(key[0])
        launch_args = (*args, *constexpr_values)
        self.direct_launches += 1
        return functools.partial(
            self._launch_direct, compiled, grid, args, constants,
            grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(grid, stream, *launch_args),
            _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *launch_args,
        )

    def bind(
        self, grid: Sequence[int], args: tuple, constants: tuple[tuple[str, Any], ...]
    ) -> BoundLaunch | None:
        """The launch of the compiled kernel that ``args`` (an example of the arguments) specialize to, with
        the grid and constants fixed; None until Triton's path has compiled it (or where launches always
        take Triton's path). The caller must only pass it arguments that specialize the same way (same
        dtypes, 16-byte alignments and integer classes; see ``specialization_key``): it skips that check."""
        if self._current_device is None or not DIRECT_LAUNCH or self._broken:
            return None
        entry = self._entries.get(self._key(args, constants))
        if entry is None:
            return None
        compiled, constexpr_values = entry
        return BoundLaunch(self, compiled, tuple(grid), constants, constexpr_values)

    def _key(self, args: tuple, constants: tuple) -> tuple | None:
        """The cache key of a specialization on the current device (its index first); None where an
        argument has no rule in ``specialization_key``."""
        try:
            return (self._current_device(), _knobs.runtime.debug, constants, specialization_key(args))
        except TypeError:
            return None

    def _launch_direct(self, compiled: Any, grid: Sequence[int], args: tuple, constants: tuple,
                       *run_args: Any) -> None:
        try:
            compiled.run(*run_args)
        except TypeError as exc:  # this Triton's launcher takes other arguments: use Triton's own path
            self._launch_direct_failed(exc)
            self._launch_through_triton(grid, args, constants)

    def _launch_direct_failed(self, exc: TypeError) -> None:
        self._current_device = None
        self._broken = True
        logger.warning("DiT Quant: direct launches of %s do not fit this Triton (%s: %s); launching "
                       "through Triton from now on", getattr(self.kernel, "__name__", "a kernel"),
                       type(exc).__name__, exc)

    def _launch_through_triton(
        self, grid: Sequence[int], args: tuple, constants: tuple, key: tuple | None = None
    ) -> None:
        named = dict(constants)
        compiled = self.kernel[tuple(grid)](*args, **named)
        # The interpreter returns no compiled kernel; Triton without knobs lacks the launch hooks' home.
        if _knobs is None or self._broken or not hasattr(compiled, "packed_metadata"):
            return
        if self._current_device is None:
            driver = triton.runtime.driver.active
            self._current_device, self._current_stream = driver.get_current_device, driver.get_current_stream
        later_params = self.kernel.arg_names[len(args):]
        if any(name not in named for name in later_params):  # a defaulted constexpr: keep Triton's path
            return
        # A constexpr passed positionally (the key holds no argument values) or hooks Triton runs on every
        # call: keep Triton's path.
        positional_constexpr = any(index < len(args) for index in self.kernel.constexprs)
        if positional_constexpr or getattr(self.kernel, "pre_run_hooks", None):
            return
        key = key or self._key(args, constants)
        if key is None:
            return
        compiled.run  # noqa: B018 (the property loads the module, which sets compiled.function)
        self._entries[key] = (compiled, tuple(named[name] for name in later_params))


class BoundLaunch:
    """One compiled kernel's launch with its grid and constants fixed (``CachedLauncher.bind``): a call
    costs Triton's own launcher and nothing else (no key, no lookup)."""

    __slots__ = ("_launcher", "_compiled", "_run", "_grid", "_grid_xyz", "_constants", "_constexpr_values",
                 "_function", "_packed_metadata")

    def __init__(self, launcher: CachedLauncher, compiled: Any, grid: tuple, constants: tuple,
                 constexpr_values: tuple) -> None:
        self._launcher, self._compiled, self._grid, self._constants = launcher, compiled, grid, constants
        self._run = compiled.run  # the property loads the module once
        self._grid_xyz = (*grid, 1, 1)[:3]
        self._constexpr_values = constexpr_values
        self._function, self._packed_metadata = compiled.function, compiled.packed_metadata

    def __call__(self, stream: int, *args: Any) -> None:
        """Launch on ``stream`` (a CUDA stream handle of the current device) with runtime ``args``."""
        launcher = self._launcher
        if launcher._broken or not DIRECT_LAUNCH:
            launcher._launch_through_triton(self._grid, args, self._constants)
            return
        launch_args = (*args, *self._constexpr_values)
        enter_hook = _knobs.runtime.launch_enter_hook
        metadata = (None if enter_hook is None
                    else self._compiled.launch_metadata(self._grid, stream, *launch_args))
        launcher.direct_launches += 1
        try:
            self._run(*self._grid_xyz, stream, self._function, self._packed_metadata, metadata, enter_hook,
                      _knobs.runtime.launch_exit_hook, *launch_args)
        except TypeError as exc:  # as in CachedLauncher._launch_direct
            launcher._launch_direct_failed(exc)
            launcher._launch_through_triton(self._grid, args, self._constants)


def current_stream() -> tuple[int, int]:
    """(current CUDA device index, its current stream handle) as Triton's launches see them."""
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    return device, driver.get_current_stream(device)
