"""Replaying a whole forward pass from CUDA graphs, one graph per input signature.

An eager DiT step issues hundreds of kernel launches, and on a slow host the GPU waits for them (the
fused INT8 Flux step has ~91 ms of GPU work but took 83-160 ms of Python to issue on the H100 machine).
A CUDA graph records the launches once and replays them with one call. ``CudaGraphCache`` does that
for a function of tensors: the first call with a new input signature runs the function eagerly (so
Triton compiles and autotunes outside the capture) and then captures it; later calls copy their inputs
into the graph's static input buffers and replay. A ``guard`` value (e.g. the weights' data pointers)
is stored with each graph: when it changes, the graph is captured again, because a graph reads the
addresses it was captured with.

No ComfyUI here; nodes/model_cuda_graph.py wires it to ComfyUI's diffusion models.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from .dispatch import log_once

TensorArgs = Sequence["torch.Tensor | None"]
CHURN_CAPTURES = 8  # after this many captures, fewer replays than captures turns graphs off


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]  # static buffers the replay reads
    output: torch.Tensor  # static buffer the replay writes
    guard: Hashable


def graph_of(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of fn (a function of no arguments launching work on the current
    device), captured after one call on the current stream and one on a side stream, so that compiling,
    tuning and lazy allocations happen outside the capture. For timing GPU work without launch cost."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def _signature(args: TensorArgs) -> tuple:
    """What a graph is specialized on: each argument's shape, strides, dtype and device (or None)."""
    return tuple(None if a is None else (tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)


def _static_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A buffer with t's values and strides (contiguous where t overlaps itself, e.g. an expanded view)."""
    return None if t is None else torch.empty_like(t).copy_(t)


def _rng_checkpoint(device: torch.device) -> tuple:
    """(the device's default CUDA generator, a copy of its state) or (None, None) on torch without
    ``clone_state``. A capture that fails leaves the generator in capture mode, and every later random
    op on the device would raise; restoring the copy undoes that."""
    generator = torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()]
    if not hasattr(generator, "clone_state"):
        return None, None
    return generator, generator.clone_state()


def _cuda_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


def not_capturable(args: TensorArgs) -> str | None:
    """Why ``args`` cannot be run from a CUDA graph here, or None."""
    tensors = [a for a in args if a is not None]
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "the inputs are not on a CUDA GPU"
    if len({t.device for t in tensors}) > 1:
        return "the inputs are on several GPUs"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd is recording (graphs serve inference only)"
    if _cuda_autocast_enabled():
        return "autocast is on (its weight cache would be baked in)"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is already being captured around this call"
    return None


class CudaGraphCache:
    """Runs functions of tensors from CUDA graphs, one per input signature (and guard).

    ``max_graphs`` signatures are kept (least recently used evicted); each graph holds its own memory
    pool with the activations of one pass. A captured function must not synchronize with the host,
    branch on tensor values or modify its inputs; when a capture fails, that signature runs eagerly from
    then on (logged once).
    """

    def __init__(self, name: str, max_graphs: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"DiT Quant: max_graphs must be >= 1, got {max_graphs}")
        self.name = name
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._failed: set[tuple] = set()
        self.captures = 0  # graphs captured so far (a recapture after a guard change counts)
        self.replays = 0
        self.disabled: str | None = None  # why every call runs eagerly now

    def _eager_from_now(self, why: str) -> None:
        self.disabled = why
        self.release()
        log_once(("cuda graphs off", self.name, why),
                 f"DiT Quant: CUDA graphs are off for {self.name}: {why}", logging.WARNING)

    def __len__(self) -> int:
        return len(self._graphs)

    def release(self) -> None:
        """Drops every graph and its memory pool (e.g. when the model leaves the GPU); the reuse count
        that detects churn starts over."""
        self._graphs.clear()
        self.captures = self.replays = 0

    def __call__(
        self, fn: Callable[..., torch.Tensor], args: TensorArgs, guard: Hashable = None, static: Hashable = ()
    ):
        """``fn(*args)`` (args: tensors or None on one CUDA device), replayed from the graph of ``args``'
        signature and ``static`` (what else ``fn`` bakes in, e.g. constant arguments) when one was captured
        with an equal ``guard``; otherwise run eagerly and captured for the next call (``fn`` is only
        called then). A replay returns a new tensor; a function that does not return one tensor, or whose
        graphs are not reused, runs eagerly."""
        if self.disabled is not None:
            return fn(*args)
        key = (_signature(args), static, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        entry = self._graphs.get(key)
        if entry is not None and entry.guard == guard:
            self._graphs.move_to_end(key)
            for buffer, arg in zip(entry.inputs, args, strict=True):
                if buffer is not None:
                    buffer.copy_(arg)
            entry.graph.replay()
            self.replays += 1
            return entry.output.clone()
        if key in self._failed:
            return fn(*args)
        if self.captures >= CHURN_CAPTURES and self.replays < self.captures:
            self._eager_from_now(f"{self.captures} captures were replayed only {self.replays} times (an "
                                 "argument that changes every call, e.g. a float, is baked into each graph)")
            return fn(*args)
        self._graphs.pop(key, None)  # a stale graph (guard changed) frees its pool before the new capture
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        inputs = [_static_copy(a) for a in args]
        out = fn(*inputs)  # eager pass: compiles and autotunes kernels, initializes lazy state
        if not isinstance(out, torch.Tensor):
            self._eager_from_now(f"it returns {type(out).__name__}, not one tensor")
            return out
        graph = torch.cuda.CUDAGraph()
        generator, rng_state = _rng_checkpoint(next(a for a in args if a is not None).device)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = fn(*inputs)
        except Exception as error:  # noqa: BLE001 (any failure: this signature stays eager)
            del graph, inputs
            if rng_state is not None:
                generator.graphsafe_set_state(rng_state)
            self._failed.add(key)
            if isinstance(error, torch.OutOfMemoryError):
                # The capture needs a second set of activations next to the eager pass's output: free
                # every graph so that the eager path keeps the memory it had.
                self._graphs.clear()
                torch.cuda.empty_cache()
            log_once(("cuda graph failed", self.name, str(error)[:200]),
                     f"DiT Quant: {self.name} cannot be captured as a CUDA graph, it runs eagerly: "
                     f"{type(error).__name__}: {error}", logging.WARNING)
            return out
        self._graphs[key] = _Graph(graph, inputs, output, guard)
        self.captures += 1
        return out
