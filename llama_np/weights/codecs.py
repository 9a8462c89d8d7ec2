"""How stored bytes become float32 numbers: one codec per storage dtype a file may declare.
"""

from __future__ import annotations

import numpy as np

from llama_np.errors import CheckpointError
from llama_np.weights import workers
from llama_np.weights.workers import cpu_count, run_parallel, split


# float16 -> float32 by bits, for a sign-extended int32 copy of the float16 bits shifted left 13:
# keep the sign (bit 31), the 5 exponent bits (now 23..27) and the 10 mantissa bits (13..22).
F16_KEPT_BITS = np.int32(np.uint32(0x8FFFE000).view(np.int32))


# That float32 is the float16's value times 2**-112 (exponent biases 127 and 15): scale it back.
# The scaling is exact, and turns float16 subnormals into the right normal float32s.
F16_EXPONENT_SCALE = np.float32(2.0**112)


# Exponent 31 (inf, NaN) comes out as a finite 65536 <= |v| < 131072, beyond float16's largest
# finite 65504; widen_into widens a tile holding such values by NumPy's cast instead (and a
# streamed product then refuses the matrix).
F16_LARGEST_FINITE = np.float32(65504.0)


def widen_into(stored: np.ndarray, storage_dtype: str, out: np.ndarray, check_special: bool = True,
               scaled: bool = False) -> bool:
    """Widen float16 (``"F16"``) or bfloat16 bits (``"BF16"``, uint16) into the float32 ``out``, exactly.

    stored and out have the same shape. bfloat16 is the top half of a float32, so it is shifted
    16 bits up. float16 is rebuilt from its bits: shift the exponent and mantissa into float32's
    places and keep the sign, which gives the value times 2**-112 (the exponent biases differ by
    112), then scale by 2**112 — or, with ``scaled=True``, leave out the scaling, which a streamed
    product puts on x instead. The shift turns inf and NaN into large finite numbers, so unless
    the caller knows these rows hold none (``check_special=False``), a tile with any is widened
    again by NumPy's own cast. Returns whether the tile held inf or NaN (never for BF16).
    """
    # Each step is one pass of a single-type ufunc over the tile: a shift that also casts
    # (int16 in, int32 out) runs through NumPy's buffered loop at little more than half the speed.
    bits = out.view(np.int32)
    if storage_dtype == "BF16":
        np.copyto(bits.view(np.uint32), stored.view(np.uint16))
        np.left_shift(bits.view(np.uint32), 16, out=bits.view(np.uint32))
        return False
    np.copyto(bits, stored.view(np.int16))  # sign-extended
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, F16_KEPT_BITS, out=bits)
    largest = F16_LARGEST_FINITE / F16_EXPONENT_SCALE
    if not scaled:
        np.multiply(out, F16_EXPONENT_SCALE, out=out)
        largest = F16_LARGEST_FINITE
    if check_special and out.size and (out.max() > largest or out.min() < -largest):
        np.copyto(out, stored, casting="unsafe")  # NumPy's cast keeps inf and NaN
        if scaled:
            np.divide(out, F16_EXPONENT_SCALE, out=out)  # exact: a power of two, no underflow
        return True
    return False


def widen(stored: np.ndarray, storage_dtype: str, dtype=np.float32, what: str | None = None) -> np.ndarray:
    """A new array of ``dtype`` (float32 or float64) with the values of a stored F16/BF16 array.

    The first rows axis is split across the cores; each widens its part tile by tile, so the new
    array's pages are touched once, in parallel, and no temporary the size of the tensor is made.
    With ``what`` (the tensor and its file), the values are also checked as ``check_finite``
    does, by the sum of each tile while it is still in cache.
    """
    dtype = np.dtype(dtype)
    out = np.empty(stored.shape, dtype=np.float32)  # float64 (a reference computation) via float32: exact
    if stored.size == 0:
        return out.astype(dtype, copy=False)
    flat_in, flat_out = stored.reshape(-1), out.reshape(-1)

    def widen_part(part: range) -> bool:
        finite = True
        for start in range(part.start, part.stop, workers.TILE_ELEMENTS):
            stop = min(start + workers.TILE_ELEMENTS, part.stop)
            widen_into(flat_in[start:stop], storage_dtype, flat_out[start:stop])
            if what is not None:
                finite = finite and sum_is_finite(flat_out[start:stop])
        return finite

    parts = min(cpu_count(), -(-flat_in.size // workers.TILE_ELEMENTS))  # a norm's few numbers: one part
    finite = run_parallel([lambda part=part: widen_part(part) for part in split(flat_in.size, parts)])
    if not all(finite):
        check_finite(out, what, dtype)  # a NaN or inf, or finite values whose sum overflowed
    return out.astype(dtype, copy=False)


def sum_is_finite(values: np.ndarray) -> bool:
    """Whether the sum of ``values`` is finite: one fast pass with no temporary array.

    Any NaN or inf makes the sum NaN or inf, but so can finite values that overflow it, so a
    False only says to look at the values one by one (check_finite).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # inf + (-inf) is NaN
        return values.size == 0 or bool(np.isfinite(values.sum()))


def check_finite(values: np.ndarray, what: str, compute) -> None:
    """CheckpointError if ``values`` (any shape, widened) holds a NaN or an infinity."""
    if sum_is_finite(values):
        return
    bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    if count:
        nans = int(np.count_nonzero(np.isnan(values)))
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape))
        raise non_finite_error(what, nans, count - nans, first, compute)


def non_finite_error(what: str, nans: int, infinities: int, first: tuple, compute) -> CheckpointError:
    """The one error for NaN or inf weights, kept or streamed: ``what`` names the tensor and file."""
    return CheckpointError(
        f"{what} holds {nans} NaN and {infinities} infinite values as {np.dtype(compute)} (the first at "
        f"index {first}); a single one makes every logit NaN, so the checkpoint is corrupt"
    )


# The largest magnitude bits (sign bit cleared) of a finite value: one more is inf, anything above
# it NaN.
LARGEST_FINITE_BITS = {"F16": 0x7BFF, "BF16": 0x7F7F}


def stored_non_finite_error(stored: np.ndarray, storage_dtype: str, what: str) -> CheckpointError | None:
    """The CheckpointError for a stored F16/BF16 matrix holding NaN or inf, or None if it holds none.

    Counted on the stored bits, a block of rows at a time, so nothing as large as the matrix is
    allocated: exponent all ones is inf (mantissa 0) or NaN.
    """
    largest = LARGEST_FINITE_BITS[storage_dtype]
    infinity = largest + 1
    rows = max(1, workers.TILE_ELEMENTS // max(1, stored.shape[1]))
    nans = infinities = 0
    first = None
    for start in range(0, stored.shape[0], rows):
        magnitude = stored[start:start + rows].view(np.uint16) & np.uint16(0x7FFF)
        bad = magnitude > largest
        if first is None and bad.any():
            row, column = np.unravel_index(int(np.argmax(bad)), bad.shape)
            first = (start + int(row), int(column))
        infinities += int(np.count_nonzero(magnitude == infinity))
        nans += int(np.count_nonzero(magnitude > infinity))
    if first is None:
        return None
    return non_finite_error(what, nans, infinities, first, np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values (any shape) -> BF16 bit patterns (uint16), rounding to nearest even.

    Adding 0x7FFF plus the lowest kept bit before dropping the low 16 bits rounds halfway cases
    to the even neighbour, as torch does. NaN stays a (quiet) NaN instead of rounding to inf.
    """
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)  # 64 bits so adding the bias cannot wrap
    lowest_kept_bit = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lowest_kept_bit) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)
