"""The node that replays a diffusion model's forward pass from CUDA graphs (nodes/model_cuda_graph.py)."""

from __future__ import annotations

import comfy.patcher_extension

from .comfy_model import ModelPatchNode
from .model_cuda_graph import ModelCudaGraph


class DiTCudaGraphs(ModelPatchNode):
    DISPLAY_NAME = "DiT CUDA Graphs"
    CATEGORY = "DiT Quant"
    DESCRIPTION = (
        "Replays the diffusion model's whole forward pass from a CUDA graph: the first step at a new "
        "resolution/batch runs normally and records its kernels, every later step replays them with one "
        "call, so a slow CPU no longer holds the GPU back (an INT8 Flux step issues ~600 kernels). Any "
        "architecture (Flux, SD3, Wan, Qwen-Image, ...), bf16, INT8 or GGUF weights, with or without Fused "
        "Flux Blocks; outputs are bit-identical. Each recorded shape keeps one step's activations in VRAM "
        "until the model is unloaded. Steps with ControlNet, block patches, low-VRAM offloading or "
        "torch.compile run normally (logged once)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Any diffusion model (bf16, INT8 or GGUF)."}),
                "enabled": cls.ENABLED_INPUT,
                "max_graphs": ("INT", {
                    "default": 2, "min": 1, "max": 8,
                    "tooltip": "Input shapes (resolution x batch, text length) kept recorded at once; each "
                               "holds one step's activations in VRAM. The least recently used is dropped.",
                }),
            }
        }

    def patch(self, model, enabled: bool, max_graphs: int = 2):
        if not enabled:
            return (model,)
        # Another node's patched forward (or an earlier graph node's) is what the graphs replay.
        earlier = model.object_patches.get("diffusion_model.forward")
        if isinstance(earlier, ModelCudaGraph):
            earlier = earlier.forward
        graphed = ModelCudaGraph(model.model.diffusion_model, max_graphs, forward=earlier)
        patched = model.clone()
        patched.add_object_patch("diffusion_model.forward", graphed)
        # Unloading moves the weights; the graphs' memory goes back to ComfyUI with them.
        patched.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, graphed.release)
        return (patched,)


NODE_CLASSES = [DiTCudaGraphs]
