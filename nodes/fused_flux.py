"""Fused forwards of ComfyUI's Flux blocks (``DoubleStreamBlock``, ``SingleStreamBlock``).

The stock forwards run ~25 small elementwise kernels per block around the Linear layers (LayerNorm,
modulation, head split, q/k RMSNorm, rotary embedding in fp32, concatenations, GELU, gating). These
forwards compute the same block with the fused ops of ``kernels.dit_fusions`` (one kernel per chain)
and, where the next layer is INT8, emit its int8 activation directly, so the W8A8 GEMM runs without a
separate quantization pass. Every other layer (bf16, GGUF, a layer with a LoRA branch or offloaded
weights) gets the bf16 activation and runs as usual; attention stays ComfyUI's ``optimized_attention``
(attention patches still apply). Blocks the fused path does not cover (modulation dims of Flux
Kontext-style inputs, SiLU-gated MLPs, no modulation) and torch.compile tracing run the stock forward.

Results match the stock forward to rounding: intermediates stay fp32 where stock rounds to bf16
after each op (tests/test_fused_flux.py states the tolerances).
"""

from __future__ import annotations

import functools
import logging
import types
import weakref
from collections.abc import Callable

import comfy.ldm.flux.layers as flux_layers
import comfy.ldm.flux.math as flux_math
import torch

from ..kernels import (
    gelu_concat,
    int8_gemm,
    int8_gemm_gated_add,
    layernorm_modulate,
    qk_norm_rope,
    quantize_rows,
    updatable_in_place,
)
from ..kernels.dispatch import log_once
from ..quant.int8_linear import Int8Linear, active_backend
from .comfy_int8_ops import moves_weights_per_call

logger = logging.getLogger("dit_quant.nodes")


def _feeds_int8(layer: torch.nn.Module) -> bool:
    """An INT8 layer whose int8 activation a fused op can emit: weights resident on the compute device,
    no per-call weight functions and no LoRA branch (those need the float activation)."""
    return (isinstance(layer, Int8Linear) and not moves_weights_per_call(layer)
            and getattr(layer, "lora_branch", None) is None)


def _linear(
    layer: torch.nn.Module, produce: Callable, rows: tuple[int, ...], dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """layer(activation) where ``produce(smooth=, quantize=)`` makes the activation [*rows, K]: as int8
    rows + scales straight into the W8A8 GEMM for an INT8 layer, else in ``dtype`` through the layer."""
    if _feeds_int8(layer):
        q, scale = produce(smooth=layer.smooth, quantize=True)
        out = int8_gemm(q, scale, layer.weight, layer.weight_scale, layer.bias, dtype, backend=backend)
        return out.view(*rows, -1)
    return layer(produce(smooth=None, quantize=False))


def _add_gated(x: torch.Tensor, layer: torch.nn.Module, produce: Callable, gate: torch.Tensor,
               backend: str) -> None:
    """x += gate * layer(activation) in place (``produce`` as in ``_linear``): for an INT8 layer one GEMM
    whose epilogue does the gated add (``int8_gemm_gated_add``), without a [B, L, N] intermediate."""
    if _feeds_int8(layer) and updatable_in_place(x):
        q, scale = produce(smooth=layer.smooth, quantize=True)
        int8_gemm_gated_add(q, scale, layer.weight, layer.weight_scale, layer.bias, gate, x, backend=backend)
    else:
        x.addcmul_(_linear(layer, produce, x.shape[:2], x.dtype, backend), gate)


class _SharedModulationInput:
    """silu(vec) and its int8 rows, shared by every block's modulation layer: the Flux forward hands each
    block the same ``vec`` tensor, so one activation and one quantization serve all of them (saves two
    launches per block). Valid while that tensor object is alive and unmodified (in-place updates are
    seen through the version counter, which inference tensors lack)."""

    def __init__(self) -> None:
        self._vec: weakref.ref | None = None
        self._version = -1
        self._silu: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _refresh(self, vec: torch.Tensor) -> None:
        # ComfyUI samples under torch.inference_mode, whose tensors have no version counter: there the
        # object identity alone keys the cache (the Flux forward never updates vec in place).
        version = -1 if vec.is_inference() else vec._version
        if self._vec is None or self._vec() is not vec or self._version != version:
            self._vec, self._version = weakref.ref(vec), version
            self._silu = torch.nn.functional.silu(vec[:, None, :] if vec.ndim == 2 else vec)
            self._rows = None

    def activation(self, vec: torch.Tensor, backend: str, smooth: torch.Tensor | None = None,
                   quantize: bool = False):
        """silu(vec) [B, 1 or N, D], or with ``quantize`` its int8 rows and scales (shared when the layer
        has no smoothing vector); a producer for ``_linear``."""
        self._refresh(vec)
        if not quantize:
            return self._silu
        rows = self._silu.reshape(-1, self._silu.shape[-1])
        if smooth is not None:
            return quantize_rows(rows, smooth, backend=backend)
        if self._rows is None:
            self._rows = quantize_rows(rows, backend=backend)
        return self._rows


_shared_modulation_input = _SharedModulationInput()


def _modulation(mod: flux_layers.Modulation, vec: torch.Tensor, backend: str):
    """``Modulation.forward`` with the shared silu(vec) (and its int8 rows for an INT8 layer)."""
    act = _shared_modulation_input.activation(vec, backend)
    produce = functools.partial(_shared_modulation_input.activation, vec, backend)
    out = _linear(mod.lin, produce, act.shape[:-1], act.dtype, backend).chunk(mod.multiplier, dim=-1)
    return flux_layers.ModulationOut(*out[:3]), flux_layers.ModulationOut(*out[3:]) if mod.is_double else None


def _attention(q, k, v, heads, attn_mask, transformer_options) -> torch.Tensor:
    """ComfyUI's attention on [B, H, T, D] q/k/v -> [B, T, H, D] (a view of the output in either layout
    the attention function returns)."""
    out = flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                                        mask=attn_mask, transformer_options=transformer_options)
    b, _, t, d = q.shape
    return out.transpose(1, 2) if out.dim() == 4 else out.view(b, t, heads, d)


def _qkv_buffers(like: torch.Tensor, heads: int, length: int, head_dim: int) -> list[torch.Tensor]:
    return [like.new_empty((like.shape[0], heads, length, head_dim)) for _ in range(3)]


def _norm_weights(norm: flux_layers.QKNorm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.query_norm.scale.to(device), norm.key_norm.scale.to(device)


def _gelu_mlp(mlp: torch.nn.Module) -> bool:
    return (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], torch.nn.GELU)
            and mlp[1].approximate == "tanh")


def _unsupported(x: torch.Tensor, vec, modulated: bool, gelu: bool, modulation_dims) -> str | None:
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (it fuses these ops itself)"
    if not modulated:
        return "the block has no modulation of its own"
    if not gelu:
        return "the MLP is not a tanh-GELU MLP"
    if modulation_dims is not None or (isinstance(vec, torch.Tensor) and vec.dim() == 3 and vec.shape[1] > 1):
        return "per-token modulation (Kontext-style inputs)"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations in {x.dtype}"
    return None


def fused_double_block_forward(
    block: flux_layers.DoubleStreamBlock, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None,
    modulation_dims_txt=None, transformer_options={},  # noqa: B006 (ComfyUI's signature)
):
    """``DoubleStreamBlock.forward`` with fused ops (same signature and in-place updates of img/txt)."""
    why = _unsupported(img, vec, block.modulation, _gelu_mlp(block.img_mlp) and _gelu_mlp(block.txt_mlp),
                       modulation_dims_img if modulation_dims_img is not None else modulation_dims_txt)
    if why is not None:
        log_once(f"DiT Quant: a Flux double block runs its stock forward: {why}", to=logger)
        return type(block).forward(block, img, txt, vec, pe, attn_mask, modulation_dims_img,
                                   modulation_dims_txt, transformer_options)
    backend = active_backend()
    img_mod1, img_mod2 = _modulation(block.img_mod, vec, backend)
    txt_mod1, txt_mod2 = _modulation(block.txt_mod, vec, backend)
    batch, img_len, width = img.shape
    txt_len = txt.shape[1]
    heads = block.num_heads
    head_dim = width // heads
    q, k, v = _qkv_buffers(img, heads, img_len + txt_len, head_dim)
    img_at, txt_at = (0, img_len) if block.flipped_img_txt else (txt_len, 0)
    streams = ((img, img_mod1, img_mod2, block.img_attn, block.img_mlp, img_at),
               (txt, txt_mod1, txt_mod2, block.txt_attn, block.txt_mlp, txt_at))
    for x, mod1, _, attn, _, at in streams:
        produce = functools.partial(layernorm_modulate, x, mod1.scale, mod1.shift, backend=backend)
        qkv = _linear(attn.qkv, produce, x.shape[:2], x.dtype, backend)
        qk_norm_rope(qkv, *_norm_weights(attn.norm, x.device), pe, q, k, v, at, backend=backend)
    out = _attention(q, k, v, heads, attn_mask, transformer_options)
    del q, k, v
    for x, mod1, mod2, attn, mlp, at in streams:
        rows = x.shape[:2]
        stream_out = out[:, at:at + rows[1]]
        produce = functools.partial(gelu_concat, stream_out, None, out_dtype=x.dtype, backend=backend)
        _add_gated(x, attn.proj, produce, mod1.gate, backend)
        produce = functools.partial(layernorm_modulate, x, mod2.scale, mod2.shift, backend=backend)
        hidden = _linear(mlp[0], produce, rows, x.dtype, backend)
        produce = functools.partial(gelu_concat, None, hidden, backend=backend)
        _add_gated(x, mlp[2], produce, mod2.gate, backend)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def fused_single_block_forward(
    block: flux_layers.SingleStreamBlock, x, vec, pe, attn_mask=None, modulation_dims=None,
    transformer_options={},  # noqa: B006 (ComfyUI's signature)
):
    """``SingleStreamBlock.forward`` with fused ops (same signature and in-place update of x)."""
    why = _unsupported(x, vec, block.modulation is not None, isinstance(block.mlp_act, torch.nn.GELU)
                       and block.mlp_act.approximate == "tanh", modulation_dims)
    if why is not None:
        log_once(f"DiT Quant: a Flux single block runs its stock forward: {why}", to=logger)
        return type(block).forward(block, x, vec, pe, attn_mask, modulation_dims, transformer_options)
    backend = active_backend()
    mod, _ = _modulation(block.modulation, vec, backend)
    rows = x.shape[:2]
    heads = block.num_heads
    head_dim = block.hidden_size // heads
    produce = functools.partial(layernorm_modulate, x, mod.scale, mod.shift, backend=backend)
    hidden = _linear(block.linear1, produce, rows, x.dtype, backend)
    qkv, mlp = hidden[..., :3 * block.hidden_size], hidden[..., 3 * block.hidden_size:]
    q, k, v = _qkv_buffers(x, heads, rows[1], head_dim)
    qk_norm_rope(qkv, *_norm_weights(block.norm, x.device), pe, q, k, v, 0, backend=backend)
    out = _attention(q, k, v, heads, attn_mask, transformer_options)
    del q, k, v, qkv
    produce = functools.partial(gelu_concat, out, mlp, out_dtype=x.dtype, backend=backend)
    _add_gated(x, block.linear2, produce, mod.gate, backend)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


_FUSED_FORWARDS = {
    flux_layers.DoubleStreamBlock: fused_double_block_forward,
    flux_layers.SingleStreamBlock: fused_single_block_forward,
}


def fused_block_forwards(diffusion_model: torch.nn.Module) -> dict[str, types.MethodType]:
    """``"<module path>.forward"`` -> fused forward bound to that block, for every Flux double/single
    block of ``diffusion_model`` (empty for other architectures)."""
    return {
        f"{name}.forward": types.MethodType(_FUSED_FORWARDS[type(module)], module)
        for name, module in diffusion_model.named_modules()
        if type(module) in _FUSED_FORWARDS
    }
