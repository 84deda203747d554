"""ComfyUI core's per-layer INT8 layout: read it into this pack's layout, and export to it when exact.

ComfyUI core (releases after 0.3.75, INT8 through comfy-kitchen) marks each quantized layer with
  ``<layer>.comfy_quant``   uint8 tensor: UTF-8 bytes of a JSON object, e.g. {"format": "int8_tensorwise"}
  ``<layer>.weight``        int8 [N, K]
  ``<layer>.weight_scale``  fp32: one value (per tensor) or one per output row ([N] or [N, 1])
Activations are quantized per row at run time, as in this pack; there is no static input scale and no
smoothing vector. ComfyUI 0.3.75 and earlier kept the per-layer configs in the safetensors header
instead: ``_quantization_metadata`` = {"format_version": "1.0", "layers": {"<layer>": {"format": ...}}}.
Configs with ``"convrot": true`` hold Hadamard-rotated weights (the activations must be rotated too);
this pack does not implement that rotation and refuses such layers.

This pack's layout (``int8_checkpoint``): ``<layer>.weight`` int8 [N, K], ``<layer>.weight_scale`` fp32 [N],
optional ``<layer>.smooth`` fp32 [K].
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

COMFY_QUANT_SUFFIX = ".comfy_quant"
LEGACY_METADATA_KEY = "_quantization_metadata"
INT8_FORMAT = "int8_tensorwise"
_IGNORED_CONFIG_KEYS = {"format", "full_precision_matrix_mult"}


class ComfyInt8FormatError(ValueError):
    """A state dict that cannot be converted (the message names the layer and the problem)."""


def encode_layer_config(config: Mapping[str, Any]) -> torch.Tensor:
    """A ``comfy_quant`` tensor: uint8 [n] holding the UTF-8 JSON of ``config``."""
    return torch.tensor(list(json.dumps(dict(config)).encode("utf-8")), dtype=torch.uint8)


def decode_layer_config(tensor: torch.Tensor, key: str) -> dict[str, Any]:
    """The JSON object stored in a ``comfy_quant`` tensor (``key`` names it in errors)."""
    if tensor.dtype != torch.uint8 or tensor.ndim != 1:
        raise ComfyInt8FormatError(
            f"{key}: expected a 1-D uint8 tensor of JSON bytes, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    try:
        config = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ComfyInt8FormatError(f"{key}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(config, dict):
        raise ComfyInt8FormatError(f"{key}: expected a JSON object, got {type(config).__name__}")
    return config


def _layer_configs(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    legacy = (metadata or {}).get(LEGACY_METADATA_KEY)
    if legacy is not None:
        try:
            parsed = json.loads(legacy)
        except json.JSONDecodeError as e:
            raise ComfyInt8FormatError(f"header {LEGACY_METADATA_KEY} is not valid JSON ({e})") from e
        if not isinstance(parsed, dict) or not isinstance(parsed.get("layers"), dict):
            raise ComfyInt8FormatError(f"header {LEGACY_METADATA_KEY} lacks a 'layers' object")
        for layer, config in parsed["layers"].items():
            if not isinstance(config, dict):
                raise ComfyInt8FormatError(
                    f"header {LEGACY_METADATA_KEY}: layer {layer!r} config is not an object"
                )
            configs[layer] = config
    for key, tensor in state_dict.items():
        if key.endswith(COMFY_QUANT_SUFFIX):
            layer = key[: -len(COMFY_QUANT_SUFFIX)]
            config = decode_layer_config(tensor, key)
            if layer in configs and configs[layer] != config:
                raise ComfyInt8FormatError(
                    f"layer {layer!r}: {key} says {config}, header {LEGACY_METADATA_KEY} "
                    f"says {configs[layer]}"
                )
            configs[layer] = config
    return configs


def _check_config(layer: str, config: Mapping[str, Any]) -> None:
    fmt = config.get("format")
    if fmt != INT8_FORMAT:
        raise ComfyInt8FormatError(
            f"layer {layer!r} uses quantization format {fmt!r}; only {INT8_FORMAT!r} "
            "can be read into an INT8 W8A8 model"
        )
    if config.get("convrot"):
        raise ComfyInt8FormatError(
            f"layer {layer!r} is ConvRot INT8 (Hadamard-rotated weights, group size "
            f"{config.get('convrot_groupsize')}); DiT Quant does not implement the rotation its activations "
            "need — load this file with stock ComfyUI instead"
        )
    unknown = {k for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS and v not in (False, None)}
    if unknown:
        raise ComfyInt8FormatError(f"layer {layer!r}: unsupported comfy_quant option(s) {sorted(unknown)}")


def read_comfy_int8(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Converts a ComfyUI-core INT8 state dict to this pack's layout.

    state_dict: the file's tensors; metadata: its safetensors header (for the legacy form).
    Returns (state dict with ``<layer>.weight`` int8 [N, K] and ``<layer>.weight_scale`` fp32 [N] —
    per-tensor scales broadcast — and no ``comfy_quant`` tensors; other tensors unchanged, no smoothing
    vectors, sorted names of the quantized layers). Raises ComfyInt8FormatError on anything else.
    """
    configs = _layer_configs(state_dict, metadata)
    if not configs:
        raise ComfyInt8FormatError(
            "no comfy_quant tensors and no _quantization_metadata header: "
            "this is not a ComfyUI quantized checkpoint"
        )
    out = {k: v for k, v in state_dict.items() if not k.endswith(COMFY_QUANT_SUFFIX)}
    for layer, config in configs.items():
        _check_config(layer, config)
        weight, scale = out.get(f"{layer}.weight"), out.get(f"{layer}.weight_scale")
        if weight is None or scale is None:
            raise ComfyInt8FormatError(
                f"layer {layer!r} is marked {INT8_FORMAT} but lacks its weight or weight_scale"
            )
        if f"{layer}.input_scale" in out:
            raise ComfyInt8FormatError(
                f"layer {layer!r} has a static input_scale; DiT Quant only quantizes "
                "activations dynamically per row"
            )
        if weight.dtype != torch.int8 or weight.ndim != 2:
            raise ComfyInt8FormatError(
                f"{layer}.weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        n = weight.shape[0]
        if (
            not scale.is_floating_point()
            or scale.numel() not in (1, n)
            or (scale.numel() == n and scale.ndim > 1 and tuple(scale.shape) != (n, 1))
        ):
            raise ComfyInt8FormatError(
                f"{layer}.weight_scale must hold 1 or {n} float values ([{n}] or [{n}, 1]), "
                f"got {scale.dtype} {tuple(scale.shape)}"
            )
        scale = scale.float().reshape(-1).expand(n).contiguous()
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise ComfyInt8FormatError(f"{layer}.weight_scale has negative or non-finite values")
        out[f"{layer}.weight_scale"] = scale
    return out, sorted(configs)


def export_comfy_int8(
    state_dict: Mapping[str, torch.Tensor], quantized_layers: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Converts this pack's INT8 state dict to ComfyUI core's per-layer layout.

    Each quantized layer gets ``<layer>.comfy_quant`` = {"format": "int8_tensorwise"} and its per-row
    ``weight_scale`` as fp32 [N, 1]; every other tensor is copied unchanged. Returns (state dict,
    safetensors metadata — empty: the per-layer form needs no header). Refuses layers with an unfolded
    SmoothQuant vector (``<layer>.smooth``): ComfyUI's layout has no place for it, and dropping it would
    change the model. Fold the smoothing into the preceding operation, or quantize without SmoothQuant.
    """
    smoothed = [layer for layer in quantized_layers if f"{layer}.smooth" in state_dict]
    if smoothed:
        raise ComfyInt8FormatError(
            f"{len(smoothed)} layer(s) carry an unfolded SmoothQuant vector ({', '.join(smoothed[:3])}"
            f"{', ...' if len(smoothed) > 3 else ''}); ComfyUI's int8_tensorwise layout cannot represent it. "
            "Fold the smoothing into the preceding adaLN/norm, or quantize without SmoothQuant, to export"
        )
    out = dict(state_dict)
    for layer in quantized_layers:
        weight, scale = state_dict.get(f"{layer}.weight"), state_dict.get(f"{layer}.weight_scale")
        if weight is None or scale is None or weight.dtype != torch.int8 or weight.ndim != 2:
            raise ComfyInt8FormatError(f"layer {layer!r} is not an INT8 layer (int8 weight + weight_scale)")
        if scale.numel() != weight.shape[0]:
            raise ComfyInt8FormatError(
                f"{layer}.weight_scale has {scale.numel()} values for N={weight.shape[0]}"
            )
        out[f"{layer}.weight_scale"] = scale.float().reshape(-1, 1).contiguous()
        out[f"{layer}{COMFY_QUANT_SUFFIX}"] = encode_layer_config({"format": INT8_FORMAT})
    return out, {}
