"""Helpers for handing ComfyUI MODELs (ModelPatcher) to the quantizers."""

import copy
import os
import uuid
from collections.abc import Callable

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import folder_paths
import torch

from .lora_patcher import QuantModelPatcher, quant_model_patcher


def load_with_operations(
    name: str,
    state_dict: dict[str, torch.Tensor],
    operations: type,
    unloaded_layers: Callable[[torch.nn.Module], list[str]],
    error: type[Exception] = ValueError,
    detail: str = "",
) -> comfy.model_patcher.ModelPatcher:
    """The MODEL of file ``name``'s ``state_dict`` built with our ``operations`` class, its architecture
    detected as the stock loader does.

    Refuses (``error``, naming the file) tensors ComfyUI detects no architecture from (``detail`` is added
    to that message) and a file that lacks layers of the detected architecture (``unloaded_layers``).
    """
    patcher = comfy.sd.load_diffusion_model_state_dict(
        state_dict, model_options={"custom_operations": operations}
    )
    if patcher is None:
        raise error(f"{name}: ComfyUI could not detect the model architecture from its tensors{detail}")
    missing = unloaded_layers(patcher.model.diffusion_model)
    if missing:
        raise error(
            f"{name}: the detected architecture expects layers the file lacks: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return patcher


def release_model_weights(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Unloads every loaded copy of this model so its module weights are the unpatched originals."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        other = loaded[i].model
        if other is not None and other.model is patcher.model:
            loaded.pop(i).model_unload()


def patched_weight(
    patcher: comfy.model_patcher.ModelPatcher, layer: str, module: torch.nn.Module, param: str = "weight"
) -> torch.Tensor:
    """The layer's float ``param`` tensor (weight, bias, ...) with the patcher's patches (LoRA, ...)
    merged, in fp32."""
    key = f"diffusion_model.{layer}.{param}"
    tensor = getattr(module, param).detach().float()
    if key in patcher.patches:
        tensor = comfy.lora.calculate_weight(patcher.patches[key], tensor.clone(), key)
    return tensor


def with_new_diffusion_model(
    patcher: comfy.model_patcher.ModelPatcher, diffusion_model: torch.nn.Module, consumed_layers: list[str]
) -> QuantModelPatcher:
    """A new MODEL like ``patcher`` (options, wrappers, remaining patches) around another diffusion model
    with quantized layers (a :class:`QuantModelPatcher`: LoRA runs beside them).

    Patches of ``consumed_layers``' weights are dropped: the caller merged them.
    """
    base = copy.copy(patcher.model)
    base._modules = dict(patcher.model._modules)
    base.diffusion_model = diffusion_model
    new = quant_model_patcher(patcher.clone())
    consumed = {f"diffusion_model.{name}.weight" for name in consumed_layers}
    new.model = base
    new.patches = {k: v[:] for k, v in patcher.patches.items() if k not in consumed}
    new.patches_uuid = uuid.uuid4()
    new.backup, new.object_patches_backup, new.pinned, new.parent = {}, {}, set(), None
    new.size = comfy.model_management.module_size(base)
    return new


def output_path(folder: str, filename: str, extension: str, overwrite: bool) -> str:
    """Where a save node writes ``filename`` (+ ``extension``) in ComfyUI's model ``folder``.

    Refuses an empty name and an existing file unless ``overwrite``; path parts of the name are dropped.
    """
    name = os.path.basename(filename.strip())
    if not name:
        raise ValueError("filename is empty")
    if not name.endswith(extension):
        name += extension
    path = os.path.join(folder_paths.get_folder_paths(folder)[0], name)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; set overwrite to replace it.")
    return path


class ModelPatchNode:
    """Base of the pack's MODEL -> MODEL patch nodes: ``patch(model, ...)`` returns one patched MODEL."""

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"
    ENABLED_INPUT = ("BOOLEAN", {"default": True, "tooltip": "Off returns the model unchanged."})
