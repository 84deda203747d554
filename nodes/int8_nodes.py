"""INT8 W8A8 nodes: load, quantize on the fly, save, and the kernel patch for the sampler."""

import logging

import comfy.utils
import folder_paths

from ..quant.int8_checkpoint import (
    LAYOUT_DIT_QUANT,
    LAYOUTS,
    RECIPE_KEY,
    CheckpointError,
    load_int8_checkpoint,
    make_recipe,
    save_int8_checkpoint,
)
from ..quant.int8_linear import Int8Linear, kernel_backend
from ..quant.model_quantizer import plan_quantization, quantized_copy
from .comfy_int8_ops import Int8Operations, make_int8_layer, unloaded_layers
from .comfy_model import (
    ModelPatchNode,
    load_with_operations,
    output_path,
    patched_weight,
    release_model_weights,
    with_new_diffusion_model,
)
from .lora_patcher import quant_model_patcher
from .sampling import add_apply_model_wrapper, nonempty_lines

CATEGORY = "DiT Quant/INT8"
BACKENDS = ["auto", "triton", "torch"]


def int8_layer_names(diffusion_model) -> list[str]:
    return [name for name, m in diffusion_model.named_modules() if isinstance(m, Int8Linear)]


class LoadInt8DiffusionModel:
    DISPLAY_NAME = "Load Diffusion Model (INT8)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads an INT8 W8A8 checkpoint from models/diffusion_models: a DiT Quant file or one in ComfyUI "
        "core's int8_tensorwise layout (comfy_quant tensors or the older _quantization_metadata header). "
        "Quantized layers stay int8 in memory and VRAM (never expanded to bf16); the architecture is "
        "detected like the stock loader does."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The INT8 diffusion model; add 'INT8 Kernel Patch' to pick the kernel backend.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = [n for n in folder_paths.get_filename_list("diffusion_models") if n.endswith(".safetensors")]
        return {
            "required": {
                "unet_name": (
                    names,
                    {
                        "tooltip": "An INT8 checkpoint: written by 'Save INT8 Model' (either format) "
                        "or by ComfyUI core in its int8_tensorwise layout (not ConvRot)."
                    },
                )
            }
        }

    def load(self, unet_name: str):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        state_dict, recipe = load_int8_checkpoint(path)
        model = load_with_operations(unet_name, state_dict, Int8Operations, unloaded_layers, CheckpointError)
        diffusion_model = model.model.diffusion_model
        loaded = set(int8_layer_names(diffusion_model))
        if loaded != set(recipe["quantized_layers"]):
            raise CheckpointError(
                f"{unet_name}: {len(set(recipe['quantized_layers']) - loaded)} quantized layers of "
                "the recipe do not exist in the detected architecture"
            )
        # The recipe travels with the diffusion model (attribute RECIPE_KEY) so the save node can store it.
        setattr(diffusion_model, RECIPE_KEY, recipe)
        logging.info("DiT Quant: loaded %s with %d INT8 layers", unet_name, len(loaded))
        return (quant_model_patcher(model),)


class QuantizeModelInt8:
    DISPLAY_NAME = "Quantize Model to INT8"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Quantizes a loaded bf16/fp16/fp8 diffusion model to INT8 W8A8 on the fly: per-output-channel "
        "int8 weights, per-token int8 activations at run time. Embedders and final layers stay in "
        "high precision. LoRA patches already on the model are merged into the quantized weights."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The INT8 model (the input model is left unchanged).",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "A diffusion model from any loader (bf16, fp16 or fp8 weights)."},
                ),
                "keep_layers": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Extra layer names to keep in high precision, one per line "
                        "(e.g. joint_blocks.0.x_block.mlp.fc2).",
                    },
                ),
            }
        }

    def quantize(self, model, keep_layers: str = ""):
        from ..quant.layer_rules import DEFAULT_RULES, protect_rules

        diffusion_model = model.model.diffusion_model
        if int8_layer_names(diffusion_model):
            raise ValueError("This model already has INT8 layers; quantize the original model instead.")
        protected = nonempty_lines(keep_layers)
        names, kept = plan_quantization(diffusion_model, protect_rules(protected) + DEFAULT_RULES)
        unknown = sorted(set(protected) - set(kept))
        if unknown:
            raise ValueError(f"keep_layers names no Linear layer of this model: {', '.join(unknown)}")
        release_model_weights(model)
        bar = comfy.utils.ProgressBar(len(names))
        new_dm = quantized_copy(
            diffusion_model,
            names,
            make_layer=make_int8_layer,
            weight_of=lambda name, module: patched_weight(model, name, module),
            progress=lambda done, total: bar.update_absolute(done, total),
        )
        setattr(new_dm, RECIPE_KEY, make_recipe(names, list(kept), method="per-channel W8A8 (on the fly)"))
        logging.info(
            "DiT Quant: quantized %d Linear layers to INT8, kept %d in high precision", len(names), len(kept)
        )
        return (with_new_diffusion_model(model, new_dm, names),)


class SaveInt8Model:
    DISPLAY_NAME = "Save INT8 Model"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Writes an INT8 model to models/diffusion_models as safetensors (int8 weights, fp32 scales, "
        "the recipe in the header), atomically, in this pack's layout or in ComfyUI core's "
        "int8_tensorwise layout. Load it back with 'Load Diffusion Model (INT8)'."
    )
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "An INT8 model from 'Quantize Model to INT8' or 'Apply SmoothQuant'."},
                ),
                "filename": (
                    "STRING",
                    {
                        "default": "dit_int8",
                        "tooltip": "File name in models/diffusion_models; .safetensors is added.",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Replace an existing file of that name."},
                ),
            },
            "optional": {
                "format": (
                    LAYOUTS,
                    {
                        "default": LAYOUT_DIT_QUANT,
                        "tooltip": "dit_quant: this pack's layout, holds every model (SmoothQuant "
                        "vectors included). comfy_int8: ComfyUI core's int8_tensorwise layout, readable "
                        "by stock ComfyUI with INT8 support; only for models without smoothing vectors "
                        "(plain INT8, or SmoothQuant folded 'only where exact').",
                    },
                ),
            },
        }

    def save(self, model, filename: str, overwrite: bool, format: str = LAYOUT_DIT_QUANT):
        diffusion_model = model.model.diffusion_model
        recipe = getattr(diffusion_model, RECIPE_KEY, None)
        if recipe is None or not int8_layer_names(diffusion_model):
            raise ValueError("This model has no INT8 layers: quantize it first ('Quantize Model to INT8').")
        if any(k.startswith("diffusion_model.") for k in model.patches):
            raise ValueError(
                "This model has LoRA/weight patches; save the INT8 model before applying LoRAs "
                "(or quantize after them: 'Quantize Model to INT8' merges them)."
            )
        path = output_path("diffusion_models", filename, ".safetensors", overwrite)
        release_model_weights(model)
        state_dict = diffusion_model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_")}
        save_int8_checkpoint(path, state_dict, recipe, layout=format)
        logging.info("DiT Quant: saved %s", path)
        return {"ui": {"text": [path]}}


class Int8KernelPatch(ModelPatchNode):
    DISPLAY_NAME = "INT8 Kernel Patch"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Routes every INT8 Linear of the model through the chosen W8A8 kernel while sampling. "
        "auto: fused Triton kernels on NVIDIA sm_80+ (Ampere, Ada, Hopper), the torch reference "
        "elsewhere (logged once). Unquantized layers, LoRA and low-VRAM offloading are unaffected."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A model with INT8 layers."}),
                "backend": (
                    BACKENDS,
                    {
                        "default": "auto",
                        "tooltip": "auto: Triton where supported, else torch. "
                        "triton: force the Triton kernels. torch: the "
                        "plain-torch reference (any device).",
                    },
                ),
            }
        }

    def patch(self, model, backend: str):
        if not int8_layer_names(model.model.diffusion_model):
            raise ValueError(
                "This model has no INT8 layers: load an INT8 checkpoint or quantize the model first."
            )

        def run_with_backend(executor, *args, **kwargs):
            with kernel_backend(backend):
                return executor(*args, **kwargs)

        return (add_apply_model_wrapper(model, "dit_quant_int8_backend", run_with_backend),)


NODE_CLASSES = [LoadInt8DiffusionModel, QuantizeModelInt8, SaveInt8Model, Int8KernelPatch]
