"""A ComfyUI diffusion model's forward pass (embedders, every block, final layer) replayed from CUDA graphs
(kernels/cuda_graphs.py), for any architecture: Flux, SD3, Wan, Qwen-Image, HiDream, ...

The first call with new input shapes runs eagerly and captures; later calls copy the step's tensors
(latent, timestep, text tokens, pooled vector, guidance, ...) into the graph and replay it, so the host
issues one replay instead of hundreds of kernel launches. Works with bf16, INT8 and GGUF weights and with
the fused Flux blocks. A call runs the eager forward instead (the reason logged once) when something makes
the pass change from step to step in ways a graph cannot follow: ControlNet inputs, block replacements,
patches or diffusion-model wrappers in ``transformer_options``, an attention override, per-call weight
functions (ComfyUI's low-VRAM LoRA), weights not resident on the GPU, arguments other than tensors and
constants, CPU tensors, torch.compile. A graph is captured again when any weight's storage moves
(reloading, a LoRA merged by replacing parameters); in-place weight updates are read by the replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import comfy.patcher_extension
import torch

from ..kernels.cuda_graphs import CudaGraphCache, not_capturable
from ..kernels.dispatch import log_once

logger = logging.getLogger("dit_quant.nodes")


def options_block_graphs(control, transformer_options: dict) -> str | None:
    """Why this call's ComfyUI options make the pass differ between steps, or None."""
    if control is not None:
        return "ControlNet inputs"
    if any(transformer_options.get("patches_replace", {}).values()):
        return "block replacement patches"
    if any(transformer_options.get("patches", {}).values()):
        return "model patches"
    if transformer_options.get("optimized_attention_override") is not None:
        return "an attention override"
    wrappers = transformer_options.get("wrappers", {})
    if any(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).values()):
        return "diffusion-model wrappers"
    return None


# transformer_options entries that change between calls without changing the pass (or that the pass writes).
_PER_CALL_OPTIONS = {"cond_or_uncond", "uuids", "sigmas", "sample_sigmas", "callbacks", "wrappers", "patches",
                     "patches_replace", "block_index", "total_blocks", "block_type", "transformer_index",
                     "original_shape", "block"}


_NOT_CONSTANT = object()
_SCALARS = (bool, int, float, str)


def _constant(value) -> Hashable:
    """``value`` as a hashable constant that keeps its type (None, bool/int/float/str, torch dtypes, and
    lists/tuples/dicts of them), or ``_NOT_CONSTANT`` (tensors, functions, other objects)."""
    if value is None or type(value) in _SCALARS:
        return (type(value).__name__, value)
    if isinstance(value, torch.dtype):
        return ("dtype", str(value))
    if type(value) is dict:
        value = sorted(value.items(), key=lambda item: str(item[0]))
    if type(value) in (list, tuple):
        items = tuple(_constant(v) for v in value)
        return _NOT_CONSTANT if any(v is _NOT_CONSTANT for v in items) else items
    return _NOT_CONSTANT


def options_key(transformer_options: dict) -> tuple[str | None, Hashable]:
    """(why ``transformer_options`` holds something a graph would bake in unchecked, or None; its
    constant settings as a hashable value). A pass may read these settings (e.g. Flux's
    ``rope_options``): a graph bakes them in, so a new value needs a new graph, and an entry that is not
    a constant (a tensor, an object another node put there) keeps the call eager."""
    key = []
    for name, value in sorted(transformer_options.items()):
        if name in _PER_CALL_OPTIONS:
            continue
        constant = _constant(value)
        if constant is _NOT_CONSTANT:
            return f"the transformer_options entry {name!r} ({type(value).__name__})", None
        key.append((name, constant))
    return None, tuple(key)


class WeightsGuard:
    """The identity of a model's weights as a graph reads them: the data pointers of every parameter and
    buffer and the LoRA branches attached to layers. Called before every replay, so the per-call work is
    one pass over precomputed slots; the full checks (devices) run when it changes."""

    def __init__(self, model: torch.nn.Module) -> None:
        modules = list(model.modules())
        self._slots = [(m._parameters, name) for m in modules for name in m._parameters]
        self._slots += [(m._buffers, name) for m in modules for name in m._buffers]
        self._cast_layers = [m for m in modules if hasattr(m, "weight_function")]  # ComfyUI's cast layers
        self._branch_layers = [m for m in modules if hasattr(m, "lora_branch")]
        self._checked: tuple | None = None

    def __call__(self, device: torch.device) -> tuple[str | None, Hashable]:
        """(why a graph cannot read these weights on ``device``, or None; the guard value)."""
        for layer in self._cast_layers:
            if layer.weight_function or getattr(layer, "bias_function", None):
                return "a layer computes its weight per call (low-VRAM LoRA patches)", None
        branches = [t for layer in self._branch_layers if layer.lora_branch is not None
                    for t in (layer.lora_branch.down, layer.lora_branch.up)]
        guard = tuple(d[n].data_ptr() for d, n in self._slots if d[n] is not None)
        guard += tuple((t.data_ptr(), t.shape, t.dtype) for t in branches)
        if (device, guard) != self._checked:
            tensors = [d[n] for d, n in self._slots if d[n] is not None] + branches
            if any(t.device != device for t in tensors):
                return f"weights are not all on {device} (low-VRAM offloading)", None
            self._checked = (device, guard)
        return None, guard


class UnsupportedArgument(ValueError):
    """An argument a graph cannot take as a static input or a constant."""


def flatten_arguments(value, tensors: list[torch.Tensor]) -> Hashable:
    """A hashable template of ``value`` (tensors, None, bool/int/float/str, lists/tuples of them) with
    each tensor appended to ``tensors`` and replaced by its index. Raises UnsupportedArgument otherwise."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", len(tensors) - 1)
    if type(value) in (list, tuple):
        return (type(value).__name__, tuple(flatten_arguments(v, tensors) for v in value))
    if value is None or type(value) in _SCALARS:
        return ("const", (type(value).__name__, value))
    raise UnsupportedArgument(f"an argument of type {type(value).__name__}")


def rebuild_arguments(template: Hashable, tensors) -> object:
    """The value ``flatten_arguments`` made ``template`` from, with ``tensors`` in place of the originals."""
    kind, payload = template
    if kind == "tensor":
        return tensors[payload]
    if kind == "const":
        return payload[1]
    items = [rebuild_arguments(t, tensors) for t in payload]
    return items if kind == "list" else tuple(items)


class ModelCudaGraph:
    """A drop-in ``forward`` for one ComfyUI diffusion model: ``forward`` (default: the model class's, with
    any object-patched blocks; or another node's patched forward), from CUDA graphs when the call allows
    it. ``release()`` frees the graphs."""

    def __init__(self, diffusion_model: torch.nn.Module, max_graphs: int = 2,
                 forward: Callable | None = None) -> None:
        self.forward: Callable = forward or type(diffusion_model).forward.__get__(diffusion_model)
        self.weights_guard = WeightsGuard(diffusion_model)
        self.graphs = CudaGraphCache(f"the {type(diffusion_model).__name__} forward pass", max_graphs)

    def release(self, *_args) -> None:
        """Frees every graph (its activations' memory pool); takes and ignores ComfyUI callback args."""
        self.graphs.release()

    def _why_eager(self, args: tuple, kwargs: dict, options: dict, tensors: list) -> tuple:
        """(why this call runs eagerly or None, the arguments' template, the options' key, the guard)."""
        why = options_block_graphs(kwargs.get("control"), options)
        if why is not None:
            return why, None, None, None
        why, settings = options_key(options)
        if why is not None:
            return why, None, None, None
        try:
            template = flatten_arguments((args, tuple(sorted(kwargs.items()))), tensors)
        except UnsupportedArgument as error:
            return str(error), None, None, None
        why = not_capturable(tensors)
        if why is not None:
            return why, None, None, None
        why, guard = self.weights_guard(tensors[0].device)
        if why is not None:
            self.graphs.release()  # the weights left the GPU: their graphs cannot serve again
        return why, template, settings, guard

    def __call__(self, *args, **kwargs):
        options = kwargs.pop("transformer_options", {})
        tensors: list[torch.Tensor] = []
        why, template, settings, guard = self._why_eager(args, kwargs, options, tensors)
        if why is not None:
            log_once(f"DiT Quant: {self.graphs.name} runs eagerly, without a CUDA graph: {why}", to=logger)
            return self.forward(*args, transformer_options=options, **kwargs)

        def run(*static_tensors):
            call_args, call_kwargs = rebuild_arguments(template, static_tensors)
            return self.forward(*call_args, transformer_options=options, **dict(call_kwargs))

        return self.graphs(run, tensors, guard, static=(template, settings))
