"""INT8 W8A8 checkpoints: safetensors with per-layer tensors and a JSON recipe in the header.

Layout (keys are ComfyUI diffusion-model state-dict keys, no ``model.diffusion_model.`` prefix):
  ``<layer>.weight``        int8 [N, K]   quantized layers (per-output-channel symmetric)
  ``<layer>.weight_scale``  fp32 [N]
  ``<layer>.smooth``        fp32 [K]      only where a SmoothQuant vector is not folded away
  ``<layer>.bias``          compute dtype
  every other tensor        as in the source model (protected layers, norms, embedders)
Header metadata ``dit_quant_recipe``: JSON with ``format``, ``format_version``, ``quantized_layers``,
``protected_layers`` and the quantization settings (SmoothQuant α, calibration summary, ...).

Files in ComfyUI core's per-layer INT8 layout (``comfy_int8_format``) are read too, and written where the
model is exactly representable there; such files carry the recipe only as ``dit_quant_source_recipe``
(information), so stock ComfyUI and this pack both see them as ComfyUI-layout files.
"""

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_io import atomic_path
from .comfy_int8_format import (
    COMFY_QUANT_SUFFIX,
    INT8_FORMAT,
    LEGACY_METADATA_KEY,
    ComfyInt8FormatError,
    export_comfy_int8,
    read_comfy_int8,
)

FORMAT_NAME = "dit_quant.int8_w8a8"
FORMAT_VERSION = 1
RECIPE_KEY = "dit_quant_recipe"
SOURCE_RECIPE_KEY = "dit_quant_source_recipe"
# File layouts: this pack's (smoothing vectors allowed) and ComfyUI core's int8_tensorwise.
LAYOUT_DIT_QUANT = "dit_quant"
LAYOUT_COMFY_INT8 = "comfy_int8"
LAYOUTS = [LAYOUT_DIT_QUANT, LAYOUT_COMFY_INT8]


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
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    recipe: dict[str, Any],
    layout: str = LAYOUT_DIT_QUANT,
) -> None:
    """Validates ``state_dict`` (this pack's layout) + ``recipe`` and writes them to ``path`` atomically.

    layout: ``"dit_quant"`` (recipe in ``dit_quant_recipe``) or ``"comfy_int8"`` (ComfyUI core's
    int8_tensorwise layout, readable by stock ComfyUI with INT8 support; the recipe goes to
    ``dit_quant_source_recipe``). A model with unfolded smoothing vectors is refused for comfy_int8
    before anything is written.
    """
    validate_int8_state_dict(state_dict, recipe, str(path))
    if layout == LAYOUT_DIT_QUANT:
        metadata = {RECIPE_KEY: json.dumps(recipe)}
    elif layout == LAYOUT_COMFY_INT8:
        try:
            state_dict, metadata = export_comfy_int8(state_dict, recipe["quantized_layers"])
        except ComfyInt8FormatError as e:
            raise CheckpointError(
                f"{path}: not written as {LAYOUT_COMFY_INT8}: {e}. Save with format '{LAYOUT_DIT_QUANT}' "
                "instead, which keeps the smoothing vectors"
            ) from e
        metadata = {**metadata, SOURCE_RECIPE_KEY: json.dumps(recipe)}
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _read_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(tensor names, header metadata) of a safetensors file. Raises CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _parse_recipe(path: str | os.PathLike, metadata: dict[str, str], key: str) -> dict[str, Any] | None:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the {key} header is not valid JSON ({e})") from e


def _read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor data unreadable, the file may be truncated ({e})") from e


def _load_comfy_int8(
    path: str | os.PathLike, metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        state_dict, layers = read_comfy_int8(_read_tensors(path), metadata)
    except ComfyInt8FormatError as e:
        raise CheckpointError(f"{path}: {e}") from e
    source = _parse_recipe(path, metadata, SOURCE_RECIPE_KEY)
    if (
        isinstance(source, dict)
        and source.get("format") == FORMAT_NAME
        and sorted(source.get("quantized_layers", [])) == layers
    ):
        recipe = source  # written by this pack: the recipe it was made with
    else:
        recipe = make_recipe(layers, [], method=f"imported from ComfyUI's {INT8_FORMAT} layout")
    validate_int8_state_dict(state_dict, recipe, str(path))
    return state_dict, recipe


def load_int8_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and validates an INT8 checkpoint; returns (state_dict in this pack's layout, recipe).

    Files in ComfyUI core's int8_tensorwise layout are converted (exactly: same int8 weights, scales
    as fp32 [N]); their recipe lists the quantized layers and no protected ones.
    """
    keys, metadata = _read_header(path)
    recipe = _parse_recipe(path, metadata, RECIPE_KEY)
    comfy_layout = LEGACY_METADATA_KEY in metadata or any(k.endswith(COMFY_QUANT_SUFFIX) for k in keys)
    if recipe is None and comfy_layout:
        return _load_comfy_int8(path, metadata)
    if recipe is None:
        raise CheckpointError(
            f"{path}: no {RECIPE_KEY} metadata and no ComfyUI {INT8_FORMAT} layers, so this is not a "
            "DiT Quant INT8 checkpoint (use ComfyUI's stock 'Load Diffusion Model' for ordinary files)"
        )
    if recipe.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: recipe format {recipe.get('format')!r} is not {FORMAT_NAME!r}")
    if int(recipe.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {recipe['format_version']} is newer than this pack "
            f"understands ({FORMAT_VERSION}); update DiT Quant"
        )
    state_dict = _read_tensors(path)
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
