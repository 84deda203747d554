"""A full-size Flux model from ComfyUI's own class, its inputs at 1024x1024, and step timing (GPU scripts)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import types

import numpy as np
import torch
from w8a8_common import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from _pack import import_node_module  # noqa: E402

FLUX_DEV = dict(
    in_channels=16,
    out_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)


def import_comfy_module(name: str) -> types.ModuleType:
    """A ComfyUI module (``comfy.*``) or one of the pack's (``dit_quant.nodes.*``), without importing
    nodes/__init__.py (it imports every node family and ComfyUI's ``nodes``)."""
    comfy_path = os.environ.get("COMFYUI_PATH", str(REPO_ROOT / ".cache" / "ComfyUI"))
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    if name.startswith("dit_quant.nodes."):
        return import_node_module(name.removeprefix("dit_quant.nodes."))
    return importlib.import_module(name)


_autograd_mode = torch.no_grad


def inference_context():
    """The autograd mode the step benchmarks run in: ``torch.no_grad`` by default (all recorded runs), or
    ``torch.inference_mode`` (what ComfyUI's executor samples in) after ``use_inference_mode()``."""
    return _autograd_mode()


def use_inference_mode() -> None:
    global _autograd_mode
    _autograd_mode = torch.inference_mode


def build_flux(operations, generator: torch.Generator, std: float | None = None) -> torch.nn.Module:
    """ComfyUI's Flux at flux-dev size on the GPU in bf16 with random weights: matrices N(0, std²)
    (std=None: fan-in scaled, 1/sqrt(K)), vectors 1 + N(0, 0.02²). Never zeros."""
    flux_cls = import_comfy_module("comfy.ldm.flux.model").Flux
    model = flux_cls(dtype=torch.bfloat16, device="cuda", operations=operations, **FLUX_DEV)
    with torch.no_grad():
        for p in model.parameters():
            if p is None or not p.is_floating_point() or p.numel() == 0:
                continue
            if p.dim() >= 2:
                scale = p.shape[-1] ** -0.5 if std is None else std
                p.copy_(torch.randn(p.shape, device=p.device, generator=generator) * scale)
            else:
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, device=p.device, generator=generator))
    return model.eval()


def flux_inputs(generator: torch.Generator) -> dict:
    """Inputs of one denoising step at 1024x1024: latent [1, 16, 128, 128] (4096 image tokens), 512 T5
    tokens, CLIP pooled vector, timestep and guidance; bf16 on the GPU."""
    return {
        "x": torch.randn(1, 16, 128, 128, device="cuda", generator=generator, dtype=torch.bfloat16),
        "timestep": torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        "context": torch.randn(1, 512, 4096, device="cuda", generator=generator, dtype=torch.bfloat16),
        "y": torch.randn(1, 768, device="cuda", generator=generator, dtype=torch.bfloat16),
        "guidance": torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
    }


def time_step(model, inputs: dict, steps: int) -> tuple[float, torch.Tensor]:
    """(median ms of one model call over ``steps`` timed calls after 2 warm-up calls, last output)."""
    with inference_context():
        for _ in range(2):
            out = model(**inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return float(np.median(times)), out


def release() -> None:
    """Frees what the previous variant left in PyTorch's GPU cache."""
    gc.collect()
    torch.cuda.empty_cache()


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (what stays resident on the GPU)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def fused_blocks(model: torch.nn.Module):
    """Within: every Flux block of ``model`` runs the pack's fused forward (nodes/fused_flux.py), as the
    "Fused Flux Blocks" node sets it through ComfyUI object patches."""
    fused_flux = import_comfy_module("dit_quant.nodes.fused_flux")
    forwards = fused_flux.fused_block_forwards(model)
    blocks = [model.get_submodule(path.removesuffix(".forward")) for path in forwards]
    for block, forward in zip(blocks, forwards.values(), strict=True):
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextlib.contextmanager
def cuda_graphed(model: torch.nn.Module):
    """Within: ``model``'s forward pass replays from CUDA graphs (nodes/model_cuda_graph.py), as the
    "DiT CUDA Graphs" node sets it through a ComfyUI object patch. Yields the ``ModelCudaGraph``."""
    model_cuda_graph = import_comfy_module("dit_quant.nodes.model_cuda_graph")
    graphed = model_cuda_graph.ModelCudaGraph(model)
    model.forward = graphed
    try:
        yield graphed
    finally:
        del model.forward
        graphed.release()
