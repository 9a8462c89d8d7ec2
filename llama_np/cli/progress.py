"""Progress on a terminal for passes that take seconds: a tqdm bar (``llama-np[fast]``) or a
counter line on stderr, shown only once the pass has run for a while.
"""

from __future__ import annotations

import sys
import time


PROGRESS_DELAY_SECONDS = 2.0  # a pass over the layers shows progress only once it has run this long


class LayerProgress:
    """``layer i/N`` on a terminal (stderr) for a pass over the layers that takes seconds.

    A pass that ends within PROGRESS_DELAY_SECONDS — a decoding step, a forward of a small model
    — prints nothing; a long one (the first widening of a big model, a long prefill of a
    streamed one) shows a bar from then on, a tqdm bar when tqdm is installed, and erases it at
    the last layer, so the line is clean before any text is printed after the pass. Nothing is
    printed when stderr is not a terminal. A model calls it as ``progress(index, count)``
    (``from_pretrained(..., progress=LayerProgress())``); ``generate`` holds it back while
    text streams.
    """

    def __init__(self):
        self.started = 0.0
        self.bar = None

    def __call__(self, index: int, count: int) -> None:
        """Decoder layer ``index`` of ``count`` is about to run."""
        if index == 0:
            self.close()
            self.started = time.perf_counter()
        if not sys.stderr.isatty():
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
