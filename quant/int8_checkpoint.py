"""INT8 W8A8 checkpoints: safetensors with per-layer tensors and a JSON recipe in the header.

Layout (keys are ComfyUI diffusion-model state-dict keys, no ``model.diffusion_model.`` prefix):
  ``<layer>.weight``        int8 [N, K]   quantized layers (per-output-channel symmetric)
  ``<layer>.weight_scale``  fp32 [N]
  ``<layer>.smooth``        fp32 [K]      only where a SmoothQuant vector is not folded away
  ``<layer>.bias``          compute dtype
  every other tensor        as in the source model (protected layers, norms, embedders)
Header metadata ``dit_quant_recipe``: JSON with ``format``, ``format_version``, ``quantized_layers``,
``protected_layers`` and the quantization settings (SmoothQuant α, calibration summary, ...).
"""

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_io import atomic_path

FORMAT_NAME = "dit_quant.int8_w8a8"
FORMAT_VERSION = 1
RECIPE_KEY = "dit_quant_recipe"


class CheckpointError(ValueError):
    """A file that is not a valid checkpoint of the expected kind (message names the file and the problem)."""


def make_recipe(quantized_layers: list[str], protected_layers: list[str], **settings: Any) -> dict[str, Any]:
    """The JSON recipe stored with a checkpoint; ``settings`` holds α, calibration summary, source, ..."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "weights": "int8, symmetric, per output channel",
        "activations": "int8, symmetric, per token, dynamic",
        "quantized_layers": sorted(quantized_layers),
        "protected_layers": sorted(protected_layers),
        **settings,
    }


def save_int8_checkpoint(
    path: str | os.PathLike, state_dict: dict[str, torch.Tensor], recipe: dict[str, Any]
) -> None:
    """Validates and writes ``state_dict`` + ``recipe`` to ``path`` atomically."""
    validate_int8_state_dict(state_dict, recipe, str(path))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={RECIPE_KEY: json.dumps(recipe)})


def read_recipe(path: str | os.PathLike) -> dict[str, Any] | None:
    """The recipe of a safetensors file, or None when it has none. Raises CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if RECIPE_KEY not in metadata:
        return None
    try:
        recipe = json.loads(metadata[RECIPE_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the {RECIPE_KEY} header is not valid JSON ({e})") from e
    return recipe


def load_int8_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and validates an INT8 checkpoint; returns (state_dict, recipe)."""
    recipe = read_recipe(path)
    if recipe is None:
        raise CheckpointError(
            f"{path}: no {RECIPE_KEY} metadata, so this is not a DiT Quant INT8 checkpoint "
            "(use ComfyUI's stock 'Load Diffusion Model' for ordinary files)"
        )
    if recipe.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: recipe format {recipe.get('format')!r} is not {FORMAT_NAME!r}")
    if int(recipe.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {recipe['format_version']} is newer than this pack "
            f"understands ({FORMAT_VERSION}); update DiT Quant"
        )
    try:
        state_dict: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state_dict[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor data unreadable, the file may be truncated ({e})") from e
    validate_int8_state_dict(state_dict, recipe, str(path))
    return state_dict, recipe


def validate_int8_state_dict(state_dict: dict[str, torch.Tensor], recipe: dict[str, Any], where: str) -> None:
    """Checks that every layer the recipe calls quantized has consistent int8 tensors."""
    for layer in recipe["quantized_layers"]:
        weight = state_dict.get(f"{layer}.weight")
        scale = state_dict.get(f"{layer}.weight_scale")
        if weight is None or scale is None:
            raise CheckpointError(
                f"{where}: quantized layer {layer!r} lacks its weight or weight_scale tensor"
            )
        if weight.dtype != torch.int8 or weight.ndim != 2:
            raise CheckpointError(
                f"{where}: {layer}.weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        if scale.dtype != torch.float32 or scale.shape != (weight.shape[0],):
            raise CheckpointError(
                f"{where}: {layer}.weight_scale must be fp32 [{weight.shape[0]}], got "
                f"{scale.dtype} {tuple(scale.shape)}"
            )
        smooth = state_dict.get(f"{layer}.smooth")
        if smooth is not None and (smooth.dtype != torch.float32 or smooth.shape != (weight.shape[1],)):
            raise CheckpointError(
                f"{where}: {layer}.smooth must be fp32 [{weight.shape[1]}], got "
                f"{smooth.dtype} {tuple(smooth.shape)}"
            )
    smoothed = (recipe.get("smoothquant") or {}).get("smoothed_layers", [])
    for layer in smoothed:
        if f"{layer}.smooth" not in state_dict:
            raise CheckpointError(
                f"{where}: the recipe says layer {layer!r} is smoothed but its smooth vector is missing"
            )
    quantized = set(recipe["quantized_layers"])
    for key, tensor in state_dict.items():
        if tensor.dtype == torch.int8 and key.rsplit(".", 1)[0] not in quantized:
            raise CheckpointError(f"{where}: int8 tensor {key!r} belongs to no quantized layer of the recipe")
