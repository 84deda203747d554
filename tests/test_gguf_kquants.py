"""Our vectorized K-quant encoders vs a literal scalar port of ggml-quants.c's reference quantizers.

The literal port below transcribes ``quantize_row_q{2,3,4,5,6}_K_ref`` and their helpers
(``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``, ``nearest_int``, ``get_scale_min_k4``)
statement by statement, with numpy float32 scalars for every C ``float`` operation (no FMA contraction).
It is slow (pure Python) and is only run on a handful of blocks. The vectorized encoders must produce
the same bytes, and their RMSE on Gaussian weights must be within 2% of it (it is 0%: same bytes).
"""

import struct

import gguf
import numpy as np
import pytest
import torch
from dit_quant.quant.gguf_kquants import KQUANT_TYPE_SIZES, quantize_kquant

f32 = np.float32
QK_K = 256
GROUP_MAX_EPS = f32(1e-15)


# ----------------------------------------------------------------------------- literal port of the C code


def nearest_int(fval):
    val = np.array(f32(fval) + f32(12582912.0), dtype=np.float32)
    return int((int(val.view(np.int32)) & 0x007FFFFF) - 0x00400000)


def fp16_bits(v):
    return int(np.array(f32(v), dtype=np.float32).astype(np.float16).view(np.uint16))


def fp16_value(bits):
    return f32(np.array(bits, dtype=np.uint16).view(np.float16))


def u8(v):
    return v & 0xFF


def i8(v):
    v &= 0xFF
    return v - 256 if v > 127 else v


def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w = f32(sum_w + w)
        sum_x = f32(sum_x + f32(w * x[i]))
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return f32(0), f32(-mn)
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    best_error = f32(0)
    for i in range(n):
        l = nearest_int(f32(iscale * f32(x[i] - mn)))
        L[i] = max(0, min(nmax, l))
        diff = f32(f32(f32(scale * f32(L[i])) + mn) - x[i])
        diff = abs(diff) if use_mad else f32(diff * diff)
        best_error = f32(best_error + f32(weights[i] * diff))
    for is_ in range(nstep + 1):
        iscale = f32(f32(f32(rmin + f32(rdelta * f32(is_))) + f32(nmax)) / f32(mx - mn))
        sum_l = sum_l2 = sum_xl = f32(0)
        for i in range(n):
            l = nearest_int(f32(iscale * f32(x[i] - mn)))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l = f32(sum_l + f32(w * f32(l)))
            sum_l2 = f32(sum_l2 + f32(f32(w * f32(l)) * f32(l)))
            sum_xl = f32(sum_xl + f32(f32(w * f32(l)) * x[i]))
        D = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / D)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sum_xl / sum_l2)
            cur_error = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else f32(diff * diff)
                cur_error = f32(cur_error + f32(weights[i] * diff))
            if cur_error < best_error:
                L[:n] = Laux[:n]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, f32(-mn)


def make_qx_quants(n, nmax, x, L, rmse_type):
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(f32(-nmax) / mx)
    assert rmse_type == 1
    sumlx = suml2 = f32(0)
    for i in range(n):
        l = nearest_int(f32(iscale * x[i]))
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = f32(x[i] * x[i])
        sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
        suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
    scale = f32(sumlx / suml2) if suml2 else f32(0)
    best = f32(scale * sumlx)
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(is_))) / mx)
        sumlx = suml2 = f32(0)
        for i in range(n):
            l = nearest_int(f32(iscale * x[i]))
            l = max(-nmax, min(nmax - 1, l))
            w = f32(x[i] * x[i])
            sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
            suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
        if suml2 > 0 and f32(sumlx * sumlx) > f32(best * suml2):
            for i in range(n):
                l = nearest_int(f32(iscale * x[i]))
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale


def make_q3_quants(n, nmax, x, L):
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(f32(-nmax) / mx)
    sumlx = suml2 = f32(0)
    for i in range(n):
        l = nearest_int(f32(iscale * x[i]))
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        w = f32(x[i] * x[i])
        sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
        suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = f32(x[i] * x[i])
            slx = f32(sumlx - f32(f32(w * x[i]) * f32(L[i])))
            if slx > 0:
                sl2 = f32(suml2 - f32(f32(w * f32(L[i])) * f32(L[i])))
                new_l = nearest_int(f32(f32(x[i] * sl2) / slx))
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    slx = f32(slx + f32(f32(w * x[i]) * f32(new_l)))
                    sl2 = f32(sl2 + f32(f32(w * f32(new_l)) * f32(new_l)))
                    if sl2 > 0 and f32(f32(slx * slx) * suml2) > f32(f32(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    for i in range(n):
        L[i] += nmax
    return f32(sumlx / suml2) if suml2 > 0 else f32(0)


def pack_qs_2bit(L):
    qs = bytearray(64)
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs[j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
    return bytes(qs)


def pack_k_scales(ls, lm):
    scales = bytearray(12)
    for j in range(8):
        if j < 4:
            scales[j] = ls[j]
            scales[j + 4] = lm[j]
        else:
            scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            scales[j - 4] |= (ls[j] >> 4) << 6
            scales[j] |= (lm[j] >> 4) << 6
    return scales


def get_scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def q2_k_ref(x):
    L, Laux = [0] * QK_K, [0] * 16
    mins, scales = [f32(0)] * 16, [f32(0)] * 16
    max_scale = max_min = f32(0)
    for j in range(16):
        weights = [abs(x[16 * j + l]) for l in range(16)]
        sub = L[16 * j : 16 * j + 16]
        scales[j], mins[j] = make_qkx2_quants(
            16, 3, x[16 * j : 16 * j + 16], weights, sub, Laux, f32(-0.5), f32(0.1), 15, True
        )
        L[16 * j : 16 * j + 16] = sub
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    sc = [0] * 16
    if max_scale > 0:
        iscale = f32(f32(15) / max_scale)
        for j in range(16):
            sc[j] = u8(nearest_int(f32(iscale * scales[j])))
        d = fp16_bits(f32(max_scale / f32(15)))
    else:
        d = fp16_bits(0)
    if max_min > 0:
        iscale = f32(f32(15) / max_min)
        for j in range(16):
            sc[j] = u8(sc[j] | (nearest_int(f32(iscale * mins[j])) << 4))
        dmin = fp16_bits(f32(max_min / f32(15)))
    else:
        dmin = fp16_bits(0)
    for j in range(16):
        dd = f32(fp16_value(d) * f32(sc[j] & 0xF))
        if not dd:
            continue
        dm = f32(fp16_value(dmin) * f32(sc[j] >> 4))
        for ii in range(16):
            l = nearest_int(f32(f32(x[16 * j + ii] + dm) / dd))
            L[16 * j + ii] = max(0, min(3, l))
    return bytes(sc) + pack_qs_2bit(L) + struct.pack("<HH", d, dmin)


def q3_k_ref(x):
    L = [0] * QK_K
    scales = [f32(0)] * 16
    max_scale = amax = f32(0)
    for j in range(16):
        sub = L[16 * j : 16 * j + 16]
        scales[j] = make_q3_quants(16, 4, x[16 * j : 16 * j + 16], sub)
        L[16 * j : 16 * j + 16] = sub
        scale = abs(scales[j])
        if scale > amax:
            amax = scale
            max_scale = scales[j]
    packed = bytearray(12)
    if max_scale:
        iscale = f32(f32(-32) / max_scale)
        for j in range(16):
            l = i8(nearest_int(f32(iscale * scales[j])))
            l = max(-32, min(31, l)) + 32
            if j < 8:
                packed[j] = l & 0xF
            else:
                packed[j - 8] |= (l & 0xF) << 4
            l >>= 4
            packed[j % 4 + 8] |= l << (2 * (j // 4))
        d = fp16_bits(f32(f32(1) / iscale))
    else:
        d = fp16_bits(0)
    for j in range(16):
        sc = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
        sc = (sc | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = f32(fp16_value(d) * f32(sc))
        if not dd:
            continue
        for ii in range(16):
            l = nearest_int(f32(x[16 * j + ii] / dd))
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    hmask = bytearray(32)
    m, hm = 0, 1
    for j in range(QK_K):
        if L[j] > 3:
            hmask[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m, hm = 0, hm << 1
    return bytes(hmask) + pack_qs_2bit(L) + bytes(packed) + struct.pack("<H", d)


def q45_k_ref(x, nmax, rmin, nstep):
    L, Laux = [0] * QK_K, [0] * 32
    mins, scales = [f32(0)] * 8, [f32(0)] * 8
    max_scale = max_min = f32(0)
    for j in range(8):
        sub_x = x[32 * j : 32 * j + 32]
        sum_x2 = f32(0)
        for l in range(32):
            sum_x2 = f32(sum_x2 + f32(sub_x[l] * sub_x[l]))
        av_x = f32(np.sqrt(f32(sum_x2 / f32(32))))
        weights = [f32(av_x + abs(sub_x[l])) for l in range(32)]
        sub = L[32 * j : 32 * j + 32]
        scales[j], mins[j] = make_qkx2_quants(
            32, nmax, sub_x, weights, sub, Laux, f32(rmin), f32(0.1), nstep, False
        )
        L[32 * j : 32 * j + 32] = sub
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(f32(63) / max_min) if max_min > 0 else f32(0)
    ls = [min(63, u8(nearest_int(f32(inv_scale * scales[j])))) for j in range(8)]
    lm = [min(63, u8(nearest_int(f32(inv_min * mins[j])))) for j in range(8)]
    packed = pack_k_scales(ls, lm)
    d = fp16_bits(f32(max_scale / f32(63)))
    dmin = fp16_bits(f32(max_min / f32(63)))
    for j in range(8):
        sc, m = get_scale_min_k4(j, packed)
        dd = f32(fp16_value(d) * f32(sc))
        if not dd:
            continue
        dm = f32(fp16_value(dmin) * f32(m))
        for ii in range(32):
            l = nearest_int(f32(f32(x[32 * j + ii] + dm) / dd))
            L[32 * j + ii] = max(0, min(nmax, l))
    return struct.pack("<HH", d, dmin) + bytes(packed), L


def q4_k_ref(x):
    head, L = q45_k_ref(x, 15, -1.0, 20)
    qs = bytearray(128)
    for p in range(4):
        for l in range(32):
            qs[32 * p + l] = L[64 * p + l] | (L[64 * p + l + 32] << 4)
    return head + bytes(qs)


def q5_k_ref(x):
    head, L = q45_k_ref(x, 31, -0.5, 15)
    qh, ql = bytearray(32), bytearray(128)
    m1, m2 = 1, 2
    for p in range(4):
        for j in range(32):
            l1 = L[64 * p + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[64 * p + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql[32 * p + j] = l1 | (l2 << 4)
        m1, m2 = m1 << 2, m2 << 2
    return head + bytes(qh) + bytes(ql)


def q6_k_ref(x):
    L = [0] * QK_K
    scales = [f32(0)] * 16
    max_scale = max_abs_scale = f32(0)
    for ib in range(16):
        sub = L[16 * ib : 16 * ib + 16]
        scales[ib] = make_qx_quants(16, 32, x[16 * ib : 16 * ib + 16], sub, 1)
        L[16 * ib : 16 * ib + 16] = sub
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        return bytes(210)
    iscale = f32(f32(-128) / max_scale)
    d = fp16_bits(f32(f32(1) / iscale))
    sc = [i8(min(127, nearest_int(f32(iscale * scales[ib])))) for ib in range(16)]
    for j in range(16):
        dd = f32(fp16_value(d) * f32(sc[j]))
        if not dd:
            continue
        for ii in range(16):
            l = nearest_int(f32(x[16 * j + ii] / dd))
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    ql, qh = bytearray(128), bytearray(64)
    for h, j in enumerate(range(0, QK_K, 128)):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + 32 * i] & 0xF for i in range(4))
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = (
                (L[j + l] >> 4)
                | ((L[j + l + 32] >> 4) << 2)
                | ((L[j + l + 64] >> 4) << 4)
                | ((L[j + l + 96] >> 4) << 6)
            )
    return bytes(ql) + bytes(qh) + bytes(s & 0xFF for s in sc) + struct.pack("<H", d)


LITERAL = {"Q2_K": q2_k_ref, "Q3_K": q3_k_ref, "Q4_K": q4_k_ref, "Q5_K": q5_k_ref, "Q6_K": q6_k_ref}
TYPES = list(LITERAL)


# ----------------------------------------------------------------------------- test data


def special_blocks(rng: np.random.Generator) -> np.ndarray:
    """Blocks that reach the corner cases of the C code: zero/flat sub-blocks, all-positive data, one
    outlier, tiny magnitudes, exact ties of |max|."""
    blocks = [np.zeros(QK_K), np.full(QK_K, -0.75)]
    positive = np.abs(rng.standard_normal(QK_K)) + 0.5
    outlier = rng.standard_normal(QK_K) * 0.01
    outlier[37] = 40.0
    tiny = rng.standard_normal(QK_K) * 1e-6
    half_zero = rng.standard_normal(QK_K)
    half_zero[:128] = 0.0
    ties = np.round(rng.standard_normal(QK_K) * 2) / 2
    blocks += [positive, outlier, tiny, half_zero, ties]
    return np.stack(blocks).astype(np.float32)


def gaussian_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, QK_K)).astype(np.float32)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("qtype", TYPES)
def test_vectorized_encoder_matches_literal_port_bytewise(qtype: str):
    rng = np.random.default_rng(1234 + TYPES.index(qtype))
    blocks = np.concatenate([gaussian_blocks(rng, 6), special_blocks(rng)])
    ours = quantize_kquant(torch.from_numpy(blocks), qtype).numpy()
    for i, block in enumerate(blocks):
        literal = LITERAL[qtype]([f32(v) for v in block])
        assert len(literal) == KQUANT_TYPE_SIZES[qtype]
        assert ours[i].tobytes() == literal, f"{qtype} block {i} differs from the literal port"


@pytest.mark.parametrize("qtype", TYPES)
def test_rmse_on_gaussian_within_2_percent_of_reference(qtype: str):
    rng = np.random.default_rng(99)
    blocks = gaussian_blocks(rng, 4)
    ggml_type = gguf.GGMLQuantizationType[qtype]
    literal = np.frombuffer(b"".join(LITERAL[qtype]([f32(v) for v in b]) for b in blocks), dtype=np.uint8)
    ours = quantize_kquant(torch.from_numpy(blocks), qtype).numpy()
    rmse_ref = np.sqrt(np.mean((gguf.quants.dequantize(literal.reshape(4, -1), ggml_type) - blocks) ** 2))
    rmse_ours = np.sqrt(np.mean((gguf.quants.dequantize(ours, ggml_type) - blocks) ** 2))
    assert rmse_ref > 0
    assert abs(rmse_ours - rmse_ref) <= 0.02 * rmse_ref, (qtype, rmse_ours, rmse_ref)


# Bits per weight vs RMSE on N(0, 1): K-quants must land where the format's bit budget puts them.
EXPECTED_RMSE = {
    "Q2_K": (0.2, 0.4),
    "Q3_K": (0.1, 0.2),
    "Q4_K": (0.05, 0.09),
    "Q5_K": (0.025, 0.045),
    "Q6_K": (0.012, 0.024),
}


@pytest.mark.parametrize("qtype", TYPES)
def test_large_tensor_decodes_with_gguf_and_error_is_in_range(qtype: str):
    torch.manual_seed(7)
    weight = torch.randn(48, 768)
    packed = quantize_kquant(weight, qtype)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 768 // QK_K * KQUANT_TYPE_SIZES[qtype])
    decoded = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[qtype])
    assert decoded.shape == (48, 768)
    rmse = float(np.sqrt(np.mean((decoded - weight.numpy()) ** 2)))
    low, high = EXPECTED_RMSE[qtype]
    assert low < rmse < high, (qtype, rmse)


def test_rejects_rows_that_are_not_whole_superblocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_kquant(torch.randn(4, 300), "Q4_K")
    with pytest.raises(ValueError, match="not a K-quant"):
        quantize_kquant(torch.randn(4, 256), "Q8_0")
