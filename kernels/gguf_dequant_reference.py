"""Plain-torch dequantization of GGUF (ggml) block formats, bit-identical to ``gguf.quants.dequantize``.

Every function takes the raw bytes of whole blocks, ``uint8 [n_blocks, type_size]``, and returns
``float32 [n_blocks, block_size]``. The float32 operations (and their order) follow gguf-py's numpy
code, so results match it bit for bit on any device; only integer unpacking differs in form.

Block layouts (ggml-common.h), with d/dmin fp16 scales:
  Q8_0   d | qs[32] int8                                   34 B / 32
  Q4_0   d | qs[16] (low nibbles: 0-15, high: 16-31)         18 B / 32
  Q4_1   d | m | qs[16]                                    20 B / 32
  Q5_0   d | qh u32 (5th bits) | qs[16]                    22 B / 32
  Q5_1   d | m | qh | qs[16]                               24 B / 32
  Q2_K   scales[16] (lo: scale, hi: min) | qs[64] | d | dmin           84 B / 256
  Q3_K   hmask[32] | qs[64] | scales[12] (6-bit, packed) | d           110 B / 256
  Q4_K   d | dmin | scales[12] (6-bit scale+min x8) | qs[128]          144 B / 256
  Q5_K   d | dmin | scales[12] | qh[32] | qs[128]                      176 B / 256
  Q6_K   ql[128] | qh[64] | scales[16] int8 | d                        210 B / 256
  IQ4_NL d | qs[16] (indices into a 16-entry non-linear table)  18 B / 32
  IQ4_XS d | scales_h u16 | scales_l[4] | qs[128]                      136 B / 256
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

QK_K = 256

# Non-linear 4-bit codebook of IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml-common.h).
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# (elements per block, bytes per block) for every format handled here.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes [n, ..., group] -> 4-bit values [n, ..., 2 * group]: low nibbles first, then high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bytes [n, B] -> bit planes uint8 [n, count, B]: bit i of every byte in plane i."""
    shifts = torch.arange(count, dtype=torch.uint8, device=packed.device).view(1, count, 1)
    return (packed.unsqueeze(1) >> shifts) & 1


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [n, B] -> 2-bit fields uint8 [n, 4, B]: bits (2i, 2i+1) of every byte in plane i."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 4, 1)
    return (packed.unsqueeze(1) >> shifts) & 3


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K [n, 12] -> 6-bit (scale, min) uint8 [n, 8] each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """The 12 packed bytes of Q3_K [n, 12] -> signed 6-bit sub-block scales float32 [n, 16]."""
    low = torch.cat([scales[:, 0:8] & 0x0F, scales[:, 0:8] >> 4], dim=-1)
    high = _crumbs(scales[:, 8:12]).reshape(-1, 16)
    return ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of 5th bits [n, 4] -> [n, 32], element j taking bit j of the little-endian word."""
    return _bits(qh, 8).transpose(1, 2).reshape(-1, 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:], 16) | (_q5_high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 8:], 16) | (_q5_high_bits(b[:, 4:8]) << 4)).to(torch.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    # qs holds two 128-element halves; in each, bit pair i of byte l is element 32 * i + l.
    q = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs = b[:, :32], b[:, 32:96]
    dl = (_f16(b[:, 108:110]) * q3_k_scales(b[:, 96:108])).view(n, 16, 1)
    low = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16)
    high = _bits(hmask, 8).reshape(n, 16, 16) ^ 1  # a set bit means "no -4 offset"
    q = (low.to(torch.int8) - (high << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _q45_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K blocks [n, type_size] -> per-sub-block (d * scale, dmin * min) float32 [n, 8, 1] each."""
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.to(torch.float32)).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.to(torch.float32)).view(n, 8, 1)
    return d, dm


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _q45_k_scales(b)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), 32).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _q45_k_scales(b)
    low = _nibbles(b[:, 48:].reshape(n, 4, 32), 32).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 8)  # bit i of qh[l] is the 5th bit of element 32 * i + l
    q = (low | (high << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64), 64).reshape(n, 8, 32)
    high = _crumbs(qh.reshape(n * 2, 32)).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, QK_K)


def _iq4_codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    values = _iq4_codebook(b.device)[_nibbles(b[:, 2:], 16).long()]
    return _f16(b[:, :2]) * values


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales_h = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # 8 x 2 bits, little-endian
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)
    high = ((scales_h >> shifts) & 3).to(torch.uint8)
    low = torch.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], dim=-1).reshape(n, 8)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (_f16(b[:, :2]) * scales).view(n, 8, 1)
    values = _iq4_codebook(b.device)[_nibbles(b[:, 8:].reshape(n, 8, 16), 16).long()]
    return (dl * values).reshape(n, QK_K)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32,
    "F16": _f16,
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def _layout(qtype: str) -> tuple[int, int]:
    """(block_size, type_size) of ``qtype``; ValueError for a type without a dequantizer."""
    if qtype not in _DEQUANTIZERS:
        raise ValueError(f"DiT Quant: no dequantizer for GGUF type {qtype!r}; known: {sorted(_DEQUANTIZERS)}")
    return BLOCK_LAYOUT[qtype]


def tensor_blocks(raw: torch.Tensor, qtype: str, shape: torch.Size | tuple[int, ...]) -> int:
    """Number of ``qtype`` blocks in a tensor of ``shape``; ValueError unless ``raw`` holds exactly their
    bytes."""
    block_size, type_size = BLOCK_LAYOUT[qtype]
    n_elements = math.prod(int(size) for size in shape)
    if n_elements % block_size or raw.numel() * block_size != n_elements * type_size:
        raise ValueError(
            f"DiT Quant: {raw.numel()} bytes of {qtype} do not hold a tensor of shape {tuple(shape)}"
        )
    return n_elements // block_size


def dequantize_blocks_reference(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Raw blocks ``uint8 [n_blocks, type_size]`` of ``qtype`` -> ``float32 [n_blocks, block_size]``."""
    _, type_size = _layout(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != type_size:
        raise ValueError(
            f"DiT Quant: {qtype} blocks must be uint8 [n, {type_size}], "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
    return _DEQUANTIZERS[qtype](blocks)


def dequantize_reference(
    raw: torch.Tensor, qtype: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """GGUF tensor bytes (``uint8``, contiguous rows) -> the dequantized tensor of ``shape`` in ``dtype``.

    The float32 result is bit-identical to ``gguf.quants.dequantize``; other dtypes are its rounding.
    """
    _, type_size = _layout(qtype)
    tensor_blocks(raw, qtype, shape)
    values = dequantize_blocks_reference(raw.reshape(-1, type_size), qtype)
    return values.reshape(shape).to(dtype)
