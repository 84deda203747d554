"""GGUF nodes: load a GGUF diffusion model (weights stay quantized), save a MODEL as GGUF."""

import collections
import logging

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..kernels.gguf_dispatch import MODES, gguf_dequantize
from ..quant.gguf_reader import GGUFTensor, read_gguf
from ..quant.gguf_type_rules import PRESETS
from ..quant.gguf_types import gguf_type
from ..quant.gguf_writer import SourceTensor, write_gguf
from .comfy_model import load_with_operations, output_path, release_model_weights
from .gguf_ops import GGUFLayer, GGUFOps, gguf_layers, state_dict_for_comfy, unloaded_layers
from .lora_patcher import quant_model_patcher

CATEGORY = "DiT Quant/GGUF"
GGUF_FOLDER = "dit_quant_gguf"
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)

# .gguf files in the diffusion_models folders (``unet`` is ComfyUI's legacy alias of the same list).
# Sharing the folder list object keeps folders registered later (extra_model_paths.yaml) visible.
folder_paths.folder_names_and_paths[GGUF_FOLDER] = (
    folder_paths.folder_names_and_paths["diffusion_models"][0],
    {".gguf"},
)


class LoadGGUFDiffusionModel:
    DISPLAY_NAME = "Load Diffusion Model (GGUF)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a GGUF diffusion model (community ComfyUI-GGUF layout or written by 'Save Model as GGUF') "
        "from models/diffusion_models. Weights stay quantized in RAM and VRAM; on NVIDIA sm_80+ GPUs each "
        "layer runs the faster Triton path for its shape (a fused dequantize-and-multiply kernel for a few "
        "tokens, else Triton dequantization of that layer's weight + cuBLAS), elsewhere plain-torch "
        "dequantization per call. LoRAs run as a side branch (the GGUF bytes are never changed); low-VRAM "
        "offloading works as with the stock loader."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion model with GGUF-quantized layers.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (
                    folder_paths.get_filename_list(GGUF_FOLDER),
                    {"tooltip": "A .gguf file in models/diffusion_models (or models/unet)."},
                ),
                "kernel": (
                    list(MODES),
                    {
                        "default": "auto",
                        "tooltip": "auto: the faster Triton path per layer on NVIDIA sm_80+ (fused "
                        "dequantize+matmul for a few tokens and wide weights, else Triton dequantization + "
                        "cuBLAS), torch elsewhere. "
                        "fused: always the fused kernel; Triton errors are raised instead of falling back. "
                        "int8: Q8_0 layers on INT8 tensor cores (activations quantized per token). "
                        "dequant: dequantize each weight (Triton), then a regular matmul. "
                        "torch: the same with plain torch ops (what the common GGUF loader does).",
                    },
                ),
            }
        }

    def load(self, unet_name: str, kernel: str = "auto"):
        path = folder_paths.get_full_path_or_raise(GGUF_FOLDER, unet_name)
        model_file = read_gguf(path)
        patcher = load_with_operations(
            unet_name,
            state_dict_for_comfy(model_file),
            GGUFOps,
            unloaded_layers,
            detail=f" (general.architecture = {model_file.architecture!r})",
        )
        layers = gguf_layers(patcher.model.diffusion_model)
        for layer in layers.values():
            layer.gguf_mode = kernel
        quant_model_patcher(patcher)
        logging.info(
            "DiT Quant: loaded %s (%s): %d quantized layers; tensor types: %s",
            unet_name,
            model_file.architecture,
            len(layers),
            _type_counts_text(model_file.type_counts()),
        )
        return (patcher,)


def _type_counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def model_sources(patcher) -> dict[str, SourceTensor]:
    """Lazy write sources for every tensor of a MODEL's diffusion model, with its weight patches (LoRA, ...)
    merged in float32; GGUF layers whose weight has no patch can be written through byte for byte."""
    release_model_weights(patcher)  # module weights are the unpatched originals now
    diffusion_model = patcher.model.diffusion_model
    modules = dict(diffusion_model.named_modules())
    sources: dict[str, SourceTensor] = {}
    for key, value in diffusion_model.state_dict().items():
        module_name, _, param = key.rpartition(".")
        module = modules.get(module_name)
        patch_key = f"diffusion_model.{key}"
        patches = patcher.patches.get(patch_key)
        quantized = isinstance(module, GGUFLayer) and module.gguf_qtype is not None and param == "weight"
        if quantized:
            stored = GGUFTensor(key, gguf_type(module.gguf_qtype), module.gguf_shape, value.detach().cpu())
            shape, dtype = module.gguf_shape, None
        else:
            stored, shape, dtype = value.detach().cpu(), value.shape, value.dtype

        def load(stored=stored, patches=patches, patch_key=patch_key):
            if not patches:
                return stored
            weight = (
                gguf_dequantize(stored.data, stored.qtype.name, stored.shape)
                if isinstance(stored, GGUFTensor)
                else stored.to(torch.float32)
            )
            return comfy.lora.calculate_weight(patches, weight, patch_key)

        layer_weight = param == "weight" and isinstance(module, LAYER_TYPES) and len(shape) >= 2
        sources[key] = SourceTensor(torch.Size(shape), dtype, layer_weight, load)
    return sources


class SaveModelGGUF:
    DISPLAY_NAME = "Save Model as GGUF"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Writes the diffusion model as a GGUF file in models/diffusion_models, in the layout of the "
        "community ComfyUI-GGUF loader (both loaders read it). K-quants (Q2_K-Q6_K) use our port of "
        "llama.cpp's reference quantizer; '_M' presets give FFN down-projections and attention value/qkv "
        "one type more. 1-D and small tensors, embedders and final layers keep high precision. LoRA patches "
        "on the model are merged."
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
                    {"tooltip": "Any diffusion model (bf16/fp16/fp8, or GGUF from our loader)."},
                ),
                "filename": (
                    "STRING",
                    {
                        "default": "dit_gguf",
                        "tooltip": "File name in models/diffusion_models; .gguf is added.",
                    },
                ),
                "preset": (
                    list(PRESETS),
                    {
                        "default": "Q4_K_M",
                        "tooltip": "Weight type. Q8_0 is quality-neutral; Q4_K_M is the usual size/quality "
                        "pick; '_M' bumps sensitive layers one type up. A GGUF layer already in the chosen "
                        "type is copied, not re-quantized.",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Replace an existing file of that name."},
                ),
            }
        }

    def save(self, model, filename: str, preset: str, overwrite: bool):
        path = output_path("diffusion_models", filename, ".gguf", overwrite)
        sources = model_sources(model)
        bar = comfy.utils.ProgressBar(len(sources))
        device = comfy.model_management.get_torch_device()
        plans = write_gguf(
            path,
            sources,
            preset,
            metadata={"dit_quant.source": "ComfyUI MODEL"},
            progress=lambda done, total: bar.update_absolute(done, total),
            device=device if device.type == "cuda" else None,
        )
        counts = collections.Counter(plan.qtype for plan in plans)
        logging.info("DiT Quant: saved %s (%s)", path, _type_counts_text(counts))
        return {"ui": {"text": [path]}}


NODE_CLASSES = [LoadGGUFDiffusionModel, SaveModelGGUF]
