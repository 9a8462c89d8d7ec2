"""Where the weights are while the model runs: widened once and kept, or streamed from the file.

A checkpoint stores its weights in float16 or bfloat16 (or, in a GGUF file, in llama.cpp's
quantised blocks: docs/gguf.md); the maths runs in float32. A weight can be used in two ways,
and ``pretrained.Weights`` picks one per tensor (docs/checkpoints.md):

- **kept** — widened to float32 once (``widen``, both cores, straight into one new array) and kept.
  A product with it is one BLAS call, ``x @ W.T``.
- **streamed** — left as stored in the memory-mapped file (``StreamedMatrix``). ``x @ W.T`` widens
  a tile of W's rows at a time into a small buffer that stays in cache, multiplies it, and moves
  on; a worker per core takes the next tile whenever it is done with one. Nothing model-sized is
  allocated.

Why tiles: widening is cheap on data in cache and expensive on fresh memory. Measured on a
2-core machine with OpenBLAS, per core (docs/checkpoints.md has the table):

    NumPy's float16 -> float32 cast (astype) into a new array     ~0.2-0.6 G elements/s
    copy to int32, shift, mask: a float16 tile in cache             ~3.7 G elements/s
    copy to uint32, shift: a bfloat16 tile in cache                 ~5 G elements/s
    float32 matrix-vector product from a tile in cache             ~15 G elements/s

so a streamed matrix-vector product is bound by the widening, at about 5 G elements/s for both
cores, while widening a whole 7B model into fresh float32 arrays on every forward took ten
times longer. Both ways give the same numbers: float16 and bfloat16 are exactly representable in
float32, and a product tiled over output rows computes each output's dot product from the same
row of W and the same x (summed by the same BLAS kernel, at most in another order). A quantised
tile is decoded by its codec (weights/quants.py) into the same buffer, to the same float32
numbers decoding the whole matrix gives.

Threads: NumPy's ufuncs and matrix products release the GIL, so the streamed product runs its
row shares on a small pool of Python threads, each calling BLAS with one thread
(threadpoolctl, ``pip install llama-np[fast]``), as two BLAS threads in each would oversubscribe
the cores. Without threadpoolctl the product runs on the caller's thread alone and BLAS keeps
its own thread count. Products with kept weights keep BLAS's own thread count, which OpenBLAS
already chooses by size (docs/checkpoints.md, "Threads").
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from llama_np.weights import workers
from llama_np.weights.block_dots import DOT_ROWS, SCALED_ROWS
from llama_np.weights.codecs import CODECS, F16_EXPONENT_SCALE, sum_is_finite
from llama_np.weights.workers import one_blas_thread, product_workers, run_parallel

F16_SCALED_INPUT_LIMIT = 2.0**15  # see StreamedMatrix.product


_product_lock = threading.Lock()
_tile_buffers: dict = {}  # (worker, dtype) -> a tile buffer of a streamed product, for every matrix
tile_buffers_made = 0  # how many were ever allocated: one per worker, again only for a larger tile


def tile_buffer(worker: int, elements: int, dtype=np.float32) -> np.ndarray:
    """The tile buffer of a streamed product's ``worker``-th worker, of at least ``elements``."""
    global tile_buffers_made
    buffer = _tile_buffers.get((worker, np.dtype(dtype)))
    if buffer is None or buffer.size < elements:
        buffer = _tile_buffers[worker, np.dtype(dtype)] = np.empty(elements, dtype=dtype)
        tile_buffers_made += 1
    return buffer


class StreamedMatrix:
    """A (out, in) weight left as stored in the memory map and widened tile by tile where it is used.

    ``x @ W.T`` (layers.linear) is computed by ``W.T.__rmatmul__``: each worker widens a tile of
    W's rows into its own reused float32 buffer and writes those outputs. Anything else — an
    index, ``np.asarray``, ``reshape`` — widens what it needs into a new array: rows looked up
    from an embedding are the only rows widened.

    A NaN or inf among the values is a CheckpointError naming ``source`` (the tensor and its
    file), as for a kept weight: rows are checked the first time they are widened.
    """

    ndim = 2

    def __init__(self, stored: np.ndarray, storage_dtype: str, name: str = "", dtype=np.float32,
                 source: str = ""):
        codec = CODECS.get(storage_dtype)
        if codec is None or not codec.streamed or len(codec.logical_shape(stored)) != 2:
            streamed = ", ".join(name for name, codec in CODECS.items() if codec.streamed)
            raise ValueError(f"StreamedMatrix holds a 2-D tensor of {streamed}, not {storage_dtype} {stored.shape}")
        # (out, in) as stored: float16, or uint16 bfloat16 bits; or a block-quantised codec's
        # raw blocks, (out, in / block_size, block_bytes) uint8
        self.stored = stored
        self.storage_dtype = storage_dtype
        self.codec = codec
        self.name = name
        self.source = source or f"tensor {name!r}"
        self.dtype = np.dtype(dtype)
        self.shape = codec.logical_shape(stored)  # (out, in)
        self.T = TransposedStreamedMatrix(self)
        self._checked = np.zeros(self.shape[0], dtype=bool)  # rows found free of inf and NaN
        self._all_checked = False

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the widened matrix (what keeping it widened would cost)."""
        return self.size * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        value = self.refuse_non_finite(self.codec.decode(self.stored, self.dtype))
        return value if dtype is None else value.astype(dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple) and len(index) > 1:  # rows, then columns of the decoded rows
            return self[index[0]][(Ellipsis, *index[1:])]
        return self.refuse_non_finite(self.codec.decode(np.ascontiguousarray(self.stored[index]), self.dtype))

    def refuse_non_finite(self, widened: np.ndarray) -> np.ndarray:
        """``widened`` (some of this matrix's values) if finite, else the matrix's CheckpointError."""
        if not (self._all_checked or sum_is_finite(widened) or np.isfinite(widened).all()):
            raise self.codec.non_finite_error(self.stored, self.source)
        return widened

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def astype(self, dtype, copy=True) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def __repr__(self):
        return f"StreamedMatrix({self.name!r}, {self.storage_dtype}, shape={self.shape})"

    # -- the product

    def rows_per_tile(self) -> int:
        return max(1, workers.TILE_ELEMENTS // max(1, self.shape[1]))

    def product(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T.  x (..., in)  ->  (..., out), computed tile by tile over W's rows."""
        x = np.asarray(x)
        out_features, in_features = self.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"matmul: x has {x.shape[-1]} columns, {self.name or 'the weight'} "
                             f"expects {in_features} (W is {self.shape})")
        dtype = np.result_type(x.dtype, self.dtype)
        x2 = np.ascontiguousarray(x.reshape(math.prod(x.shape[:-1]), in_features), dtype=dtype)  # (M, in)
        # float16 tiles skip their last pass (times 2**112) when x can take it instead: then
        # (x · 2**112) · (w · 2**-112) is the same product x · w, rounded the same, as long as
        # x · 2**112 stays finite (|x| < 2**16) — so only below 2**15, to leave a margin.
        scaled = (self.codec.scales_through_x and dtype == np.float32 and x2.size > 0
                  and float(np.abs(x2).max()) < F16_SCALED_INPUT_LIMIT)
        if scaled:
            x2 = x2 * F16_EXPONENT_SCALE
        # A block-quantised W is multiplied without decoding it (weights/block_dots.py): one row of
        # x by each group's dots, a few rows by its integers times their scales in one BLAS call.
        dots = self.codec.dots if dtype == np.float32 and 0 < x2.shape[0] <= SCALED_ROWS else None
        if dots is not None:
            one_row = x2.shape[0] <= DOT_ROWS
            prepared = dots.prepare(x2) if one_row else dots.prepare_scaled(x2)
            multiply = dots.multiply if one_row else dots.multiply_scaled
        # W_tile @ xᵀ fills whole rows of yᵀ: one BLAS call per tile with a contiguous output,
        # several times faster here than x @ W_tileᵀ into a column block of y.
        y_t = np.empty((out_features, x2.shape[0]), dtype=dtype)  # (out, M)
        rows = self.rows_per_tile()
        workers = max(1, min(product_workers(), -(-out_features // rows)))
        # The workers share the tiles, each taking the next one when it is done with its last: a
        # worker slowed down (by another process, or BLAS's own threads still spinning after a
        # product) does fewer of them instead of keeping the other waiting. A worker that fails
        # (a NaN in the weights) stops the others too.
        tiles = iter(range(0, out_features, rows))
        tiles_lock = threading.Lock()
        failed = []

        def next_tile() -> int | None:
            with tiles_lock:
                return None if failed else next(tiles, None)

        def multiply_tiles(worker: int) -> None:
            if dots is not None:
                return multiply_quantised_tiles(worker)
            buffer = tile_buffer(worker, rows * in_features)
            try:
                while (start := next_tile()) is not None:
                    stop = min(start + rows, out_features)
                    tile = buffer[: (stop - start) * in_features].reshape(stop - start, in_features)
                    self.widen_rows(start, stop, tile, scaled)
                    if dtype == np.float32:
                        np.matmul(tile, x2.T, out=y_t[start:stop])
                    else:
                        y_t[start:stop] = tile.astype(dtype) @ x2.T
            except BaseException:
                failed.append(worker)
                raise

        def multiply_quantised_tiles(worker: int) -> None:
            tile_bytes = rows * self.stored[0].size
            integers, numbers = tile_buffer(worker, tile_bytes, np.uint8), tile_buffer(worker, tile_bytes)
            try:
                while (start := next_tile()) is not None:
                    stop = min(start + rows, out_features)
                    stored = self.stored[start:stop]
                    scale, offset = dots.scales(stored)
                    self.check_scales(start, stop, scale, offset)
                    y_t[start:stop] = multiply(stored, prepared, integers, numbers, scale, offset)
            except BaseException:
                failed.append(worker)
                raise

        tasks = [lambda worker=worker: multiply_tiles(worker) for worker in range(workers)]
        with _product_lock:  # one streamed product at a time: they share the tile buffers
            with one_blas_thread() if workers > 1 else contextlib.nullcontext():
                run_parallel(tasks)
        if not self._all_checked:
            self._all_checked = bool(self._checked.all())
        return np.ascontiguousarray(y_t.T).reshape(*x.shape[:-1], out_features)

    def check_scales(self, start: int, stop: int, scale: np.ndarray, offset: np.ndarray | None) -> None:
        """Rows start..stop multiplied without decoding: their numbers are finite when their
        scales and offsets are (the integers are small), checked the first time."""
        if self._all_checked or self._checked[start:stop].all():
            return
        if not (sum_is_finite(scale) and (offset is None or sum_is_finite(offset))):
            error = self.codec.non_finite_error(self.stored, self.source)
            if error is not None:
                raise error
        self._checked[start:stop] = True

    def widen_rows(self, start: int, stop: int, tile: np.ndarray, scaled: bool = False) -> None:
        """Rows start..stop of W into ``tile`` (float16 times 2**-112 if ``scaled``).

        The first time rows are widened they are checked for inf and NaN: a float16 tile by the
        range check of ``widen_into``, a bfloat16 one by its sum (inf and NaN stay themselves).
        """
        checked = self._all_checked or bool(self._checked[start:stop].all())
        special = self.codec.decode_rows(self.stored[start:stop], tile, check_special=not checked, scaled=scaled)
        if checked:
            return
        if special:  # a bfloat16 tile's sum may also overflow with finite values: counted exactly here
            error = self.codec.non_finite_error(self.stored, self.source)
            if error is not None:
                raise error
        self._checked[start:stop] = True


class TransposedStreamedMatrix:
    """``W.T`` of a StreamedMatrix: something ``x @`` can take, as in ``layers.linear``.

    ``__array_ufunc__ = None`` tells NumPy not to treat it as an array, so ``ndarray @ W.T``
    hands over to ``__rmatmul__``.
    """

    __array_ufunc__ = None
    ndim = 2

    def __init__(self, matrix: StreamedMatrix):
        self.matrix = matrix
        self.shape = matrix.shape[::-1]
        self.dtype = matrix.dtype

    @property
    def T(self) -> StreamedMatrix:
        return self.matrix

    def __rmatmul__(self, x) -> np.ndarray:
        return self.matrix.product(x)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.matrix, dtype=dtype).T



