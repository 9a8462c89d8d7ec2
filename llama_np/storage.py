"""Where the weights are while the model runs: widened once and kept, or streamed from the file.

A checkpoint stores its weights in float16 or bfloat16; the maths runs in float32. A weight can be
used in two ways, and ``pretrained.Weights`` picks one per tensor (docs/checkpoints.md):

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
row of W and the same x (summed by the same BLAS kernel, at most in another order).

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
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from llama_np.errors import CheckpointError

# Elements of W widened per tile: 2 MiB of float16 in, 4 MiB of float32 out, a few times the
# core's L2 but well inside the shared L3 when BLAS reads it. Measured here (docs/checkpoints.md),
# a 7B layer's matrix-vector products ran at 5.1 G elements/s with this tile, 4.0 with a quarter
# of it and 2.4 with a sixteenth: every tile costs a few NumPy calls of fixed overhead, during
# which the Python threads take turns; four times larger tiles no longer fit the L3 with the
# other core's and were slower again. For 8 and 128 rows of x this size was the fastest too.
TILE_ELEMENTS = 1024 * 1024

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
F16_SCALED_INPUT_LIMIT = 2.0**15  # see StreamedMatrix.product


# ---------------------------------------------------------------------------- threads


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_blas = None  # threadpoolctl.ThreadpoolController, made on first use, or False without it


def worker_pool() -> ThreadPoolExecutor:
    """A thread per core, shared by every widening and streamed product of the process."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="llama_np")
        return _pool


def blas_controller():
    """threadpoolctl's controller of the BLAS libraries NumPy loaded, or None without threadpoolctl."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController  # optional: llama-np[fast]
        except ImportError:
            _blas = False
        else:
            _blas = ThreadpoolController()
    return _blas or None


def product_workers() -> int:
    """How many threads a streamed product uses: every core with threadpoolctl, else one.

    Several Python threads each calling a multi-threaded BLAS would oversubscribe the cores, so
    without threadpoolctl to hold BLAS at one thread a product stays on the caller's thread.
    """
    return cpu_count() if blas_controller() is not None else 1


def one_blas_thread():
    """A context in which BLAS runs single-threaded (the caller's threads share the cores)."""
    return blas_controller().limit(limits=1, user_api="blas")


def run_parallel(tasks: list) -> list:
    """Call every task (a function of no arguments) at once, the first on the calling thread and the
    others on the worker pool; their results in order, once every task has ended."""
    futures = [worker_pool().submit(task) for task in tasks[1:]]
    try:
        first = tasks[0]()
    finally:
        wait(futures)  # even if the first task failed: the others may be using shared buffers
    return [first] + [future.result() for future in futures]


def split(count: int, parts: int) -> list[range]:
    """0..count in ``parts`` contiguous ranges of nearly equal size (empty ones dropped)."""
    bounds = [count * p // parts for p in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------- widening


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
        for start in range(part.start, part.stop, TILE_ELEMENTS):
            stop = min(start + TILE_ELEMENTS, part.stop)
            widen_into(flat_in[start:stop], storage_dtype, flat_out[start:stop])
            if what is not None:
                finite = finite and sum_is_finite(flat_out[start:stop])
        return finite

    parts = min(cpu_count(), -(-flat_in.size // TILE_ELEMENTS))  # a norm's few numbers: one part
    finite = run_parallel([lambda part=part: widen_part(part) for part in split(flat_in.size, parts)])
    if not all(finite):
        check_finite(out, what, dtype)  # a NaN or inf, or finite values whose sum overflowed
    return out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- finiteness


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
    rows = max(1, TILE_ELEMENTS // max(1, stored.shape[1]))
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


# ---------------------------------------------------------------------------- streamed weights


_product_lock = threading.Lock()
_tile_buffers: list = []  # one float32 buffer per worker of a streamed product, for every matrix
tile_buffers_made = 0  # how many were ever allocated: one per worker, again only for a larger tile


def tile_buffer(worker: int, elements: int) -> np.ndarray:
    """The float32 tile buffer of a streamed product's ``worker``-th worker, of at least ``elements``."""
    global tile_buffers_made
    while len(_tile_buffers) <= worker:
        _tile_buffers.append(None)
    buffer = _tile_buffers[worker]
    if buffer is None or buffer.size < elements:
        buffer = _tile_buffers[worker] = np.empty(elements, dtype=np.float32)
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
        if storage_dtype not in ("F16", "BF16") or stored.ndim != 2:
            raise ValueError(f"StreamedMatrix holds a 2-D F16 or BF16 tensor, not {storage_dtype} {stored.shape}")
        self.stored = stored  # (out, in) float16, or uint16 bfloat16 bits
        self.storage_dtype = storage_dtype
        self.name = name
        self.source = source or f"tensor {name!r}"
        self.dtype = np.dtype(dtype)
        self.shape = tuple(stored.shape)
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
        value = self.refuse_non_finite(widen(self.stored, self.storage_dtype, self.dtype))
        return value if dtype is None else value.astype(dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        return self.refuse_non_finite(widen(np.ascontiguousarray(self.stored[index]), self.storage_dtype,
                                            self.dtype))

    def refuse_non_finite(self, widened: np.ndarray) -> np.ndarray:
        """``widened`` (some of this matrix's values) if finite, else the matrix's CheckpointError."""
        if not (self._all_checked or sum_is_finite(widened) or np.isfinite(widened).all()):
            raise stored_non_finite_error(self.stored, self.storage_dtype, self.source)
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
        return max(1, TILE_ELEMENTS // max(1, self.shape[1]))

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
        scaled = (self.storage_dtype == "F16" and dtype == np.float32 and x2.size > 0
                  and float(np.abs(x2).max()) < F16_SCALED_INPUT_LIMIT)
        if scaled:
            x2 = x2 * F16_EXPONENT_SCALE
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

        tasks = [lambda worker=worker: multiply_tiles(worker) for worker in range(workers)]
        with _product_lock:  # one streamed product at a time: they share the tile buffers
            with one_blas_thread() if workers > 1 else contextlib.nullcontext():
                run_parallel(tasks)
        if not self._all_checked:
            self._all_checked = bool(self._checked.all())
        return np.ascontiguousarray(y_t.T).reshape(*x.shape[:-1], out_features)

    def widen_rows(self, start: int, stop: int, tile: np.ndarray, scaled: bool = False) -> None:
        """Rows start..stop of W into ``tile`` (float16 times 2**-112 if ``scaled``).

        The first time rows are widened they are checked for inf and NaN: a float16 tile by the
        range check of ``widen_into``, a bfloat16 one by its sum (inf and NaN stay themselves).
        """
        checked = self._all_checked or bool(self._checked[start:stop].all())
        special = widen_into(self.stored[start:stop], self.storage_dtype, tile, check_special=not checked,
                             scaled=scaled)
        if checked:
            return
        if self.storage_dtype == "BF16":
            special = not sum_is_finite(tile)  # a finite sum can overflow: counted exactly below
        if special:
            error = stored_non_finite_error(self.stored, self.storage_dtype, self.source)
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


# ---------------------------------------------------------------------------- progress


PROGRESS_DELAY_SECONDS = 2.0  # a pass over the layers shows progress only once it has run this long
_progress_paused = 0


@contextlib.contextmanager
def no_progress():
    """No progress line inside this block: generate() decodes in one, between streamed tokens."""
    global _progress_paused
    _progress_paused += 1
    try:
        yield
    finally:
        _progress_paused -= 1


class LayerProgress:
    """``layer i/N`` on a terminal (stderr) for a pass over the layers that takes seconds.

    A pass that ends within PROGRESS_DELAY_SECONDS — a decoding step, a forward of a small model
    — prints nothing; a long one (the first widening of a big model, a long prefill of a
    streamed one) shows a bar from then on, a tqdm bar when tqdm is installed, and erases it at
    the last layer, so the line is clean before any text is printed after the pass. Nothing is
    printed when stderr is not a terminal or inside ``no_progress()``.
    """

    def __init__(self):
        self.started = 0.0
        self.bar = None

    def step(self, index: int, count: int) -> None:
        """Decoder layer ``index`` of ``count`` is about to run."""
        if index == 0:
            self.close()
            self.started = time.perf_counter()
        if _progress_paused or not sys.stderr.isatty():
            self.close()
            return
        if self.bar is None and time.perf_counter() - self.started >= PROGRESS_DELAY_SECONDS:
            self.bar = progress_bar(count)
        if self.bar is not None:
            self.bar.update(index + 1)
        if index == count - 1:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_bar(total: int):
    """A bar on stderr with ``update(done)`` and ``close()`` (erasing it): tqdm's, else a counter."""
    try:
        from tqdm import tqdm  # optional: a bar when installed, else the counter below
    except ImportError:
        return CounterLine(total)
    return TqdmBar(tqdm(total=total, unit="layer", file=sys.stderr, leave=False))


class TqdmBar:
    def __init__(self, bar):
        self.tqdm = bar

    def update(self, done: int) -> None:
        self.tqdm.update(done - self.tqdm.n)

    def close(self) -> None:
        self.tqdm.close()


class CounterLine:
    def __init__(self, total: int):
        self.total = total

    def update(self, done: int) -> None:
        print(f"\rlayer {done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print("\r\033[K", end="", file=sys.stderr, flush=True)  # back to the line start, erase it
