"""How much memory there is, and how much of it widened weights may take.

"Available" is the least of what the machine has free (Linux's MemAvailable), what the
process's address-space limit leaves (``ulimit -v``, RLIMIT_AS, against the address space it
already holds) and what its control group may still take (a container's ``memory.max`` against
``memory.current``, or cgroup v1's limit and usage).
"""

from __future__ import annotations

import functools
from pathlib import Path

from llama_np.errors import InputError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # which groups this process is in


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
    """Bytes of memory this process may still use right now, or None where nothing is known:
    the least of the machine's MemAvailable, the room under RLIMIT_AS and the cgroup's room."""
    known = [room for room in (machine_available(), address_space_room(), cgroup_room()) if room is not None]
    return min(known) if known else None


def machine_available() -> int | None:
    """Linux's MemAvailable (/proc/meminfo), in bytes."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def address_space_room() -> int | None:
    """What RLIMIT_AS (``ulimit -v``) leaves beyond the address space already in use (VmSize),
    or None without a limit. Every allocation counts against it, mapped files included."""
    try:
        import resource  # POSIX only: without it there is no limit to read
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _proc_kib("/proc/self/status", "VmSize") or 0
    return max(0, soft - used)


def cgroup_room() -> int | None:
    """What the process's control group, or any group above it, may still take (cgroup v2
    memory.max − memory.current, v1 memory.limit_in_bytes − memory.usage_in_bytes), or None
    without a limit."""
    rooms = []
    for limit_file, usage_file in _cgroup_limit_files(CGROUP_ROOT, PROC_CGROUP):
        limit = _read_number(limit_file)
        if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
            rooms.append(max(0, limit - (_read_number(usage_file) or 0)))
    return min(rooms) if rooms else None


@functools.lru_cache(maxsize=4)
def _cgroup_limit_files(cgroup_root: Path, proc_cgroup: Path) -> tuple[tuple[Path, Path], ...]:
    """(limit file, usage file) of the process's memory cgroups and every group above them that
    has one: found once (the forward's memory check asks on every call), read each time."""
    files = []
    for directory, root, limit_name, usage_name in _cgroup_directories(cgroup_root, proc_cgroup):
        while True:
            if (directory / limit_name).is_file():
                files.append((directory / limit_name, directory / usage_name))
            if directory == root or root not in directory.parents:
                break
            directory = directory.parent
    return tuple(files)


def _cgroup_directories(cgroup_root: Path, proc_cgroup: Path):
    """(the process's memory cgroup directory, its hierarchy's root, limit file, usage file)
    for each hierarchy in /proc/self/cgroup: v2's "0::/path", v1's "N:...memory...:/path"."""
    try:
        text = proc_cgroup.read_text(encoding="ascii", errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":
            for root in (cgroup_root, cgroup_root / "unified"):
                found.append((root / relative, root, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            root = cgroup_root / "memory"
            found.append((root / relative, root, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    return found


def _read_number(path: Path) -> int | None:
    """The integer in a cgroup file, or None if it is absent, "max" or unreadable."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _proc_kib(path: str, field: str) -> int | None:
    """A "Field:  1234 kB" line of a /proc file, in bytes."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(field + ":"):
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
                         f"are available to this process. {advice}")


def human_bytes(count: float) -> str:
    """A byte count as people read it: '512 B', '7.2 MiB', '12.0 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
