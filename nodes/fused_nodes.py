"""Nodes that change how a Flux model's forward runs: fused block forwards (nodes/fused_flux.py) and
CUDA-graph replay of the whole transformer (nodes/flux_cuda_graph.py)."""

from __future__ import annotations

import comfy.patcher_extension

from .flux_cuda_graph import FluxCudaGraph, graphable_flux
from .fused_flux import fused_block_forwards


class _FluxModelPatch:
    """What the Flux MODEL -> MODEL nodes share: category, output, and the model/enabled inputs."""

    CATEGORY = "DiT Quant"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"
    MODEL_INPUTS = {
        "model": ("MODEL", {"tooltip": "A Flux-architecture model (bf16, INT8 or GGUF)."}),
        "enabled": ("BOOLEAN", {"default": True, "tooltip": "Off returns the model unchanged."}),
    }


class FuseFluxBlocks(_FluxModelPatch):
    DISPLAY_NAME = "Fused Flux Blocks"
    DESCRIPTION = (
        "Runs every Flux double/single block with fused kernels: LayerNorm + modulation, q/k RMSNorm + "
        "rotary embedding + head layout, GELU + concatenation, each one kernel, and for INT8 layers the "
        "int8 activation is produced by that kernel (no separate quantization pass). Works with bf16, "
        "INT8 and GGUF Flux models; other layers, LoRA, attention patches and low-VRAM offloading keep "
        "working. Off: the stock forwards. torch.compile'd models keep their own fusion."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(cls.MODEL_INPUTS)}

    def patch(self, model, enabled: bool):
        if not enabled:
            return (model,)
        forwards = fused_block_forwards(model.model.diffusion_model)
        if not forwards:
            raise ValueError(
                "Fused Flux Blocks: this model has no Flux double/single blocks (architecture "
                f"{type(model.model.diffusion_model).__name__}); connect a Flux-architecture model."
            )
        patched = model.clone()
        for path, forward in forwards.items():
            patched.add_object_patch(f"diffusion_model.{path}", forward)
        return (patched,)


class FluxCudaGraphs(_FluxModelPatch):
    DISPLAY_NAME = "Flux CUDA Graphs"
    DESCRIPTION = (
        "Replays the whole Flux transformer from a CUDA graph: the first step at a new resolution runs "
        "normally and records its kernels, every later step replays them with one call, so a slow CPU no "
        "longer holds the GPU back (the INT8 + fused blocks step issues ~600 kernels). Works with bf16, "
        "INT8 and GGUF models and with Fused Flux Blocks. Each recorded resolution keeps one step's "
        "activations in VRAM until the model is unloaded. Steps with ControlNet, block patches, low-VRAM "
        "offloading or torch.compile run normally."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **cls.MODEL_INPUTS,
                "max_graphs": ("INT", {
                    "default": 2, "min": 1, "max": 8,
                    "tooltip": "Input shapes (resolution x batch) kept recorded at once; each holds one "
                               "step's activations in VRAM. The least recently used is dropped.",
                }),
            }
        }

    def patch(self, model, enabled: bool, max_graphs: int = 2):
        if not enabled:
            return (model,)
        diffusion_model = model.model.diffusion_model
        if not graphable_flux(diffusion_model):
            raise ValueError(
                "Flux CUDA Graphs: this model is not a ComfyUI Flux model with the stock transformer pass "
                f"(architecture {type(diffusion_model).__name__}); connect a Flux-architecture model."
            )
        graphed = FluxCudaGraph(diffusion_model, max_graphs)
        patched = model.clone()
        patched.add_object_patch("diffusion_model.forward_orig", graphed)
        # Unloading moves the weights; the graphs' memory goes back to ComfyUI with them.
        patched.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, graphed.release)
        return (patched,)


NODE_CLASSES = [FuseFluxBlocks, FluxCudaGraphs]
