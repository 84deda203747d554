"""Memory-mapped reading of GGUF diffusion-model files in the community (ComfyUI-GGUF) layout.

Layout facts this reader relies on (the converter used across the ComfyUI ecosystem):
- tensor names are ComfyUI state-dict keys (an optional ``model.diffusion_model.`` prefix is dropped);
- ``general.architecture`` names the model family ("flux", "sd3", "wan", ...);
- a tensor stored reshaped (rows of 256 for K-quants) has its original shape in the INT32 array
  ``comfy.gguf.orig_shape.<tensor name>``;
- 1-D tensors (biases, norms) are F32; F32/F16/BF16 tensors load as ordinary torch tensors.

``gguf.GGUFReader`` trusts every length and count in the file: a corrupted array count makes it loop for
hours and a truncated file yields silently short views. So :func:`read_gguf` first walks the whole header
with bounds checks (:func:`_check_layout`), and only then lets ``GGUFReader`` decode it.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch

from ..kernels.gguf_dequant_reference import dequantize_reference
from .gguf_types import FLOAT_TORCH_DTYPES, GGUFType, gguf_type

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 4

_SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1,
    gguf.GGUFValueType.INT8: 1,
    gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4,
    gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8,
    gguf.GGUFValueType.FLOAT64: 8,
}


class GGUFFormatError(ValueError):
    """A file that is not well-formed GGUF, or one this pack cannot load; the message names the file."""


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file.

    ``data``: for F32/F16/BF16 a torch tensor of ``shape`` in that dtype; for quantized types the raw
    bytes, ``uint8 [rows, row_bytes]`` (rows = product of all but the stored last dimension).
    Both are zero-copy views of the memory-mapped file.
    """

    name: str
    qtype: GGUFType
    shape: torch.Size
    data: torch.Tensor

    def float32(self) -> torch.Tensor:
        """The values as a float32 tensor of ``shape`` (quantized bytes through the torch reference)."""
        if self.qtype.quantized:
            return dequantize_reference(self.data, self.qtype.name, self.shape)
        return self.data.to(torch.float32)


@dataclass
class GGUFModelFile:
    """Tensors (by state-dict key, file order) and metadata of a GGUF file."""

    path: str
    architecture: str | None
    tensors: dict[str, GGUFTensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + 1
        return counts


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, buf: mmap.mmap | bytes, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"GGUF file {self.path!r}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, but the file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc})") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], what)
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == gguf.GGUFValueType.STRING:
            self.string(what)
        elif vtype == gguf.GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise self.fail(f"{what}: arrays nested deeper than {_MAX_ARRAY_NESTING}")
            item_type = self.unpack("I", f"{what} item type")
            count = self.unpack("Q", f"{what} item count")
            if item_type in _SCALAR_SIZES:
                self.need(count * _SCALAR_SIZES[item_type], f"{what} ({count} items)")
                self.pos += count * _SCALAR_SIZES[item_type]
                return
            min_item = 8 if item_type == gguf.GGUFValueType.STRING else 12
            self.need(count * min_item, f"{what} ({count} items)")
            for _ in range(count):
                self.skip_value(item_type, what, depth + 1)
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")


def _check_layout(buf: mmap.mmap | bytes, path: str) -> None:
    """Walk the header (magic, counts, key/values, tensor infos) and the tensor data bounds; raise
    GGUFFormatError on the first inconsistency. Reads only the header, never tensor data."""
    cur = _Cursor(buf, path)
    magic = cur.unpack("I", "magic")
    if magic != gguf.GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {magic.to_bytes(4, 'little')!r}, expected b'GGUF')")
    version = cur.unpack("I", "version")
    if version & 0xFFFF == 0:
        raise cur.fail("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.unpack("Q", "tensor count")
    n_kv = cur.unpack("Q", "key/value count")
    cur.need(n_kv * 13 + n_tensors * 24, f"{n_kv} key/values and {n_tensors} tensor infos")

    keys: set[str] = set()
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in keys:
            raise cur.fail(f"duplicate metadata key {key!r}")
        keys.add(key)
        vtype = cur.unpack("I", f"type of {key!r}")
        if key == gguf.Keys.General.ALIGNMENT:
            if vtype != gguf.GGUFValueType.UINT32:
                raise cur.fail(f"{key} must be UINT32")
            alignment = cur.unpack("I", key)
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"{key} = {alignment} is not a power of two")
            continue
        cur.skip_value(vtype, f"value of {key!r}")

    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        if name in names:
            raise cur.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = cur.unpack("I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.unpack("Q", f"dimensions of {name!r}") for _ in range(n_dims)]
        type_id = cur.unpack("I", f"type of {name!r}")
        offset = cur.unpack("Q", f"data offset of {name!r}")
        infos.append((name, dims, type_id, offset))

    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, type_id, offset in infos:
        try:
            qtype = gguf_type(type_id)
            row_bytes = qtype.row_bytes(dims[0])
        except ValueError as exc:
            raise cur.fail(f"tensor {name!r}: {exc}") from None
        if min(dims) < 1:
            raise cur.fail(f"tensor {name!r} has an empty dimension {dims}")
        n_bytes = row_bytes * int(np.prod(dims[1:], dtype=object))
        if offset % alignment:
            raise cur.fail(
                f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}"
            )
        if data_start + offset + n_bytes > cur.size:
            raise cur.fail(
                f"tensor {name!r} data ({n_bytes} bytes at offset {data_start + offset}) runs past "
                f"the end of the file ({cur.size} bytes): truncated or corrupt"
            )


def _orig_shape(reader: gguf.GGUFReader, name: str, n_elements: int, path: str) -> torch.Size | None:
    field_ = reader.get_field(ORIG_SHAPE_KEY + name)
    if field_ is None:
        return None
    if field_.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]:
        raise GGUFFormatError(
            f"GGUF file {path!r}: {ORIG_SHAPE_KEY}{name} must be an array of INT32, "
            f"got {[t.name for t in field_.types]}"
        )
    shape = torch.Size(int(field_.parts[i][0]) for i in field_.data)
    if any(d < 1 for d in shape) or shape.numel() != n_elements:
        raise GGUFFormatError(
            f"GGUF file {path!r}: original shape {tuple(shape)} of tensor {name!r} does not "
            f"match its {n_elements} stored values"
        )
    return shape


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar and string key/values (arrays other than original shapes are summarised by their length)."""
    out: dict[str, Any] = {}
    for key, field_ in reader.fields.items():
        if key.startswith(("GGUF.", ORIG_SHAPE_KEY)):
            continue
        if field_.types and field_.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = f"<array of {len(field_.data)}>"
        else:
            out[key] = field_.contents()
    return out


def _torch_view(tensor: gguf.ReaderTensor, qtype: GGUFType, shape: torch.Size) -> torch.Tensor:
    with warnings.catch_warnings():  # the map is read-only; nothing here writes through it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(tensor.data)
    if not qtype.quantized:
        data = data.view(torch.uint8).view(FLOAT_TORCH_DTYPES[qtype.name]).reshape(shape)
    return data.reshape(-1, data.shape[-1]) if qtype.quantized else data


def read_gguf(path: str | os.PathLike) -> GGUFModelFile:
    """Memory-map a GGUF diffusion-model file. Tensors stay in the file's format (zero-copy).

    Raises GGUFFormatError (a ValueError naming the file and the problem) for anything malformed:
    wrong magic, truncation, data past the end, unknown tensor types, shape/size mismatches.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise GGUFFormatError(f"GGUF file {path!r} is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _check_layout(buf, path)
        reader = gguf.GGUFReader(path)
    except GGUFFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise GGUFFormatError(f"GGUF file {path!r} is malformed: {exc}") from exc

    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    architecture = None
    if arch_field is not None:
        if arch_field.types != [gguf.GGUFValueType.STRING]:
            raise GGUFFormatError(f"GGUF file {path!r}: general.architecture must be a string")
        architecture = arch_field.contents()

    names = [t.name for t in reader.tensors]
    strip = any(n.startswith(DIFFUSION_MODEL_PREFIX) for n in names)
    tensors: dict[str, GGUFTensor] = {}
    for tensor in reader.tensors:
        key = tensor.name
        if strip:
            if not key.startswith(DIFFUSION_MODEL_PREFIX):
                continue
            key = key[len(DIFFUSION_MODEL_PREFIX) :]
        qtype = gguf_type(tensor.tensor_type)
        shape = _orig_shape(reader, tensor.name, tensor.n_elements, path)
        if shape is None:
            shape = torch.Size(int(d) for d in reversed(tensor.shape.tolist()))
        tensors[key] = GGUFTensor(key, qtype, shape, _torch_view(tensor, qtype, shape))
    return GGUFModelFile(path, architecture, tensors, _metadata(reader))
