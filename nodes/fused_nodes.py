"""The node that switches a Flux model's blocks to the fused forwards of nodes/fused_flux.py."""

from __future__ import annotations

from .comfy_model import ModelPatchNode
from .fused_flux import fused_block_forwards


class FuseFluxBlocks(ModelPatchNode):
    DISPLAY_NAME = "Fused Flux Blocks"
    CATEGORY = "DiT Quant"
    DESCRIPTION = (
        "Runs every Flux double/single block with fused kernels: LayerNorm + modulation, q/k RMSNorm + "
        "rotary embedding + head layout, GELU + concatenation, each one kernel, and for INT8 layers the "
        "int8 activation is produced by that kernel (no separate quantization pass). Works with bf16, "
        "INT8 and GGUF Flux models; other layers, LoRA, attention patches and low-VRAM offloading keep "
        "working. Off: the stock forwards. torch.compile'd models keep their own fusion."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Flux-architecture model (bf16, INT8 or GGUF)."}),
                "enabled": cls.ENABLED_INPUT,
            }
        }

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


NODE_CLASSES = [FuseFluxBlocks]
