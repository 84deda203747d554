"""The GGUF tensor types this pack reads and writes, as data: block geometry and who can encode them."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from ..kernels.gguf_dequant_reference import BLOCK_LAYOUT


@dataclass(frozen=True)
class GGUFType:
    """One ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int
    type_size: int
    encoder: (
        str | None
    )  # "gguf" (gguf-py quantizes it), "kquant" (our quant/gguf_kquants.py), None (read only)

    @property
    def quantized(self) -> bool:
        """False for F32/F16/BF16, which load as ordinary torch tensors."""
        return self.name not in FLOAT_TYPES

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, row_elements: int) -> int:
        """Bytes of one row of ``row_elements`` values; raises ValueError unless it is whole blocks."""
        if row_elements % self.block_size:
            raise ValueError(
                f"a row of {row_elements} values is not a whole number of {self.name} blocks "
                f"({self.block_size} values each)"
            )
        return row_elements // self.block_size * self.type_size


FLOAT_TYPES = ("F32", "F16", "BF16")
FLOAT_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ENCODERS = {
    "F32": "gguf",
    "F16": "gguf",
    "BF16": "gguf",
    "Q8_0": "gguf",
    "Q4_0": "gguf",
    "Q4_1": "gguf",
    "Q5_0": "gguf",
    "Q5_1": "gguf",
    "Q2_K": "kquant",
    "Q3_K": "kquant",
    "Q4_K": "kquant",
    "Q5_K": "kquant",
    "Q6_K": "kquant",
    "IQ4_NL": None,
    "IQ4_XS": None,
}

TYPES: dict[str, GGUFType] = {
    name: GGUFType(name, gguf.GGMLQuantizationType[name], *BLOCK_LAYOUT[name], _ENCODERS[name])
    for name in _ENCODERS
}
WRITABLE_TYPES = tuple(name for name, t in TYPES.items() if t.encoder is not None)
_BY_GGML_ID = {int(t.ggml_type): t for t in TYPES.values()}


def gguf_type(key: str | int | gguf.GGMLQuantizationType) -> GGUFType:
    """Look a type up by name ("Q4_K"), ggml id or enum; ValueError for types this pack does not handle."""
    if isinstance(key, str):
        found = TYPES.get(key.upper())
    else:
        found = _BY_GGML_ID.get(int(key))
    if found is None:
        try:
            label = gguf.GGMLQuantizationType(int(key)).name if not isinstance(key, str) else key
        except ValueError:
            label = f"unknown ggml type id {int(key)}"
        raise ValueError(f"GGUF tensor type {label} is not supported; supported: {', '.join(TYPES)}")
    return found
