"""Replace the Linear layers of a module tree by INT8 layers, sharing every other tensor with the source."""

import copy
from collections.abc import Callable, Iterable, Iterator

import torch

from .calibration import linear_like_modules
from .int8_linear import Int8Linear
from .layer_rules import DEFAULT_RULES, LayerRule, should_quantize

# (weight [N, K] float, bias [N] or None, smooth [K] or None) → quantized module
LayerFactory = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.nn.Module]


def float_linear_layers(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every not-yet-quantized Linear-like layer below ``root``: a 2-D ``weight``."""
    for name, module in linear_like_modules(root):
        weight = getattr(module, "weight", None)
        if not isinstance(module, Int8Linear) and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            yield name, module


def plan_quantization(
    root: torch.nn.Module, rules: Iterable[LayerRule] = DEFAULT_RULES
) -> tuple[list[str], dict[str, str]]:
    """Applies the layer rules: returns (names to quantize, {kept name: reason})."""
    rules = tuple(rules)
    quantize, keep = [], {}
    for name, module in float_linear_layers(root):
        n, k = module.weight.shape
        ok, reason = should_quantize(name, k, n, rules)
        if ok:
            quantize.append(name)
        else:
            keep[name] = reason
    return quantize, keep


def _shallow_tree_copy(module: torch.nn.Module) -> torch.nn.Module:
    """New module objects down the whole tree; parameters and buffers are the same tensors."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        name: None if child is None else _shallow_tree_copy(child) for name, child in module._modules.items()
    }
    return clone


def quantized_copy(
    root: torch.nn.Module,
    names: Iterable[str],
    make_layer: LayerFactory = Int8Linear.from_float,
    weight_of: Callable[[str, torch.nn.Module], torch.Tensor] | None = None,
    smooth_of: Callable[[str], torch.Tensor | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.nn.Module:
    """A copy of ``root`` whose layers ``names`` are quantized; ``root`` itself is left untouched.

    weight_of(name, module) gives the float weight to quantize (default: ``module.weight``; use it to
    bake in LoRA patches); smooth_of(name) gives a SmoothQuant vector [K] or None.
    """
    names = list(names)
    new_root = _shallow_tree_copy(root)
    for i, name in enumerate(names):
        parent_name, _, child_name = name.rpartition(".")
        parent = new_root.get_submodule(parent_name) if parent_name else new_root
        source = getattr(parent, child_name)
        weight = weight_of(name, source) if weight_of is not None else source.weight
        smooth = smooth_of(name) if smooth_of is not None else None
        bias = None if source.bias is None else source.bias.detach()
        setattr(parent, child_name, make_layer(weight.detach(), bias, smooth))
        if progress is not None:
            progress(i + 1, len(names))
    return new_root
