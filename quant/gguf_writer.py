"""Write GGUF diffusion-model files in the community (ComfyUI-GGUF) layout, streaming one tensor at a time.

F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are encoded by the ``gguf`` package, Q2_K-Q6_K by our port of the
ggml reference quantizers (quant/gguf_kquants.py). The layout matches ComfyUI-GGUF's converter: tensor
names are ComfyUI state-dict keys without prefix, ``general.architecture`` names the family, and a tensor
stored with another shape than its own (conv weights flattened to [out, in*kh*kw] rows) carries its shape
in the INT32 array ``comfy.gguf.orig_shape.<name>``. The file appears atomically (temporary file + rename).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import gguf
import numpy as np
import safetensors
import torch

from .atomic_io import atomic_path
from .gguf_kquants import quantize_kquant
from .gguf_reader import DIFFUSION_MODEL_PREFIX, ORIG_SHAPE_KEY, GGUFTensor, read_gguf
from .gguf_type_rules import PRESETS, TensorPlan, detect_architecture, plan_tensor
from .gguf_types import FLOAT_TORCH_DTYPES, gguf_type

MAX_NAME_LENGTH = 127  # GGML_MAX_NAME - 1: longer names do not load in ggml-based tools


@dataclass
class SourceTensor:
    """A tensor to write, loaded on demand: ``load()`` returns a float tensor of ``shape`` or, for a
    source that is already GGUF-quantized, the :class:`GGUFTensor` (written as is when the type matches)."""

    shape: torch.Size
    dtype: torch.dtype | None  # float dtype of the source; None when it is GGUF-quantized
    layer_weight: bool
    load: Callable[[], torch.Tensor | GGUFTensor]


def _as_float32(value: torch.Tensor | GGUFTensor) -> torch.Tensor:
    return value.float32() if isinstance(value, GGUFTensor) else value.to(torch.float32)


def encode_tensor(
    value: torch.Tensor | GGUFTensor, plan: TensorPlan, device: torch.device | None = None
) -> np.ndarray:
    """Encode one tensor per its plan -> the numpy array GGUFWriter stores (float values or uint8 blocks).

    A GGUF source already in the planned type is passed through byte for byte (no re-quantization).
    """
    if isinstance(value, GGUFTensor) and value.qtype.name == plan.qtype and value.qtype.quantized:
        return value.data.reshape(plan.stored_shape[0], -1).numpy()
    values = _as_float32(value)
    if tuple(values.shape) != tuple(plan.shape):
        raise ValueError(f"tensor {plan.key!r} has shape {tuple(values.shape)}, expected {tuple(plan.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"tensor {plan.key!r} holds NaN or infinite values; refusing to write it")
    qtype = gguf_type(plan.qtype)
    if plan.stored_shape is not None:
        values = values.reshape(plan.stored_shape)
    if qtype.encoder == "kquant":
        rows = values.to(device) if device is not None else values
        return quantize_kquant(rows, qtype.name).cpu().numpy()
    if qtype.name in FLOAT_TORCH_DTYPES and qtype.name != "BF16":
        return values.to(FLOAT_TORCH_DTYPES[qtype.name]).numpy()
    return gguf.quants.quantize(values.numpy(), qtype.ggml_type)


def _file_type(preset: str) -> int | None:
    name = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q3_K": "Q3_K_S"}.get(preset, preset)
    member = getattr(gguf.LlamaFileType, f"MOSTLY_{name}", None) or getattr(
        gguf.LlamaFileType, f"ALL_{name}", None
    )
    return None if member is None else int(member)


def plan_state_dict(sources: Mapping[str, SourceTensor], preset: str) -> list[TensorPlan]:
    """Types for every tensor of a state dict (see quant/gguf_type_rules.py)."""
    return [plan_tensor(key, src.shape, src.dtype, preset, src.layer_weight) for key, src in sources.items()]


def write_gguf(
    path: str | os.PathLike,
    sources: Mapping[str, SourceTensor],
    preset: str,
    architecture: str | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
) -> list[TensorPlan]:
    """Write ``sources`` (state-dict keys without prefix) as a GGUF file with ``preset`` types.

    ``architecture`` defaults to the one detected from the keys; ``metadata`` adds string key/values;
    ``progress(done, total)`` is called after each tensor; K-quants are computed on ``device``
    (default: where the tensor is). Returns the plan that was written.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown GGUF preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not sources:
        raise ValueError("nothing to write: the state dict is empty")
    too_long = [k for k in sources if len(k.encode()) > MAX_NAME_LENGTH]
    if too_long:
        raise ValueError(f"tensor names longer than {MAX_NAME_LENGTH} bytes cannot be stored: {too_long[:3]}")
    architecture = architecture or detect_architecture(list(sources))
    plans = plan_state_dict(sources, preset)

    writer = gguf.GGUFWriter(path=None, arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = _file_type(preset)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_string("dit_quant.preset", preset)
    for key, value in (metadata or {}).items():
        writer.add_string(key, str(value))
    for plan in plans:
        qtype = gguf_type(plan.qtype)
        if plan.stored_shape is not None and len(plan.shape) != 2:
            writer.add_array(ORIG_SHAPE_KEY + plan.key, [int(d) for d in plan.shape])
        if qtype.quantized or qtype.name == "BF16":
            rows_shape = plan.stored_shape or tuple(plan.shape)
            byte_shape = (*rows_shape[:-1], qtype.row_bytes(rows_shape[-1]))
            writer.add_tensor_info(
                plan.key, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype.ggml_type
            )
        else:
            np_dtype = np.dtype(np.float32 if qtype.name == "F32" else np.float16)
            writer.add_tensor_info(
                plan.key,
                tuple(plan.shape),
                np_dtype,
                plan.shape.numel() * np_dtype.itemsize,
                raw_dtype=qtype.ggml_type,
            )

    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for done, plan in enumerate(plans, 1):
                writer.write_tensor_data(encode_tensor(sources[plan.key].load(), plan, device))
                if progress is not None:
                    progress(done, len(plans))
            writer.flush()
            for fout in writer.fout or []:
                os.fsync(fout.fileno())
        finally:
            writer.close()
    return plans


def safetensors_sources(path: str | os.PathLike) -> dict[str, SourceTensor]:
    """Lazy sources for a diffusion-model safetensors file (a ``model.diffusion_model.`` prefix is dropped).

    A tensor counts as a layer weight when its key ends in ``.weight`` and it has 2+ dims; the loaded
    model is not known here, so this is the same guess the community converter makes.
    """
    path = os.fspath(path)
    with safetensors.safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        has_prefix = any(k.startswith(DIFFUSION_MODEL_PREFIX) for k in keys)
        shapes = {
            k: (torch.Size(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in keys
        }
    dtype_names = {
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }

    def loader(key: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safetensors.safe_open(path, framework="pt") as handle:
                return handle.get_tensor(key)

        return load

    sources: dict[str, SourceTensor] = {}
    for key in keys:
        if has_prefix and not key.startswith(DIFFUSION_MODEL_PREFIX):
            continue
        shape, dtype_name = shapes[key]
        if dtype_name not in dtype_names:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {dtype_name}; only float tensors can be written"
            )
        name = key[len(DIFFUSION_MODEL_PREFIX) :] if has_prefix else key
        sources[name] = SourceTensor(
            shape, dtype_names[dtype_name], key.endswith(".weight") and len(shape) >= 2, loader(key)
        )
    return sources


def gguf_file_sources(path: str | os.PathLike) -> dict[str, SourceTensor]:
    """Sources for re-encoding an existing GGUF file (tensors already in the target type are copied)."""
    model_file = read_gguf(path)
    return {
        key: SourceTensor(
            t.shape,
            None if t.qtype.quantized else t.data.dtype,
            key.endswith(".weight") and len(t.shape) >= 2,
            lambda t=t: t,
        )
        for key, t in model_file.tensors.items()
    }
