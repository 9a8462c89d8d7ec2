"""The threads that widen weights and run streamed products: one worker per core, shared by
the process, and BLAS held at one thread while they run (threadpoolctl, ``llama-np[fast]``).
"""

from __future__ import annotations
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

# Elements of W widened per tile: 2 MiB of float16 in, 4 MiB of float32 out, a few times the
# core's L2 but well inside the shared L3 when BLAS reads it. Measured here (docs/checkpoints.md),
# a 7B layer's matrix-vector products ran at 5.1 G elements/s with this tile, 4.0 with a quarter
# of it and 2.4 with a sixteenth: every tile costs a few NumPy calls of fixed overhead, during
# which the Python threads take turns; four times larger tiles no longer fit the L3 with the
# other core's and were slower again. For 8 and 128 rows of x this size was the fastest too.
TILE_ELEMENTS = 1024 * 1024


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


# Products with weights below this many elements run on one BLAS thread. Measured here with the
# bundled model (256 x 688 matrices), a 128-token forward took 22-30 ms on one thread and 92-105
# ms on two while the other core was busy: OpenBLAS's second thread spins waiting for a core, and
# at these sizes it saved nothing on a quiet machine either (0.99x at 288 x 288). From TinyLlama's
# shapes up (2048 x 5632) two threads take 0.47-0.67x the time (docs/checkpoints.md).
SMALL_PRODUCT_ELEMENTS = 1024 * 1024


def blas_threads_for(largest_matrix_elements: int):
    """The BLAS thread policy of a forward pass whose largest weight has this many elements: one
    thread for small products, BLAS's own choice for large ones."""
    if largest_matrix_elements < SMALL_PRODUCT_ELEMENTS and blas_controller() is not None:
        return one_blas_thread()
    return contextlib.nullcontext()


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
