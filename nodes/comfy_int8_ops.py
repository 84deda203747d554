"""ComfyUI side of the INT8 layer: low-VRAM weight offloading, LoRA, the loader's operations class."""

import comfy.model_management
import comfy.ops
import torch

from ..kernels import w8a8_linear
from ..quant.int8_linear import Int8Linear, active_backend
from ..quant.int8_weights import INT8_MAX
from ..quant.lora_branch import LowRankBranch


def moves_weights_per_call(layer: torch.nn.Module) -> bool:
    """ComfyUI moves or recomputes this layer's weights on every call: low-VRAM offloading
    (``comfy_cast_weights``) or per-call weight/bias functions (e.g. low-VRAM LoRA patches)."""
    return bool(getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


class ComfyInt8Linear(Int8Linear, comfy.ops.CastWeightBiasOp):
    """Int8Linear that follows ComfyUI's protocols.

    - Low VRAM: when ModelPatcher leaves the weights on the offload device it sets ``comfy_cast_weights``;
      the int8 tensors are then moved to the input's device per call (4x fewer bytes than bf16).
    - LoRA: ``lora_branch`` (attached by nodes/lora_patcher.py) adds the low-rank update beside the
      kernel; the int8 weight is never rewritten. Patches that cannot run as a branch (LoHa, LoKr, DoRA,
      full diffs...) are merged by ModelPatcher through ``convert_weight``/``set_weight``: the merged
      weight is re-quantized with the layer's fixed scales, so un-patching restores the exact original.
    """

    lora_branch: LowRankBranch | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if moves_weights_per_call(self):
            y = self._forward_moving_weights(x)
        else:
            y = super().forward(x)
        return y if self.lora_branch is None else self.lora_branch.add_to(y, x)

    def _forward_moving_weights(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        non_blocking = comfy.model_management.device_supports_non_blocking(device)

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return (
                None
                if t is None
                else comfy.model_management.cast_to(t, None, device, non_blocking=non_blocking)
            )

        weight, scale, smooth, bias = (
            move(t) for t in (self.weight, self.weight_scale, self.smooth, self.bias)
        )
        for f in self.weight_function:
            weight = f(weight)
        for f in self.bias_function:
            bias = f(bias)
        return w8a8_linear(x, weight, scale, bias, smooth, backend=active_backend())

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """int8 values (as float) → float weight in the input space, for LoRA merging."""
        w = weight.float() * self.weight_scale.to(weight.device)[:, None]
        if self.smooth is not None:
            w = w / self.smooth.to(weight.device)[None, :]
        return w

    def set_weight(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """Re-quantizes a merged float weight with this layer's fixed scales (values past ±127 saturate)."""
        w = weight.float()
        if self.smooth is not None:
            w = w * self.smooth.to(w.device)[None, :]
        q = (
            torch.round(w / self.weight_scale.to(w.device)[:, None])
            .clamp_(-INT8_MAX, INT8_MAX)
            .to(torch.int8)
        )
        if return_weight:
            return q
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        return None


def make_int8_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None
) -> ComfyInt8Linear:
    """Quantizes one float layer into a ComfyInt8Linear (the factory for quant.model_quantizer)."""
    return ComfyInt8Linear.from_float(weight, bias, smooth)


class Int8Operations(comfy.ops.manual_cast):
    """Operations for building a model from an INT8 checkpoint.

    A Linear allocates nothing at construction; its state-dict entries decide what it becomes:
    int8 ``weight`` + ``weight_scale`` → a ComfyInt8Linear holding exactly those tensors (no float copy
    is ever made), anything else → an ordinary ComfyUI Linear in the compute dtype.
    """

    class Linear(comfy.ops.manual_cast.Linear):
        def __init__(
            self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
        ) -> None:
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.compute_dtype = dtype
            # Zero-size placeholders: the model is moved between devices before weights arrive.
            self.weight = torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
            self.bias = (
                torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
                if bias
                else None
            )

        def reset_parameters(self) -> None:
            return None

        def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ) -> None:
            tensors = {
                name: state_dict.pop(prefix + name, None)
                for name in ("weight", "weight_scale", "smooth", "bias")
            }
            weight = tensors["weight"]
            if weight is None:
                missing_keys.append(prefix + "weight")
                return
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}weight has shape {list(weight.shape)} but this model's layer is "
                    f"[{self.out_features}, {self.in_features}] (a checkpoint of another model size?)"
                )
                return
            if weight.dtype == torch.int8:
                if tensors["weight_scale"] is None:
                    error_msgs.append(f"{prefix}weight is int8 but {prefix}weight_scale is missing")
                    return
                self.__class__ = ComfyInt8Linear
                self.set_quantized(weight, tensors["weight_scale"], tensors["smooth"], tensors["bias"])
                return
            cast = {"dtype": self.compute_dtype} if self.compute_dtype is not None else {}
            self.weight = torch.nn.Parameter(weight.to(**cast), requires_grad=False)
            if tensors["bias"] is not None:
                self.bias = torch.nn.Parameter(tensors["bias"].to(**cast), requires_grad=False)
            elif self.bias is not None:
                missing_keys.append(prefix + "bias")


def unloaded_layers(root: torch.nn.Module) -> list[str]:
    """Names of Linear layers of an Int8Operations model that received no weight from the checkpoint."""
    return [
        name
        for name, m in root.named_modules()
        if isinstance(m, Int8Operations.Linear) and m.weight.numel() == 0
    ]
