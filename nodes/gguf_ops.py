"""ComfyUI side of GGUF models: the operations class whose layers keep GGUF-quantized weights and the
state-dict wrapper that lets ComfyUI's model detection see logical shapes.

How weights stay quantized:
- the loader hands ComfyUI a state dict whose quantized tensors are :class:`GGUFStateTensor`: the raw
  GGUF bytes, reporting the logical ``shape`` (ComfyUI picks the architecture from shapes);
- :class:`GGUFOps` layers take those bytes as a plain ``uint8`` Parameter (ModelPatcher moves, offloads and
  measures it like any weight: its size is the quantized size) plus ``gguf_qtype``/``gguf_shape``;
- ``forward`` runs the fused Triton dequantize-and-multiply kernel on CUDA (kernels/gguf_dispatch.py), or
  dequantizes the layer's weight for that call only (CPU, other layer types, or weight patches present).
- ComfyUI's low-VRAM mode works unchanged: offloaded weights are moved per call by ``cast_to`` (raw bytes).
- LoRA (nodes/lora_patcher.py): plain LoRA on a Linear runs as ``lora_branch`` beside the kernel; other
  patches (LoHa, LoKr, DoRA, conv layers...) are applied per call to the dequantized weight
  (:class:`GGUFWeightPatch`, or ComfyUI's ``LowVramPatch`` for offloaded layers). LoRA never dequantizes a
  layer for good.
"""

from __future__ import annotations

import comfy.model_management
import comfy.ops
import torch
import torch.nn.functional as F

from ..kernels.gguf_dispatch import gguf_dequantize, gguf_linear
from ..quant.gguf_reader import GGUFModelFile
from ..quant.lora_branch import LowRankBranch


class GGUFStateTensor(torch.Tensor):
    """Raw GGUF bytes (uint8) in a state dict; ``shape`` is the logical shape of the weight they encode.

    Only lives between the loader and the layers' ``_load_from_state_dict``; torch operations on it return
    plain tensors (subclass propagation is disabled).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    gguf_qtype: str
    gguf_shape: torch.Size

    @classmethod
    def wrap(cls, raw: torch.Tensor, qtype: str, shape: torch.Size) -> GGUFStateTensor:
        tensor = raw.as_subclass(cls)
        tensor.gguf_qtype, tensor.gguf_shape = qtype, torch.Size(shape)
        return tensor

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.gguf_shape


class GGUFWeightPatch:
    """A weight function applying a ModelPatcher's patches (LoRA, ...) of ``key`` to a dequantized weight,
    in float32 like ComfyUI's full-load merge."""

    def __init__(self, key: str, patches: dict):
        self.key, self.patches = key, patches

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        import comfy.lora  # here, so that this module needs only comfy.ops (the GPU benchmark imports it)

        merged = comfy.lora.calculate_weight(self.patches[self.key], weight.to(torch.float32), self.key)
        return merged.to(weight.dtype)


class GGUFLayer(comfy.ops.CastWeightBiasOp):
    """Mixin for ComfyUI ``manual_cast`` layers: a GGUF-quantized weight is kept as raw bytes."""

    gguf_qtype: str | None = None
    gguf_shape: torch.Size | None = None
    gguf_mode: str = "auto"  # kernels.gguf_dispatch.MODES

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for name in ("weight", "bias"):
            value = state_dict.get(prefix + name)
            if value is None:
                if name == "weight" or getattr(self, "expects_bias", self.bias is not None):
                    missing_keys.append(prefix + name)
                continue
            if isinstance(value, GGUFStateTensor):
                raw = value.as_subclass(torch.Tensor)
                if name == "bias":
                    value = gguf_dequantize(raw, value.gguf_qtype, value.gguf_shape)
                else:
                    self.gguf_qtype, self.gguf_shape = value.gguf_qtype, value.gguf_shape
                    value = raw
            setattr(self, name, torch.nn.Parameter(value, requires_grad=False))

    def _gguf_inputs(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw weight bytes on ``device`` and the bias in ``dtype`` (with ComfyUI's bias functions)."""
        non_blocking = comfy.model_management.device_supports_non_blocking(device)
        raw = comfy.model_management.cast_to(self.weight, None, device, non_blocking=non_blocking)
        bias = None
        if self.bias is not None:
            bias = comfy.model_management.cast_to(self.bias, dtype, device, non_blocking=non_blocking)
            for f in self.bias_function:
                bias = f(bias)
        return raw, bias

    def gguf_weight(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This call's dequantized weight in ``dtype``, with the weight functions (LoRA, ...) applied."""
        if not self.weight_function:
            return gguf_dequantize(raw, self.gguf_qtype, self.gguf_shape, dtype)
        weight = gguf_dequantize(raw, self.gguf_qtype, self.gguf_shape, torch.float32)
        for f in self.weight_function:
            weight = f(weight)
        return weight.to(dtype)


class GGUFConv(GGUFLayer):
    """Mixin for ComfyUI ``manual_cast`` conv layers: convolves with this call's dequantized weight."""

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.gguf_qtype is None:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        raw, bias = self._gguf_inputs(input.device, input.dtype)
        return self._conv_forward(input, self.gguf_weight(raw, input.dtype), bias)


class GGUFOps(comfy.ops.manual_cast):
    """Operations for building a diffusion model from a GGUF state dict (see the module docstring)."""

    class Linear(GGUFLayer, comfy.ops.manual_cast.Linear):
        lora_branch: LowRankBranch | None = None

        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
            torch.nn.Module.__init__(self)  # no weight allocation: the state dict brings it
            self.in_features, self.out_features = in_features, out_features
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.expects_bias = bias

        def reset_parameters(self) -> None:
            return None

        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            if self.gguf_qtype is None:
                return super().forward_comfy_cast_weights(input)
            raw, bias = self._gguf_inputs(input.device, input.dtype)
            if self.weight_function:
                y = F.linear(input, self.gguf_weight(raw, input.dtype), bias)
            else:
                y = gguf_linear(input, raw, self.gguf_qtype, tuple(self.gguf_shape), bias, self.gguf_mode)
            return y if self.lora_branch is None else self.lora_branch.add_to(y, input)

    class Conv1d(GGUFConv, comfy.ops.manual_cast.Conv1d):
        pass

    class Conv2d(GGUFConv, comfy.ops.manual_cast.Conv2d):
        pass

    class Conv3d(GGUFConv, comfy.ops.manual_cast.Conv3d):
        pass

    class Embedding(GGUFLayer, comfy.ops.manual_cast.Embedding):
        def forward_comfy_cast_weights(self, input: torch.Tensor, out_dtype: torch.dtype | None = None):
            if self.gguf_qtype is None:
                return super().forward_comfy_cast_weights(input, out_dtype=out_dtype)
            dtype = out_dtype or torch.float32
            raw, _ = self._gguf_inputs(input.device, dtype)
            return F.embedding(
                input,
                self.gguf_weight(raw, dtype),
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )


def gguf_layers(root: torch.nn.Module) -> dict[str, GGUFLayer]:
    """The layers of a model that hold a GGUF-quantized weight, by module name."""
    return {
        name: m for name, m in root.named_modules() if isinstance(m, GGUFLayer) and m.gguf_qtype is not None
    }


def unloaded_layers(root: torch.nn.Module) -> list[str]:
    """Names of Linear layers of a GGUFOps model that received no weight from the file."""
    return [name for name, m in root.named_modules() if isinstance(m, GGUFOps.Linear) and m.weight is None]


def state_dict_for_comfy(model_file: GGUFModelFile) -> dict[str, torch.Tensor]:
    """The state dict handed to ``comfy.sd.load_diffusion_model_state_dict``.

    Quantized layer weights (``*.weight``, 2+ dims) stay raw bytes as :class:`GGUFStateTensor`; other
    quantized tensors (plain parameters such as modulations or position embeddings, which no layer
    dequantizes) are dequantized to float32 here; float tensors are copied out of the memory map.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in model_file.tensors.items():
        if not tensor.qtype.quantized:
            state_dict[key] = tensor.data.clone()
        elif key.endswith(".weight") and len(tensor.shape) >= 2:
            state_dict[key] = GGUFStateTensor.wrap(tensor.data, tensor.qtype.name, tensor.shape)
        else:
            state_dict[key] = gguf_dequantize(tensor.data, tensor.qtype.name, tensor.shape)
    return state_dict
