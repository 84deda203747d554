"""The MODEL of our INT8 and GGUF loaders and quantizers: a ModelPatcher whose LoRA runs as a side branch.

ComfyUI applies a LoRA by merging it into the weight: ``patch_weight_to_device`` on a full load, a
``LowVramPatch`` weight function per call for offloaded layers. For a quantized layer that means
re-quantizing the merged weight (INT8: lossy, saturating) or dequantizing it every call (GGUF).
:class:`QuantModelPatcher` instead gives every INT8/GGUF Linear whose patches are all plain LoRA a
:class:`~..quant.lora_branch.LowRankBranch`: the quantized weight stays bit-identical (same storage),
several LoRAs stack into two thin GEMMs, and a new strength (a new LoraLoader output, i.e. a clone with
other patches) only rebuilds the small branches when ComfyUI loads that clone.

Patches that cannot run as a branch (LoHa, LoKr, OFT, DoRA, full diffs, a model strength, patch
functions, conv layers) take the previous path: merged through ``convert_weight``/``set_weight`` on INT8
layers, applied per call to the dequantized weight on GGUF layers. One log line per load says which.

Branch tensors live where their layer's weight lives: on the load device after a full load, on the
offload device for an offloaded (low-VRAM) layer, from where they are moved per call like the weight.
"""

from __future__ import annotations

import collections
import logging

import comfy.model_patcher
import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..quant.int8_checkpoint import RECIPE_KEY
from ..quant.lora_branch import LowRankBranch, LowRankTerm
from .comfy_int8_ops import ComfyInt8Linear
from .gguf_ops import GGUFLayer, GGUFOps, GGUFWeightPatch

BRANCH_LAYERS = (ComfyInt8Linear, GGUFOps.Linear)


def lora_terms(patches: list) -> tuple[list[LowRankTerm], str | None]:
    """The low-rank terms of a layer's ModelPatcher patches ``(strength, adapter, strength_model, offset,
    function)``, or ([], why) when one of them cannot run as a side branch (whether their shapes fit the
    layer is checked by ``LowRankBranch``)."""
    terms = []
    for strength, adapter, strength_model, offset, function in patches:
        if type(adapter) is not LoRAAdapter:
            named = isinstance(adapter, tuple) and isinstance(adapter[0], str)
            kind = getattr(adapter, "name", None) or (adapter[0] if named else "weight diff")
            return [], f"{kind} patch"
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if dora_scale is not None:
            return [], "DoRA"
        if function is not None or strength_model != 1.0 or reshape is not None:
            return [], "patch function, model strength or reshape"
        if up.ndim != 2 or down.ndim != 2 or (mid is not None and (mid.ndim != 4 or mid.shape[2:] != (1, 1))):
            return [], "convolution-shaped LoRA"
        if offset is not None and offset[0] != 0:
            return [], "patch on a slice of the input dimension"
        rank = mid.shape[0] if mid is not None else down.shape[0]  # ComfyUI's alpha divisor
        rows = (int(offset[1]), int(offset[2])) if offset is not None else None
        scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
        terms.append(LowRankTerm(down, up, scale, mid, rows))
    return terms, None


def folded_smoothquant_layers(diffusion_model: torch.nn.Module) -> set[str]:
    """Sources and targets of the SmoothQuant sites folded into this model (from its recipe): their
    outputs / inputs are divided by the site's s, which the model does not keep."""
    recipe = getattr(diffusion_model, RECIPE_KEY, None) or {}
    sites = (recipe.get("smoothquant") or {}).get("folded_sites", [])
    return {layer for site in sites for layer in (site["source"], *site["targets"])}


def _owner(model: torch.nn.Module, key: str) -> tuple[torch.nn.Module | None, str]:
    module_name, _, param = key.rpartition(".")
    try:
        return model.get_submodule(module_name), param
    except AttributeError:
        return None, param


def _is_quantized(module: torch.nn.Module | None) -> bool:
    """An INT8 layer, or a GGUF layer (Linear, conv, embedding) holding a quantized weight."""
    return isinstance(module, ComfyInt8Linear) or (
        isinstance(module, GGUFLayer) and module.gguf_qtype is not None
    )


def _is_branch_layer(module: torch.nn.Module | None) -> bool:
    return _is_quantized(module) and isinstance(module, BRANCH_LAYERS)


class QuantModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher for models with INT8/GGUF layers: plain LoRA runs beside the quantized weight.

    Holds no state of its own (so a loader may turn a fresh ModelPatcher into one by setting
    ``__class__``); ``clone`` keeps the class (ModelPatcher.clone builds ``self.__class__``).
    """

    _fallbacks: dict[str, list[str]] | None = None  # during load(): why → keys merged instead

    def _branch(self, key: str, module: torch.nn.Module, device: torch.device | None) -> str | None:
        """Attaches the branch of ``key``'s patches to ``module`` (on ``device``, default: where its
        weight is); returns None, or why the patches cannot run as a branch."""
        n, k = module.weight.shape if isinstance(module, ComfyInt8Linear) else module.gguf_shape
        terms, why = lora_terms(self.patches[key])
        if why is not None:
            return why
        dtype = self.model.manual_cast_dtype or self.model.get_dtype()
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            dtype = torch.float32
        try:
            module.lora_branch = LowRankBranch(terms, n, k, dtype, device or module.weight.device)
        except ValueError:  # the LoRA's shapes do not fit this layer (LowRankBranch checks them)
            return "shape mismatch"
        return None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        module, param = _owner(self.model, key)
        if key not in self.patches or param != "weight" or not _is_quantized(module):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        why = self._branch(key, module, device_to) if _is_branch_layer(module) else "not a Linear layer"
        if why is None:
            return None
        self._note_fallback(key, why)
        if not isinstance(module, GGUFLayer):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        # GGUF: apply the patches to this call's dequantized weight instead of rewriting the bytes.
        if not any(isinstance(f, GGUFWeightPatch) and f.key == key for f in module.weight_function):
            module.weight_function = [*module.weight_function, GGUFWeightPatch(key, self.patches)]
        return None

    def _note_fallback(self, key: str, why: str) -> None:
        if self._fallbacks is not None:
            self._fallbacks[why].append(key)

    def _branch_offloaded_layers(self) -> int:
        """Replaces ComfyUI's LowVramPatch of every branch-able key by a branch on the offload side and
        moves every branch to its layer's weight device; returns how many LowVramPatches were removed."""
        removed = 0
        for key in self.patches:
            module, param = _owner(self.model, key)
            if param != "weight" or not _is_branch_layer(module):
                continue
            lowvram = [
                f
                for f in module.weight_function
                if isinstance(f, comfy.model_patcher.LowVramPatch) and f.key == key
            ]
            if lowvram:
                why = self._branch(key, module, None)
                if why is not None:
                    self._note_fallback(key, why)
                    continue
                module.weight_function = [f for f in module.weight_function if f not in lowvram]
                removed += len(lowvram)
            if module.lora_branch is not None and module.lora_branch.device != module.weight.device:
                module.lora_branch.to(module.weight.device)
        return removed

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        self._fallbacks = collections.defaultdict(list)
        try:
            super().load(device_to, lowvram_model_memory, force_patch_weights, full_load)
            self.model.lowvram_patch_counter -= self._branch_offloaded_layers()
        finally:
            fallbacks, self._fallbacks = self._fallbacks, None
        self._warn_about_folded_layers()
        branches = sum(1 for m in self.model.modules() if getattr(m, "lora_branch", None) is not None)
        if branches or fallbacks:
            merged = "; ".join(f"{why}: {len(keys)} (e.g. {keys[0]})" for why, keys in fallbacks.items())
            logging.info(
                "DiT Quant: LoRA on %d quantized layers as a side branch%s",
                branches,
                f"; merged into the weight instead ({merged})" if merged else "",
            )

    def _warn_about_folded_layers(self) -> None:
        folded = folded_smoothquant_layers(self.model.diffusion_model)
        patched = sorted(
            layer
            for key in self.patches
            if (layer := key.removeprefix("diffusion_model.").rpartition(".")[0]) in folded
        )
        if patched:
            logging.warning(
                "DiT Quant: LoRA patches %d layers whose SmoothQuant smoothing was folded into the model "
                "(e.g. %s); it is applied to their smoothed inputs/outputs and does not match the LoRA on "
                "the original model. Apply LoRAs before 'Apply SmoothQuant', or use fold_smoothing 'off'.",
                len(patched),
                patched[0],
            )

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        freed = super().partially_unload(device_to, memory_to_free, force_patch_weights)
        self.model.lowvram_patch_counter -= self._branch_offloaded_layers()
        _strip_gguf_patches(self.model, only_lowvram_duplicates=True)
        return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m in self.model.modules():
                if getattr(m, "lora_branch", None) is not None:
                    m.lora_branch = None
            _strip_gguf_patches(self.model, only_lowvram_duplicates=False)
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)


def _strip_gguf_patches(model: torch.nn.Module, only_lowvram_duplicates: bool) -> None:
    """Removes our per-call GGUF patches from the layers' weight functions; with the flag, only those
    that ComfyUI's own LowVramPatch for the same key now duplicates."""
    for m in model.modules():
        if not isinstance(m, GGUFLayer):
            continue
        lowvram = {f.key for f in m.weight_function if isinstance(f, comfy.model_patcher.LowVramPatch)}
        kept = [
            f
            for f in m.weight_function
            if not (isinstance(f, GGUFWeightPatch) and (f.key in lowvram or not only_lowvram_duplicates))
        ]
        if len(kept) != len(m.weight_function):
            m.weight_function = kept


def quant_model_patcher(patcher: comfy.model_patcher.ModelPatcher) -> QuantModelPatcher:
    """Turns a ModelPatcher this node just made (a loader's result, a fresh clone) into a
    QuantModelPatcher, in place; returns it."""
    patcher.__class__ = QuantModelPatcher
    return patcher
