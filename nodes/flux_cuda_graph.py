"""ComfyUI's Flux transformer (``Flux.forward_orig``: embedders, every block, final layer) replayed from
CUDA graphs (kernels/cuda_graphs.py).

The first call at a new resolution/batch runs eagerly and captures; later calls copy the step's inputs
(latent tokens, ids, text tokens, timestep, pooled vector, guidance) into the graph and replay it, so
the host issues one replay instead of ~600 kernel launches. Works with the stock or the fused blocks,
bf16, INT8 or GGUF weights. A call runs the eager forward instead (the reason logged once) when
something makes the pass change from step to step in ways a graph cannot follow: ControlNet inputs,
block replacements or patches in ``transformer_options``, an attention override, per-call weight
functions (ComfyUI's low-VRAM LoRA), weights not resident on the GPU, CPU tensors, torch.compile.
A graph is captured again when any weight's storage moves (reloading, a LoRA merged by replacing
parameters); in-place weight updates are read by the replay as they are.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Hashable

import comfy.ldm.flux.model as flux_model
import torch

from ..kernels.cuda_graphs import CudaGraphCache, not_capturable
from ..kernels.dispatch import log_once

logger = logging.getLogger("dit_quant.nodes")


def _log_once(message: str) -> None:
    log_once(message, message, to=logger)


def graphable_flux(diffusion_model: torch.nn.Module) -> bool:
    """A ComfyUI Flux model whose ``forward_orig`` is the stock one (its signature is what we wrap)."""
    return isinstance(diffusion_model, flux_model.Flux) and (
        type(diffusion_model).forward_orig is flux_model.Flux.forward_orig
    )


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
    return None


class WeightsGuard:
    """The identity of a model's weights as a graph reads them: the data pointers of every parameter and
    buffer and the LoRA branches attached to layers. Called before every replay, so the per-call work is
    one pass over precomputed slots; the full checks (devices, branch matrices) run when it changes."""

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
        guard += tuple(t.data_ptr() for t in branches)
        if (device, guard) != self._checked:
            tensors = [d[n] for d, n in self._slots if d[n] is not None] + branches
            if any(t.device != device for t in tensors):
                return f"weights are not all on {device} (low-VRAM offloading)", None
            self._checked = (device, guard)
        return None, guard


class FluxCudaGraph:
    """A drop-in ``forward_orig`` for one Flux model: the stock (or object-patched block) pass, from CUDA
    graphs when the call allows it. ``release()`` frees the graphs."""

    def __init__(self, diffusion_model: torch.nn.Module, max_graphs: int = 2) -> None:
        if not graphable_flux(diffusion_model):
            raise ValueError(f"DiT Quant: {type(diffusion_model).__name__} is not a ComfyUI Flux model")
        self.forward = types.MethodType(flux_model.Flux.forward_orig, diffusion_model)
        self.weights_guard = WeightsGuard(diffusion_model)
        self.graphs = CudaGraphCache("the Flux transformer", max_graphs)

    def release(self, *_args) -> None:
        """Frees every graph (its activations' memory pool); takes and ignores ComfyUI callback args."""
        self.graphs.release()

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                 transformer_options={}, attn_mask=None):  # noqa: B006 (ComfyUI's signature)
        args = (img, img_ids, txt, txt_ids, timesteps, y, guidance, attn_mask)
        why = options_block_graphs(control, transformer_options) or not_capturable(args)
        guard = None
        if why is None:
            why, guard = self.weights_guard(img.device)
        if why is not None:
            _log_once(f"DiT Quant: the Flux transformer runs eagerly, without a CUDA graph: {why}")
            return self.forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, control,
                                transformer_options, attn_mask=attn_mask)

        def run(img, img_ids, txt, txt_ids, timesteps, y, guidance, attn_mask):
            return self.forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, None,
                                transformer_options, attn_mask=attn_mask)

        return self.graphs(run, args, guard)
