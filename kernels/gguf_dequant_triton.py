"""Triton dequantization of every GGUF type the pack reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS).

float32 output is bit-identical to ``gguf.quants.dequantize`` (and to gguf_dequant_reference.py): the
kernels evaluate the same float32 expressions. A fused multiply-add cannot change a result either: in
every ``a * q + b`` form below, ``a * q`` is exact in float32 (an fp16 scale has 11 significant bits,
times a <=6-bit sub-scale times a <=5-bit level fits in 24 bits). bf16 output is rounded to nearest-even
with integer arithmetic, so it is also identical across GPU and interpreter (whose casts truncate).

The per-type ``*_values`` functions decode a tile of whole blocks from their byte addresses; the fused
matmul kernels (gguf_matmul_triton.py) reuse the scale decoders.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gguf_dequant_reference import BLOCK_LAYOUT, IQ4_NL_VALUES, tensor_blocks
from .triton_launch import ceil_div

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_TYPES = (
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q2_K",
    "Q3_K",
    "IQ4_NL",
    "IQ4_XS",
    "F32",
    "F16",
    "BF16",
)
_QTYPE_ID = {name: i for i, name in enumerate(TRITON_TYPES)}
_CODEBOOKS: dict[torch.device, torch.Tensor] = {}
# Blocks per program: 1024 values per program for every type.
_BLOCKS_PER_PROGRAM = {name: 1024 // BLOCK_LAYOUT[name][0] for name in TRITON_TYPES}


@triton.jit
def load_f16(ptr, mask):
    """Little-endian fp16 at byte address ``ptr`` (any alignment) -> float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def k_scale_min(scales_ptr, sub, mask):
    """6-bit (scale, min) of sub-block ``sub`` (0..7) of a Q4_K/Q5_K block whose 12 scale bytes start at
    ``scales_ptr``; returns float32 tensors shaped like ``sub``."""
    low = sub < 4
    a = tl.load(scales_ptr + sub, mask=mask, other=0).to(tl.int32)  # byte j (scale j<4 / high bits)
    b = tl.load(scales_ptr + sub + 4, mask=mask, other=0).to(tl.int32)  # byte j+4
    c = tl.load(scales_ptr + sub % 4, mask=mask, other=0).to(tl.int32)  # byte j-4 (for j >= 4)
    sc = tl.where(low, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _values_q8_0(base, j, mask):
    d = load_f16(base, mask)
    q = tl.load(base[:, None] + 2 + j[None, :], mask=mask[:, None], other=0).to(tl.int8, bitcast=True)
    return q.to(tl.float32) * d[:, None]


@triton.jit
def _low_high_nibble(byte_ptrs, j, mask, HALF: tl.constexpr):
    """Element j of a block whose first HALF values are low nibbles of bytes 0..HALF-1, the rest high."""
    byte = tl.load(byte_ptrs + (j % HALF)[None, :], mask=mask[:, None], other=0).to(tl.int32)
    return (byte >> ((j // HALF) * 4)[None, :]) & 0xF


@triton.jit
def _fifth_bit(qh_ptr, j, mask):
    """Bit j of the little-endian 32-bit word at qh_ptr (Q5_0/Q5_1)."""
    byte = tl.load(qh_ptr[:, None] + (j // 8)[None, :], mask=mask[:, None], other=0).to(tl.int32)
    return (byte >> (j % 8)[None, :]) & 1


@triton.jit
def _values_q4_0(base, j, mask):
    d = load_f16(base, mask)
    q = _low_high_nibble(base[:, None] + 2, j, mask, 16) - 8
    return d[:, None] * q.to(tl.float32)


@triton.jit
def _values_q4_1(base, j, mask):
    d = load_f16(base, mask)
    m = load_f16(base + 2, mask)
    q = _low_high_nibble(base[:, None] + 4, j, mask, 16)
    return d[:, None] * q.to(tl.float32) + m[:, None]


@triton.jit
def _values_q5_0(base, j, mask):
    d = load_f16(base, mask)
    q = (_low_high_nibble(base[:, None] + 6, j, mask, 16) | (_fifth_bit(base + 2, j, mask) << 4)) - 16
    return d[:, None] * q.to(tl.float32)


@triton.jit
def _values_q5_1(base, j, mask):
    d = load_f16(base, mask)
    m = load_f16(base + 2, mask)
    q = _low_high_nibble(base[:, None] + 8, j, mask, 16) | (_fifth_bit(base + 4, j, mask) << 4)
    return d[:, None] * q.to(tl.float32) + m[:, None]


@triton.jit
def _values_q5_k(base, j, mask):
    d = load_f16(base, mask)
    dmin = load_f16(base + 2, mask)
    sub = j // 32
    sc, mn = k_scale_min(base[:, None] + 4, sub[None, :], mask[:, None])
    low = tl.load(base[:, None] + 48 + ((j // 64) * 32 + j % 32)[None, :], mask=mask[:, None], other=0)
    high = tl.load(base[:, None] + 16 + (j % 32)[None, :], mask=mask[:, None], other=0)
    q = ((low.to(tl.int32) >> ((sub % 2) * 4)[None, :]) & 0xF) | (
        ((high.to(tl.int32) >> sub[None, :]) & 1) << 4
    )
    return (d[:, None] * sc) * q.to(tl.float32) - dmin[:, None] * mn


@triton.jit
def _values_q6_k(base, j, mask):
    half = j // 128
    quarter = (j % 128) // 32
    lane = j % 32
    low = tl.load(
        base[:, None] + (half * 64 + (quarter % 2) * 32 + lane)[None, :], mask=mask[:, None], other=0
    )
    high = tl.load(base[:, None] + 128 + (half * 32 + lane)[None, :], mask=mask[:, None], other=0)
    q = (
        ((low.to(tl.int32) >> ((quarter // 2) * 4)[None, :]) & 0xF)
        | (((high.to(tl.int32) >> (quarter * 2)[None, :]) & 3) << 4)
    ) - 32
    scale = tl.load(base[:, None] + 192 + (j // 16)[None, :], mask=mask[:, None], other=0).to(
        tl.int8, bitcast=True
    )
    d = load_f16(base + 208, mask)
    return (d[:, None] * scale.to(tl.float32)) * q.to(tl.float32)


@triton.jit
def _crumb(qs_ptr, j, mask):
    """2-bit field of value j (0..255) in 64 bytes: byte 32 * (j // 128) + j % 32, bits 2 * ((j % 128) // 32)
    and up."""
    byte = tl.load(qs_ptr[:, None] + ((j // 128) * 32 + j % 32)[None, :], mask=mask[:, None], other=0)
    return (byte.to(tl.int32) >> (((j % 128) // 32) * 2)[None, :]) & 3


@triton.jit
def _values_q2_k(base, j, mask):
    sc = tl.load(base[:, None] + (j // 16)[None, :], mask=mask[:, None], other=0).to(tl.int32)
    d = load_f16(base + 80, mask)
    dmin = load_f16(base + 82, mask)
    q = _crumb(base + 16, j, mask)
    return (d[:, None] * (sc & 0xF).to(tl.float32)) * q.to(tl.float32) - dmin[:, None] * (sc >> 4).to(
        tl.float32
    )


@triton.jit
def _values_q3_k(base, j, mask):
    sub = (j // 16)[None, :]
    m2 = mask[:, None]
    low = tl.load(base[:, None] + 96 + sub % 8, mask=m2, other=0).to(tl.int32)
    low = (low >> ((sub // 8) * 4)) & 0xF
    high = tl.load(base[:, None] + 104 + sub % 4, mask=m2, other=0).to(tl.int32)
    high = (high >> ((sub // 4) * 2)) & 3
    scale = (low | (high << 4)) - 32
    hbit = tl.load(base[:, None] + (j % 32)[None, :], mask=m2, other=0).to(tl.int32)
    hbit = (hbit >> (j // 32)[None, :]) & 1
    q = _crumb(base + 32, j, mask) - (1 - hbit) * 4  # a set bit means "no -4 offset"
    d = load_f16(base + 108, mask)
    return (d[:, None] * scale.to(tl.float32)) * q.to(tl.float32)


@triton.jit
def _values_iq4_nl(base, j, mask, codebook):
    d = load_f16(base, mask)
    values = tl.load(codebook + _low_high_nibble(base[:, None] + 2, j, mask, 16))
    return d[:, None] * values


@triton.jit
def _values_iq4_xs(base, j, mask, codebook):
    sub = (j // 32)[None, :]
    m2 = mask[:, None]
    low = tl.load(base[:, None] + 4 + sub // 2, mask=m2, other=0).to(tl.int32)
    low = (low >> ((sub % 2) * 4)) & 0xF
    high_lo = tl.load(base[:, None] + 2, mask=m2, other=0).to(tl.int32)
    high_hi = tl.load(base[:, None] + 3, mask=m2, other=0).to(tl.int32)
    high = ((high_lo | (high_hi << 8)) >> (sub * 2)) & 3
    scale = (low | (high << 4)) - 32
    byte = tl.load(base[:, None] + 8 + sub * 16 + (j % 16)[None, :], mask=m2, other=0).to(tl.int32)
    nibble = (byte >> (((j % 32) // 16) * 4)[None, :]) & 0xF
    d = load_f16(base, mask)
    return (d[:, None] * scale.to(tl.float32)) * tl.load(codebook + nibble)


@triton.jit
def _values_float(base, mask, QTYPE: tl.constexpr):
    """One F32 / F16 / BF16 value per block -> float32 [len(base), 1]."""
    if QTYPE == 12:
        b0 = tl.load(base, mask=mask, other=0).to(tl.uint32)
        b1 = tl.load(base + 1, mask=mask, other=0).to(tl.uint32)
        b2 = tl.load(base + 2, mask=mask, other=0).to(tl.uint32)
        b3 = tl.load(base + 3, mask=mask, other=0).to(tl.uint32)
        v = (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
    elif QTYPE == 13:
        v = load_f16(base, mask)
    else:
        lo = tl.load(base, mask=mask, other=0).to(tl.uint32)
        hi = tl.load(base + 1, mask=mask, other=0).to(tl.uint32)
        v = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)
    return v[:, None]


@triton.jit
def block_values(base, j, mask, codebook, QTYPE: tl.constexpr):
    """float32 [len(base), len(j)]: values j of the blocks starting at byte pointers ``base`` (every type but
    Q4_K, which ``_dequantize_q4_k_blocks`` decodes by nibble halves)."""
    if QTYPE == 0:
        v = _values_q8_0(base, j, mask)
    elif QTYPE == 1:
        v = _values_q4_0(base, j, mask)
    elif QTYPE == 2:
        v = _values_q4_1(base, j, mask)
    elif QTYPE == 3:
        v = _values_q5_0(base, j, mask)
    elif QTYPE == 4:
        v = _values_q5_1(base, j, mask)
    elif QTYPE == 6:
        v = _values_q5_k(base, j, mask)
    elif QTYPE == 7:
        v = _values_q6_k(base, j, mask)
    elif QTYPE == 8:
        v = _values_q2_k(base, j, mask)
    elif QTYPE == 9:
        v = _values_q3_k(base, j, mask)
    elif QTYPE == 10:
        v = _values_iq4_nl(base, j, mask, codebook)
    elif QTYPE == 11:
        v = _values_iq4_xs(base, j, mask, codebook)
    else:
        v = _values_float(base, mask, QTYPE)
    return v


@triton.jit
def round_to_bf16(v):
    """float32 -> bfloat16, round-to-nearest-even by integer arithmetic (NaN stays NaN)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_values(ptrs, values, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(ptrs, round_to_bf16(values), mask=mask)
    else:
        tl.store(ptrs, values.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_q4_k_blocks(base, out, mask, OUT_BF16: tl.constexpr):
    """Q4_K blocks at byte pointers ``base`` [B] -> values at ``out`` [B] (256 each), by nibble halves: each
    byte 32p + l is loaded once and gives value 64p + l (low nibble) and 64p + 32 + l (high nibble); the
    (scale, min) pairs are decoded once per sub-block: value = (d * scale) * q - dmin * min in float32."""
    d = load_f16(base, mask)[:, None, None]
    dmin = load_f16(base + 2, mask)[:, None, None]
    sc, mn = k_scale_min(base[:, None] + 4, tl.arange(0, 8)[None, :], mask[:, None])  # [B, 8]
    sc_lo, sc_hi = tl.split(tl.reshape(sc, (sc.shape[0], 4, 2)))  # sub-blocks 2p and 2p + 1: [B, 4]
    mn_lo, mn_hi = tl.split(tl.reshape(mn, (mn.shape[0], 4, 2)))
    pair = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 32)[None, None, :]
    m3 = mask[:, None, None]
    byte = tl.load(base[:, None, None] + 16 + pair * 32 + lane, mask=m3, other=0).to(tl.int32)
    lo = (d * sc_lo[:, :, None]) * (byte & 0xF).to(tl.float32) - dmin * mn_lo[:, :, None]
    hi = (d * sc_hi[:, :, None]) * (byte >> 4).to(tl.float32) - dmin * mn_hi[:, :, None]
    first = out[:, None, None] + pair * 64 + lane
    _store_values(first, lo, m3, OUT_BF16)
    _store_values(first + 32, hi, m3, OUT_BF16)


@triton.jit
def _dequantize_kernel(
    src,
    dst,
    codebook,
    n_blocks,
    QTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    mask = blk < n_blocks
    if QTYPE == 5:
        _dequantize_q4_k_blocks(src + blk * TYPE_SIZE, dst + blk * BLOCK_SIZE, mask, OUT_BF16)
    else:
        j = tl.arange(0, BLOCK_SIZE)
        values = block_values(src + blk * TYPE_SIZE, j, mask, codebook, QTYPE)
        _store_values(dst + blk[:, None] * BLOCK_SIZE + j[None, :], values, mask[:, None], OUT_BF16)


def dequantize_triton(
    raw: torch.Tensor, qtype: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """GGUF bytes ``uint8`` (contiguous, on a CUDA device or on CPU under TRITON_INTERPRET=1) ->
    tensor of ``shape`` in ``dtype`` (float32, bfloat16 or float16)."""
    if qtype not in _QTYPE_ID:
        raise ValueError(f"DiT Quant: no Triton dequantizer for GGUF type {qtype}; have {TRITON_TYPES}")
    if raw.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("DiT Quant: Triton dequantization of CPU tensors needs TRITON_INTERPRET=1")
    block_size, type_size = BLOCK_LAYOUT[qtype]
    n_blocks = tensor_blocks(raw, qtype, shape)
    src = raw.contiguous().view(-1)
    out = torch.empty(n_blocks * block_size, dtype=dtype, device=raw.device)
    blocks = _BLOCKS_PER_PROGRAM[qtype]
    grid = (ceil_div(n_blocks, blocks),)
    if raw.device not in _CODEBOOKS:
        _CODEBOOKS[raw.device] = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=raw.device)
    _dequantize_kernel[grid](
        src,
        out,
        _CODEBOOKS[raw.device],
        n_blocks,
        QTYPE=_QTYPE_ID[qtype],
        BLOCK_SIZE=block_size,
        TYPE_SIZE=type_size,
        BLOCKS=blocks,
        OUT_BF16=dtype == torch.bfloat16,
    )
    return out.view(shape)
