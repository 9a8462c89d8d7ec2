"""llama.cpp's block-quantised weights: one decoder per type (bytes -> float32 numbers), and an
encoder beside each 32-number type (float32 numbers -> bytes).

A quantised row of a weight matrix is cut into blocks of 32 (or 256) numbers; each block is
stored as a few bytes of scale and the numbers' small integers packed into nibbles and bits.
Every function here takes the blocks of one type, ``blocks`` (N, bytes per block) uint8, and
returns their numbers, (N, numbers per block) float32, computed with the same float32
operations in the same order as ggml's ``dequantize_row_*`` and the ``gguf`` package's
``dequantize``, so the results are equal bit for bit.

Notation in the drawings: ``d`` and ``m`` are float16 (2 bytes, little-endian), ``q`` the
small unsigned integers, one number per position ``j`` of the block. ``qs[j]`` is byte ``j`` of
the packed integers; ``lo(b)`` and ``hi(b)`` are the low and high 4 bits of a byte.

    type    numbers  bytes  bits/number   value of number j
    Q8_0       32      34      8.5        d · q_j            q_j int8
    Q4_0       32      18      4.5        d · (q_j − 8)      q_j in 0..15
    Q4_1       32      20      5.0        d · q_j + m        q_j in 0..15
    Q5_0       32      22      5.5        d · (q_j − 16)     q_j in 0..31
    Q5_1       32      24      6.0        d · q_j + m        q_j in 0..31
    Q4_K      256     144      4.5        (d·sc_s) · q_j − dmin·mn_s   8 sub-blocks s of 32
    Q5_K      256     176      5.5        (d·sc_s) · q_j − dmin·mn_s   8 sub-blocks s of 32
    Q6_K      256     210      6.5625     (d·sc_s) · (q_j − 32)        16 sub-blocks s of 16

The encoders (``encode_q8_0`` …) are llama.cpp's reference round-to-nearest quantisation
(``quantize_row_q8_0_ref`` …, which ``convert_hf_to_gguf.py`` and ``llama-quantize --pure``
without an importance matrix use): each takes (N, 32) float32 numbers and returns (N, bytes
per block) uint8, with the same float32 operations in the same order as ggml's and the ``gguf``
package's ``quantize``, so the bytes are equal. The scale is chosen from the block alone:

    Q8_0   d = max|x| / 127              q = round(x / d)               (half away from zero)
    Q4_0   d = x_max / −8                q = min(15, trunc(x / d + 8.5))
    Q5_0   d = x_max / −16               q = min(31, trunc(x / d + 16.5))
    Q4_1   d = (max − min) / 15, m = min q = min(15, trunc((x − m) / d + 0.5))
    Q5_1   d = (max − min) / 31, m = min q = min(31, trunc((x − m) / d + 0.5))

where x_max is the number of largest magnitude with its sign (the first, on a tie), so that it
maps to q = 0 exactly and the other end keeps one step more. ``x / d`` is computed as
``x · (1/d)``, and a block of zeros (d = 0) gets 1/d = 0. d and m are stored as float16 after
the integers are computed from the float32 d.

References: ggml's ``ggml-common.h`` (the block structs) and ``ggml-quants.c``
(``dequantize_row_q4_0``, ``quantize_row_q4_0_ref`` …), https://github.com/ggml-org/llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

QK = 32  # numbers per block of the simple types
QK_K = 256  # numbers per super-block of the k-quants
K_SCALE_SIZE = 12  # bytes of the packed 6-bit scales and mins of Q4_K and Q5_K


def f16(two_bytes: np.ndarray) -> np.ndarray:
    """(N, 2) uint8, a float16 each  ->  (N, 1) float32 (exact: every float16 is a float32)."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """(N, 1) float32 -> (N, 2) uint8: each rounded to the nearest float16 (too large: inf)."""
    return values.astype("<f2").view(np.uint8)


def low_then_high_nibbles(packed: np.ndarray) -> np.ndarray:
    """(N, k) bytes -> (N, 2k): the low 4 bits of every byte, then the high 4 bits of every byte.

    This is how the 32-number blocks pack their nibbles: number j < 16 is lo(qs[j]),
    number j + 16 is hi(qs[j]).
    """
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(N, 32) integers 0..15 (or the low 4 bits of 0..31) -> (N, 16) bytes: number j < 16 in the
    low nibble of byte j, number j + 16 in its high nibble (``low_then_high_nibbles`` undone)."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def bits_little_endian(packed: np.ndarray) -> np.ndarray:
    """(N, k) bytes -> (N, 8k) of 0/1: bit b of byte i is number 8i + b (a little-endian bitmask)."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


def fifth_bits(q: np.ndarray) -> np.ndarray:
    """(N, 32) integers 0..31 -> (N, 4) bytes ``qh``: bit j is bit 4 of number j (little-endian)."""
    return np.packbits(q >> 4, axis=-1, bitorder="little")


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1/d in float32, and 0 where d is 0 (a block of zeros quantises to zeros)."""
    return np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))


def round_half_away_from_zero(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: 2.5 -> 3, −2.5 -> −3 (NumPy's ``round`` gives 2 and −2).

    Written as floor(|x|) plus one when the fraction is at least a half; ``floor(|x| + 0.5)``
    would be wrong for the float just below 0.5, where the sum rounds up to 1.
    """
    magnitude = np.abs(x)
    whole = np.floor(magnitude)
    return np.sign(x) * (whole + np.floor(2 * (magnitude - whole)))


def truncate_to_uint8(x: np.ndarray, largest: int) -> np.ndarray:
    """C's ``MIN(largest, (uint8_t)(x))`` for x ≥ 0: the integer part, capped at ``largest``."""
    return np.minimum(np.trunc(x).astype(np.uint8), np.uint8(largest))


def signed_absolute_max(numbers: np.ndarray) -> np.ndarray:
    """(N, k) -> (N, 1): each row's number of largest magnitude, with its sign (the first on a tie)."""
    return np.take_along_axis(numbers, np.abs(numbers).argmax(axis=-1, keepdims=True), axis=-1)


# ---------------------------------------------------------------------------- 32-number blocks


def q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: (N, 34) -> (N, 32).   value_j = d · q_j

        byte  0      2                                      34
              [ d  ][ q_0 q_1 … q_31  (int8)                ]
    """
    d = f16(blocks[:, 0:2])
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return q * d


def encode_q8_0(numbers: np.ndarray) -> np.ndarray:
    """Q8_0 encoder: (N, 32) float32 -> (N, 34).   d = max|x| / 127,  q_j = round(x_j / d)"""
    d = np.abs(numbers).max(axis=-1, keepdims=True) / np.float32(127)
    q = round_half_away_from_zero(numbers * reciprocal(d)).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=-1)


def q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: (N, 18) -> (N, 32).   value_j = d · (q_j − 8)

        byte  0      2                                      18
              [ d  ][ qs_0 … qs_15                          ]
        q_j = lo(qs_j) for j < 16,  q_j = hi(qs_{j−16}) for j ≥ 16
    """
    d = f16(blocks[:, 0:2])
    q = low_then_high_nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def encode_q4_0(numbers: np.ndarray) -> np.ndarray:
    """Q4_0 encoder: (N, 32) float32 -> (N, 18).   d = x_max / −8,  q_j = min(15, trunc(x_j / d + 8.5))"""
    d = signed_absolute_max(numbers) / np.float32(-8)
    q = truncate_to_uint8(numbers * reciprocal(d) + np.float32(8.5), largest=15)
    return np.concatenate([f16_bytes(d), pack_nibbles(q)], axis=-1)


def q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: (N, 20) -> (N, 32).   value_j = d · q_j + m

        byte  0      2      4                               20
              [ d  ][ m  ][ qs_0 … qs_15                    ]      nibbles as in Q4_0
    """
    d, m = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    q = low_then_high_nibbles(blocks[:, 4:20]).astype(np.float32)
    return (d * q) + m


def encode_q4_1(numbers: np.ndarray) -> np.ndarray:
    """Q4_1 encoder: (N, 32) float32 -> (N, 20).   m = min, d = (max − m) / 15,
    q_j = min(15, trunc((x_j − m) / d + 0.5))"""
    low, high = numbers.min(axis=-1, keepdims=True), numbers.max(axis=-1, keepdims=True)
    d = (high - low) / np.float32(15)
    q = truncate_to_uint8((numbers - low) * reciprocal(d) + np.float32(0.5), largest=15)
    return np.concatenate([f16_bytes(d), f16_bytes(low), pack_nibbles(q)], axis=-1)


def q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: (N, 22) -> (N, 32).   value_j = d · (q_j − 16)

        byte  0      2          6                           22
              [ d  ][ qh (32 bits) ][ qs_0 … qs_15          ]
        q_j = (low 4 bits as in Q4_0) | (bit j of qh) << 4
    """
    d = f16(blocks[:, 0:2])
    high = bits_little_endian(blocks[:, 2:6])
    q = (low_then_high_nibbles(blocks[:, 6:22]) | (high << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def encode_q5_0(numbers: np.ndarray) -> np.ndarray:
    """Q5_0 encoder: (N, 32) float32 -> (N, 22).   d = x_max / −16,  q_j = min(31, trunc(x_j / d + 16.5))"""
    d = signed_absolute_max(numbers) / np.float32(-16)
    q = truncate_to_uint8(numbers * reciprocal(d) + np.float32(16.5), largest=31)
    return np.concatenate([f16_bytes(d), fifth_bits(q), pack_nibbles(q)], axis=-1)


def q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: (N, 24) -> (N, 32).   value_j = d · q_j + m

        byte  0      2      4          8                    24
              [ d  ][ m  ][ qh (32 bits) ][ qs_0 … qs_15    ]      q_j as in Q5_0
    """
    d, m = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    high = bits_little_endian(blocks[:, 4:8])
    q = (low_then_high_nibbles(blocks[:, 8:24]) | (high << 4)).astype(np.float32)
    return (d * q) + m


def encode_q5_1(numbers: np.ndarray) -> np.ndarray:
    """Q5_1 encoder: (N, 32) float32 -> (N, 24).   m = min, d = (max − m) / 31,
    q_j = min(31, trunc((x_j − m) / d + 0.5))"""
    low, high = numbers.min(axis=-1, keepdims=True), numbers.max(axis=-1, keepdims=True)
    d = (high - low) / np.float32(31)
    q = truncate_to_uint8((numbers - low) * reciprocal(d) + np.float32(0.5), largest=31)
    return np.concatenate([f16_bytes(d), f16_bytes(low), fifth_bits(q), pack_nibbles(q)], axis=-1)


# ---------------------------------------------------------------------------- k-quants: 256 numbers


def k_scales_and_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit mins of Q4_K/Q5_K super-blocks: bytes 4..15 of each of
    (N, block bytes) -> 2 × (N, 8).

        bytes 4..7   (a):  sc_0..3 in bits 0-5;  bits 6-7 are bits 4-5 of sc_4..7
        bytes 8..11  (b):  mn_0..3 in bits 0-5;  bits 6-7 are bits 4-5 of mn_4..7
        bytes 12..15 (c):  lo(c) = bits 0-3 of sc_4..7,  hi(c) = bits 0-3 of mn_4..7

    a, b and c are read as one little-endian 32-bit word each, so that each step below handles
    four bytes at once (byte k of a word is number k).
    """
    words = np.ascontiguousarray(blocks).view(np.uint32)
    a, b, c = words[:, 1], words[:, 2], words[:, 3]
    scales = np.empty((len(words), 2), dtype=np.uint32)
    mins = np.empty((len(words), 2), dtype=np.uint32)
    scales[:, 0] = a & 0x3F3F3F3F
    scales[:, 1] = (c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030)
    mins[:, 0] = b & 0x3F3F3F3F
    mins[:, 1] = ((c >> 4) & 0x0F0F0F0F) | ((b >> 2) & 0x30303030)
    return scales.view(np.uint8), mins.view(np.uint8)


def nibbles_by_32(packed: np.ndarray) -> np.ndarray:
    """(N, 32·k) bytes -> (N, 2k, 32): each 32 bytes give a sub-block of low nibbles, then one of
    high nibbles (sub-blocks 2i and 2i+1 share bytes 32i..32i+31)."""
    n = packed.shape[0]
    chunks = packed.reshape(n, -1, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(n, -1, 32)


def q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: (N, 144) -> (N, 256).   value = (d · sc_s) · q_j − dmin · mn_s,  s = j // 32

        byte  0      2       4                 16                          144
              [ d  ][ dmin ][ scales, mins (12) ][ qs: 128 bytes of nibbles  ]
        sub-blocks 2i, 2i+1 = lo, hi of qs[32i .. 32i+31]
    """
    n = blocks.shape[0]
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    scales, mins = k_scales_and_mins(blocks)
    step = (d * scales.astype(np.float32)).reshape(n, 8, 1)
    offset = (dmin * mins.astype(np.float32)).reshape(n, 8, 1)
    q = nibbles_by_32(blocks[:, 16:144]).astype(np.float32)  # (N, 8, 32)
    return (step * q - offset).reshape(n, QK_K)


def q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: (N, 176) -> (N, 256).   value = (d · sc_s) · q_j − dmin · mn_s,  s = j // 32

        byte  0      2       4                 16             48                       176
              [ d  ][ dmin ][ scales, mins (12) ][ qh (32)     ][ qs: 128 bytes of nibbles ]
        low 4 bits as in Q4_K; bit s of qh[k] is bit 4 of number k of sub-block s
    """
    n = blocks.shape[0]
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    scales, mins = k_scales_and_mins(blocks)
    step = (d * scales.astype(np.float32)).reshape(n, 8, 1)
    offset = (dmin * mins.astype(np.float32)).reshape(n, 8, 1)
    qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (nibbles_by_32(blocks[:, 48:176]) | ((qh & 1) << 4)).astype(np.float32)  # (N, 8, 32)
    return (step * q - offset).reshape(n, QK_K)


def q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: (N, 210) -> (N, 256).   value = (d · sc_s) · (q_j − 32),  s = j // 16

        byte  0                    128            192             208    210
              [ ql: 128 bytes       ][ qh: 64 bytes ][ sc: 16 int8  ][ d  ]
        each half h (numbers 128h ..) reads ql[64h ..] and qh[32h ..]:
          number 32k + i of the half (k < 4, i < 32):
            low 4 bits  = lo(ql[64h + 32(k%2) + i]) for k < 2, hi(…) for k ≥ 2
            high 2 bits = bits 2k, 2k+1 of qh[32h + i]
    """
    n = blocks.shape[0]
    d = f16(blocks[:, 208:210])
    step = (d * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 8, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (qh & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (step * q).reshape(n, QK_K)


# ---------------------------------------------------------------------------- products without decoding
#
# A number of every type above is a small integer times its group's scale, plus its group's
# offset (Q4_0: d · q_j − 8d; Q4_K: (d·sc_s) · q_j − dmin·mn_s). So a product with one row of x
# never needs the numbers in float:
#
#     Σ_j value_j · x_j  =  Σ_groups  scale · (Σ_{j in group} q_j · x_j)  +  offset · (Σ_{j in group} x_j)
#
# which is how llama.cpp's own dot products work. A ``DotForm`` says where each q_j sits in the
# block's bytes: a ``Plane`` reads one small integer out of every byte of a block (its low nibble,
# its high nibble, two of its bits, or the byte itself as int8) and its runs say which bytes
# hold which numbers. The integers of a plane keep the block's byte layout, so no bytes move:
# weights/block_dots.py multiplies them by x laid out the same way, with zeros where a byte is a
# scale or belongs to another plane, and scales each group's sum afterwards.


@dataclass(frozen=True)
class Plane:
    """Small integers read from each byte of a block, and the numbers they are part of.

    ``take(bytes, out)`` writes into the uint8 ``out`` one integer per byte (None: the byte is
    itself the integer, as int8). Each run ``(first_byte, first_number, count, weight)`` says
    that number ``first_number + i`` of the block has ``weight`` times the integer of byte
    ``first_byte + i`` in its q (a high part of a q has weight 16).
    """

    take: Callable | None
    runs: tuple


@dataclass(frozen=True)
class DotForm:
    """A block type's numbers as ``scale · q + offset``, per group of ``group`` numbers.

    ``scales(blocks)`` takes (N, block bytes) and gives (scale, offset), each (N, groups per
    block) float32; offset None where there is none (Q8_0).
    """

    group: int
    planes: tuple
    scales: Callable


def low_nibble(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.bitwise_and(packed, 0x0F, out=out)


def high_nibble(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.right_shift(packed, 4, out=out)


def two_bits(shift: int) -> Callable:
    """Bits ``shift`` and ``shift + 1`` of each byte (Q6_K's high bits)."""
    def take(packed: np.ndarray, out: np.ndarray) -> np.ndarray:
        return np.bitwise_and(np.right_shift(packed, shift, out=out), 3, out=out)
    return take


def f16_at(blocks: np.ndarray, byte: int) -> np.ndarray:
    """(N, bytes) blocks -> (N, 1) float32: the float16 at an even ``byte`` of each block."""
    return blocks.view(np.uint16)[:, byte // 2:byte // 2 + 1].view(np.float16).astype(np.float32)


def q8_0_scales(blocks):
    return f16_at(blocks, 0), None


def q4_0_scales(blocks):
    d = f16_at(blocks, 0)
    return d, np.float32(-8) * d


def q4_1_scales(blocks):
    return f16_at(blocks, 0), f16_at(blocks, 2)


def q4_k_scales(blocks):
    scales, mins = k_scales_and_mins(blocks)
    return f16_at(blocks, 0) * scales.astype(np.float32), -(f16_at(blocks, 2) * mins.astype(np.float32))


def q6_k_scales(blocks):
    step = f16_at(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return step, np.float32(-32) * step


# byte 2.. of Q8_0 are q_0..q_31 as int8
q8_0_dots = DotForm(QK, (Plane(None, ((2, 0, 32, 1),)),), q8_0_scales)
# q_j < 16: lo(byte 2 + j); q_j ≥ 16: hi(byte 2 + j − 16); Q4_1 the same from byte 4
q4_0_dots = DotForm(QK, (Plane(low_nibble, ((2, 0, 16, 1),)), Plane(high_nibble, ((2, 16, 16, 1),))), q4_0_scales)
q4_1_dots = DotForm(QK, (Plane(low_nibble, ((4, 0, 16, 1),)), Plane(high_nibble, ((4, 16, 16, 1),))), q4_1_scales)
# sub-blocks 2i, 2i+1: lo, hi of qs[32i ..] = bytes 16 + 32i ..
q4_k_dots = DotForm(32, (Plane(low_nibble, tuple((16 + 32 * i, 64 * i, 32, 1) for i in range(4))),
                         Plane(high_nibble, tuple((16 + 32 * i, 64 * i + 32, 32, 1) for i in range(4)))),
                    q4_k_scales)
# half h: the low 4 bits come from ql = bytes 64h .. (lo: numbers 128h + 0..63, hi: 128h + 64..127);
# high bits k of qh = bytes 128 + 32h + i belong to number 128h + 32k + i, worth 16 each
q6_k_dots = DotForm(16, (Plane(low_nibble, tuple((64 * h, 128 * h, 64, 1) for h in range(2))),
                         Plane(high_nibble, tuple((64 * h, 128 * h + 64, 64, 1) for h in range(2))),
                         *(Plane(two_bits(2 * k), tuple((128 + 32 * h, 128 * h + 32 * k, 32, 16) for h in range(2)))
                           for k in range(4))),
                    q6_k_scales)
