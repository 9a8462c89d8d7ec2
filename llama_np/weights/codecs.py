"""How stored bytes become float32 numbers: one codec per storage dtype a file may declare.

    name    bytes per value   stored as (NumPy)      widened by
    F64     8                 float64                a cast (a reference computation's weights)
    F32     4                 float32                nothing: used as the memory-mapped view
    F16     2                 float16                its bits, tile by tile (``widen_into``)
    BF16    2                 uint16 (the bits)      its bits shifted 16 up, tile by tile
    Q8_0 …  34 per 32 values  uint8 blocks           a decoder of weights/quants.py, tile by tile
                                                     (and back by its encoder: ``encode``)

``CODECS`` maps the name a file declares (safetensors' ``dtype``; torch storages and GGUF's
ggml types, ``GGML_TYPES``, are mapped onto these names) to its ``Codec``; every reader, the
streamer, ``llama-np inspect`` and conversion ask it rather than spelling dtype names. A
block-quantised type of llama.cpp, whose bytes hold scales and packed integers, is a
``BlockCodec``: one decoder in weights/quants.py and one line here.
"""

from __future__ import annotations

import math

import numpy as np

from llama_np.errors import CheckpointError
from llama_np.weights import quants, workers
from llama_np.weights.block_dots import BlockDots
from llama_np.weights.workers import cpu_count, run_parallel, split

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

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
    """Widen float16 (F16) or bfloat16 bits (BF16, uint16) into the float32 ``out``, exactly.

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
    if storage_dtype == BF16.name:
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


def stored_non_finite_error(stored: np.ndarray, storage_dtype: str, what: str) -> CheckpointError | None:
    """The CheckpointError for a stored F16/BF16 matrix holding NaN or inf, or None if it holds none.

    Counted on the stored bits, a block of rows at a time, so nothing as large as the matrix is
    allocated: exponent all ones is inf (mantissa 0) or NaN.
    """
    largest = CODECS[storage_dtype].largest_finite_bits
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


# ---------------------------------------------------------------------------- the codecs


class Codec:
    """How one storage dtype's bytes become numbers, and numbers become its bytes.

    ``name`` is how a file declares it, ``torch_name`` how config.json's ``torch_dtype`` and
    Transformers say it. ``streamed``: a 2-D tensor of this type may stay in the memory map and
    be widened tile by tile where it is multiplied (weights/streaming.py).
    """

    name: str
    torch_name: str | None  # None: Transformers has no such dtype (a block-quantised one)
    stored_dtype: np.dtype  # what its bytes are viewed as
    ggml_type: int  # its number in a GGUF file's tensor infos (ggml.h's enum ggml_type)
    streamed = False
    scales_through_x = False  # see HalfCodec.scales_through_x
    dots = None  # see BlockCodec.dots
    largest_finite_bits: int | None = None  # the bits of the largest finite magnitude (sign cleared)

    def __init__(self, name: str, torch_name: str | None, stored_dtype, ggml_type: int):
        self.name, self.torch_name, self.stored_dtype = name, torch_name, np.dtype(stored_dtype)
        self.ggml_type = ggml_type

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    @property
    def bits(self) -> int:
        """Bits per value as stored."""
        return self.stored_dtype.itemsize * 8

    def logical_shape(self, stored: np.ndarray) -> tuple:
        """The shape of the numbers ``stored`` (a ``view``) holds: its own, for a float codec."""
        return tuple(stored.shape)

    def row_problem(self, columns: int) -> str | None:
        """Why a row of ``columns`` numbers cannot be stored in this dtype, or None (a float: never)."""
        return None

    def nbytes(self, shape) -> int:
        """Bytes a tensor of ``shape`` takes in a file."""
        return math.prod(shape) * self.stored_dtype.itemsize

    def view(self, raw: np.ndarray, shape) -> np.ndarray:
        """The stored array behind ``raw`` (uint8, ``nbytes(shape)`` of them), shape ``shape``."""
        if raw.size == 0:  # nothing to view; np.frombuffer rejects empty buffers
            return np.empty(shape, dtype=self.stored_dtype)
        return raw.view(self.stored_dtype).reshape(shape)

    def decode(self, stored: np.ndarray, dtype=np.float32, what: str | None = None) -> np.ndarray:
        """The values of ``stored`` as ``dtype`` (float32 or float64): the array itself when it
        already is, else a new one. With ``what`` (the tensor and its file), NaN or inf among
        them is a CheckpointError naming it."""
        with np.errstate(over="ignore"):  # F64 beyond float32's range: inf, refused below
            values = stored.astype(dtype, copy=False)
        if what is not None:
            check_finite(values, what, dtype)
        return values

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float values (any shape) -> the stored array, rounded to nearest even (too large: inf)."""
        with np.errstate(over="ignore"):
            return np.asarray(values).astype(self.stored_dtype, copy=False)


class HalfCodec(Codec):
    """A 16-bit float widened exactly from its bits (F16, BF16), tile by tile on every core."""

    streamed = True

    def __init__(self, name: str, torch_name: str, stored_dtype, largest_finite_bits: int, ggml_type: int):
        super().__init__(name, torch_name, stored_dtype, ggml_type)
        self.largest_finite_bits = largest_finite_bits

    def decode(self, stored: np.ndarray, dtype=np.float32, what: str | None = None) -> np.ndarray:
        return widen(stored, self.name, dtype, what)

    def decode_rows(self, stored: np.ndarray, out: np.ndarray, check_special: bool = True,
                    scaled: bool = False) -> bool:
        """Widen rows of ``stored`` into the float32 ``out`` (F16 times 2**-112 if ``scaled``).

        Returns whether they may hold inf or NaN (only asked with ``check_special``): a float16
        tile says so by the range check of ``widen_into``, a bfloat16 one by its sum, since
        widening keeps its inf and NaN as they are.
        """
        special = widen_into(stored, self.name, out, check_special=check_special, scaled=scaled)
        if check_special and self is BF16:
            special = not sum_is_finite(out)
        return special

    @property
    def scales_through_x(self) -> bool:
        """Whether a streamed product may leave out the 2**112 of ``widen_into`` and scale x."""
        return self is F16

    def non_finite_error(self, stored: np.ndarray, what: str) -> CheckpointError | None:
        """The CheckpointError for a stored matrix holding NaN or inf, or None (``stored_non_finite_error``)."""
        return stored_non_finite_error(stored, self.name, what)

    def encode(self, values: np.ndarray) -> np.ndarray:
        if self is BF16:
            return float32_to_bf16_bits(values)
        return super().encode(values)


F64 = Codec("F64", "float64", "<f8", ggml_type=28)
F32 = Codec("F32", "float32", "<f4", ggml_type=0)
F16 = HalfCodec("F16", "float16", "<f2", largest_finite_bits=0x7BFF, ggml_type=1)
BF16 = HalfCodec("BF16", "bfloat16", "<u2", largest_finite_bits=0x7F7F, ggml_type=30)  # NumPy has no bfloat16


# ---------------------------------------------------------------------------- block-quantised codecs


class BlockCodec(Codec):
    """llama.cpp's block-quantised storage (weights/quants.py draws each layout).

    A row of ``columns`` numbers is stored as ``columns / block_size`` blocks of ``block_bytes``
    bytes each. ``view`` gives the raw blocks, (..., blocks per row, block_bytes) uint8, so that
    rows can be sliced and permuted while still quantised; ``decode_blocks`` (one function of
    weights/quants.py) turns (N, block_bytes) blocks into (N, block_size) float32 numbers, equal
    bit for bit to ggml's own dequantisation, and ``encode_blocks`` (its ``encode_*`` twin, for
    the types llama_np writes) turns numbers back into blocks, byte for byte as ggml. Matrices are streamed: a product decodes a tile of
    rows at a time into a small buffer.
    """

    streamed = True

    def __init__(self, name: str, ggml_type: int, block_size: int, block_bytes: int, decode_blocks,
                 encode_blocks=None, dots=None):
        super().__init__(name, None, np.uint8, ggml_type)
        self.block_size, self.block_bytes, self.decode_blocks = block_size, block_bytes, decode_blocks
        self.encode_blocks = encode_blocks  # None: llama_np reads this type but does not write it
        # products with a row of x without decoding (weights/block_dots.py); None: always decoded
        self.dots = None if dots is None else BlockDots(dots, block_size, block_bytes)

    @property
    def bits(self) -> float:
        """Bits per number as stored, scales included (Q4_0: 18 bytes for 32 numbers, 4.5)."""
        return self.block_bytes * 8 / self.block_size

    def row_problem(self, columns: int) -> str | None:
        if columns % self.block_size:
            return f"{self.name} stores rows in blocks of {self.block_size} numbers, and {columns} is not a multiple"
        return None

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of ``shape`` (at least 1-D; its last dimension a whole number of blocks)."""
        problem = self.row_problem(shape[-1])
        if problem:
            raise CheckpointError(f"a tensor of shape {tuple(shape)}: {problem}")
        return math.prod(shape) // self.block_size * self.block_bytes

    def view(self, raw: np.ndarray, shape) -> np.ndarray:
        """(..., columns) numbers -> the raw blocks (..., columns / block_size, block_bytes) uint8."""
        *rows, columns = shape
        return raw.reshape(*rows, columns // self.block_size, self.block_bytes)

    def logical_shape(self, stored: np.ndarray) -> tuple:
        return (*stored.shape[:-2], stored.shape[-2] * self.block_size)

    def decode_rows(self, stored: np.ndarray, out: np.ndarray, check_special: bool = True,
                    scaled: bool = False) -> bool:
        """Decode blocks (rows, blocks per row, block_bytes) into the float32 ``out`` (rows, columns).

        ``scaled`` is never asked (``scales_through_x`` is False). Returns whether the rows may
        hold inf or NaN (a float16 scale can be either), checked by their sum with
        ``check_special``.
        """
        with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales: found by the caller
            out[...] = self.decode_blocks(stored.reshape(-1, self.block_bytes)).reshape(out.shape)
        return check_special and not sum_is_finite(out)

    def tiles(self, stored: np.ndarray):
        """(first row, that tile's blocks) over ``stored`` (..., blocks, block_bytes) as rows of blocks,
        ``workers.TILE_ELEMENTS`` numbers or so at a time."""
        blocks = stored.reshape(-1, *stored.shape[-2:])  # (rows, blocks per row, block_bytes)
        rows = max(1, workers.TILE_ELEMENTS // (blocks.shape[1] * self.block_size or 1))
        for start in range(0, blocks.shape[0], rows):
            yield start, blocks[start:start + rows]

    def decode(self, stored: np.ndarray, dtype=np.float32, what: str | None = None) -> np.ndarray:
        """All of ``stored`` (..., blocks, block_bytes) as ``dtype``, (..., columns), a tile of rows
        at a time so that no temporary much larger than a tile is made."""
        shape = self.logical_shape(stored)
        out = np.empty(shape, dtype=np.float32)
        numbers = out.reshape(-1, shape[-1])  # (rows, columns)
        for start, tile in self.tiles(stored):
            self.decode_rows(tile, numbers[start:start + len(tile)], check_special=False)
        if what is not None:
            check_finite(out, what, dtype)
        return out.astype(dtype, copy=False)

    def non_finite_error(self, stored: np.ndarray, what: str) -> CheckpointError | None:
        """The CheckpointError for a stored matrix holding NaN or inf once decoded, or None.

        Counted a tile at a time, so nothing as large as the decoded matrix is allocated."""
        nans = infinities = 0
        first = None
        for start, tile in self.tiles(stored):
            values = np.empty((len(tile), tile.shape[1] * self.block_size), dtype=np.float32)
            self.decode_rows(tile, values, check_special=False)
            bad = ~np.isfinite(values)
            if first is None and bad.any():
                row, column = np.unravel_index(int(np.argmax(bad)), bad.shape)
                first = (start + int(row), int(column))
            nans += int(np.count_nonzero(np.isnan(values)))
            infinities += int(np.count_nonzero(bad)) - int(np.count_nonzero(np.isnan(values)))
        if first is None:
            return None
        return non_finite_error(what, nans, infinities, first, np.float32)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float values (..., columns) -> the raw blocks (..., columns / block_size, block_bytes),
        quantised from their float32 values by round-to-nearest (weights/quants.py)."""
        if self.encode_blocks is None:
            raise CheckpointError(f"llama_np reads {self.name} but does not write it; write one of "
                                  f"{', '.join(WRITTEN_TYPES)}")
        values = np.asarray(values, dtype=np.float32)
        *rows, columns = values.shape
        problem = self.row_problem(columns)
        if problem:
            raise CheckpointError(f"cannot quantise a tensor of shape {values.shape}: {problem}")
        # A scale too large for float16 is stored as inf, and one of float32's subnormals has no
        # finite reciprocal: llama.cpp writes such blocks just as these operations do.
        with np.errstate(over="ignore", invalid="ignore"):
            blocks = self.encode_blocks(values.reshape(-1, self.block_size))
        return blocks.reshape(*rows, columns // self.block_size, self.block_bytes)


Q8_0 = BlockCodec("Q8_0", 8, quants.QK, 34, quants.q8_0, quants.encode_q8_0, quants.q8_0_dots)
Q4_0 = BlockCodec("Q4_0", 2, quants.QK, 18, quants.q4_0, quants.encode_q4_0, quants.q4_0_dots)
Q4_1 = BlockCodec("Q4_1", 3, quants.QK, 20, quants.q4_1, quants.encode_q4_1, quants.q4_1_dots)
Q5_0 = BlockCodec("Q5_0", 6, quants.QK, 22, quants.q5_0, quants.encode_q5_0)
Q5_1 = BlockCodec("Q5_1", 7, quants.QK, 24, quants.q5_1, quants.encode_q5_1)
Q4_K = BlockCodec("Q4_K", 12, quants.QK_K, 144, quants.q4_k, dots=quants.q4_k_dots)
Q5_K = BlockCodec("Q5_K", 13, quants.QK_K, 176, quants.q5_k)
Q6_K = BlockCodec("Q6_K", 14, quants.QK_K, 210, quants.q6_k, dots=quants.q6_k_dots)

# name a file declares -> codec
CODECS = {codec.name: codec for codec in (F64, F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)}

# GGUF's tensor type number (ggml_type) -> codec
GGML_TYPES = {codec.ggml_type: codec for codec in CODECS.values()}

# What a GGUF file may be written as (``llama-np quantize --type``), each with llama.cpp's
# ``llama_ftype`` number, which a file records as ``general.file_type`` (llama.h: ALL_F32 = 0,
# MOSTLY_F16 = 1, MOSTLY_Q4_0 = 2, MOSTLY_Q4_1 = 3, MOSTLY_Q8_0 = 7, MOSTLY_Q5_0 = 8,
# MOSTLY_Q5_1 = 9, MOSTLY_BF16 = 32).
LLAMA_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}
WRITTEN_TYPES = tuple(LLAMA_FILE_TYPES)


def codec_for_numpy(dtype) -> Codec | None:
    """The codec that stores NumPy arrays of ``dtype`` as they are (float64, float32, float16)."""
    dtype = np.dtype(dtype)
    return next((codec for codec in (F64, F32, F16) if codec.stored_dtype == dtype.newbyteorder("<")), None)


def codec_for_torch_name(torch_name: str) -> Codec | None:
    """The codec of a ``torch_dtype`` spelling ("float16"), or None."""
    return next((codec for codec in CODECS.values() if codec.torch_name == torch_name), None)
