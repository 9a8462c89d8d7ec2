"""How much memory there is, and how much of it widened weights may take.
"""

from __future__ import annotations

from llama_np.errors import InputError


# The least memory for widened weights that from_pretrained keeps by default (see keep_widened_limit).
KEEP_WIDENED_FLOOR = 2 * 1024**3


def keep_widened_limit() -> int:
    """Up to how many bytes of widened (float32) weights ``from_pretrained`` keeps by default.

    Half the memory available right now (Linux's MemAvailable), and never less than 2 GiB: a
    1.1B TinyLlama (4.4 GB in float32) then runs at full speed on a 16 GB laptop, while a 7B
    float16 checkpoint (27 GB in float32) streams its matrices from the file instead.
    """
    available = available_memory()
    return KEEP_WIDENED_FLOOR if available is None else max(KEEP_WIDENED_FLOOR, available // 2)


def streamed_widened_budget(stored_bytes: int) -> int:
    """How many bytes of widened weights a model that streams the rest keeps by default.

    Its streamed weights are read from the memory-mapped file on every forward, so the file
    (``stored_bytes``) should stay in the page cache: the budget is what is left of the
    available memory after the file and a 2 GiB margin for activations, and at most 2 GiB — a
    kept float32 weight is read at memory speed, a streamed one at widening speed, but for a 7B
    model every further GiB saves only a few percent of a token's time (docs/checkpoints.md).
    """
    available = available_memory()
    if available is None:
        return 0
    return int(min(KEEP_WIDENED_FLOOR, max(0, available - stored_bytes - KEEP_WIDENED_FLOOR)))


def available_memory() -> int | None:
    """Bytes of memory available right now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(needed: int, what: str, advice: str) -> None:
    """Refuse work whose arrays cannot fit in the memory available now, before allocating them.

    An InputError giving the bytes beats a MemoryError half-way through (or the kernel's
    out-of-memory killer). ``what`` says what needs the memory, ``advice`` what to do instead.
    """
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(f"{what} needs about {needed / 2**30:,.1f} GiB; {available / 2**30:.1f} GiB "
                         f"are available. {advice}")


def human_bytes(count: float) -> str:
    """A byte count as people read it: '512 B', '7.2 MiB', '12.0 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
