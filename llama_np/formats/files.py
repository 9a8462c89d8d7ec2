"""Reading files a model directory holds, and writing files whole or not at all.

``is_file``/``is_dir`` and the readers turn an unreadable path into one error naming it (the
caller's error type: CheckpointError, ConfigError, TokenizerError). Every file is opened with
``open_regular``: a FIFO, a device or a socket where a file was expected is refused before
anything waits on it, and the readers read at most ``MAX_READ_BYTES``. ``atomic_write`` writes
to a locked temporary file beside the target and renames it into place, so a crash, a full disk
or a second writer never leaves a half-written file; on Linux that file has no name until its
data is on disk, so a killed writer leaves nothing at all.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

from llama_np.errors import CheckpointError

# The most read_bytes and read_json_object read: side files (config.json, tokenizer.json,
# tokenizer.model, an index) are kilobytes to tens of megabytes.
MAX_READ_BYTES = 1024**3


try:  # POSIX: a writer holds a lock on its temporary file, so stale ones can be told apart
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def is_file(path, error: type[Exception] = CheckpointError) -> bool:
    """``Path.is_file``, except that when the answer cannot be known (a directory on the way that
    may not be searched) it is an ``error`` naming the path, not a bare PermissionError."""
    status = _status_or_none(path, error)
    return status is not None and stat.S_ISREG(status.st_mode)


def is_dir(path, error: type[Exception] = CheckpointError) -> bool:
    """``Path.is_dir``, with the same ``error`` as ``is_file`` when it cannot be known."""
    status = _status_or_none(path, error)
    return status is not None and stat.S_ISDIR(status.st_mode)


def _status_or_none(path, error: type[Exception]) -> os.stat_result | None:
    if "\0" in os.fspath(path):
        raise error(f"{os.fspath(path)!r} holds a NUL byte, which no file name can")
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as problem:
        raise error(f"cannot look for {path}: {problem.strerror or problem}") from None


def open_regular(path, error: type[Exception] = CheckpointError) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only; ``error`` naming the path otherwise.

    The file is opened without blocking and then asked what it is (``fstat`` of the open file,
    so it cannot be swapped in between): opening a FIFO for reading would wait for a writer for
    ever, and a device such as /dev/zero never ends.
    """
    if "\0" in os.fspath(path):
        raise error(f"{os.fspath(path)!r} holds a NUL byte, which no file name can")
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a file") from None
    except OSError as problem:
        raise error(f"cannot read {path}: {problem.strerror or problem}") from None
    try:
        mode = os.fstat(handle).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path} is {kind_of_file(mode)}; llama_np reads regular files only")
        if hasattr(os, "set_blocking"):
            os.set_blocking(handle, True)
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def kind_of_file(mode: int) -> str:
    """What a stat mode says a path is, for messages: "a file", "a FIFO (named pipe)", ..."""
    return ("a file" if stat.S_ISREG(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def read_bytes(path, error: type[Exception] = CheckpointError, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of a regular file, or ``error`` naming it if it cannot be read (no permission,
    a FIFO or device, more than ``max_bytes``)."""
    too_large = error(f"{path} is larger than the {max_bytes:,} bytes llama_np reads from such a file")
    with open_regular(path, error) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise too_large
            data = f.read(size)  # read(n) allocates n bytes first: the file's size, never the bound
            while len(data) <= max_bytes and (more := f.read(1)):  # it grew since fstat: read on
                data += more + f.read(min(16 * 1024**2, max_bytes - len(data)))
        except OSError as problem:
            raise error(f"cannot read {path}: {problem.strerror or problem}") from None
    if len(data) > max_bytes:
        raise too_large
    return data


def read_json_object(path, error: type[Exception] = CheckpointError) -> dict:
    """The JSON object in a file such as config.json; ``error`` naming the file if it is
    unreadable, not JSON, or not an object."""
    path = Path(path)
    try:
        value = json.loads(read_bytes(path, error).decode("utf-8"))
    except (ValueError, RecursionError) as problem:  # bad JSON or UTF-8; nested thousands deep
        raise error(f"{path} is not valid JSON: {problem}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write the chunks to ``path`` so that readers see the old file or the new, never half.

    On Linux the data goes to an anonymous file in ``path``'s directory (``O_TMPFILE``): nothing
    is in the directory while it is written, and a writer killed midway (SIGKILL, power loss)
    leaves nothing. Once the data is on disk the file is given a temporary name
    ``.<name>.<random>.tmp`` and at once renamed over ``path``. Where the system or filesystem
    has no anonymous files, the temporary file has its name from the start: a killed writer leaves
    it behind, and the next write of the same ``path`` removes those, and only those no live
    writer holds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = None
    handle = _anonymous_file(path.parent)
    if handle is None:
        handle, temporary = _locked_temporary(path)
    try:
        with os.fdopen(handle, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if temporary is None:
                temporary = _link_temporary(f.fileno(), path)
            else:  # mkstemp creates the file private (0600); give it the permissions open() would
                os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, path)  # while still locked, so no cleaner can take it
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _anonymous_file(directory: Path) -> int | None:
    """An open, locked file in ``directory`` with no name (Linux's ``O_TMPFILE``), or None where
    the system or the filesystem has none. Its mode is 0o666 less the umask, as open() gives."""
    if fcntl is None or not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        handle = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError as error:
        # EISDIR: a kernel older than O_TMPFILE; EOPNOTSUPP, EINVAL: a filesystem without it
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise
    fcntl.flock(handle, fcntl.LOCK_EX)  # so the name it gets is seen as a live writer's
    return handle


def _link_temporary(handle: int, path: Path) -> str:
    """Give the anonymous file ``handle`` a temporary name beside ``path``, to rename over it.

    Python's os.link calls linkat, which follows the /proc/self/fd link to the file itself, only
    when given a directory descriptor.
    """
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        while True:
            name = f".{path.name}.{secrets.token_hex(4)}.tmp"  # what _temporary_pattern matches
            try:
                os.link(f"/proc/self/fd/{handle}", name, dst_dir_fd=directory)
                return str(path.parent / name)
            except FileExistsError:
                continue
    finally:
        os.close(directory)


def _temporary_pattern(path: Path) -> re.Pattern:
    """The names our temporary files for ``path`` have (``tempfile.mkstemp``'s, or
    ``_link_temporary``'s): 8 random letters, digits or underscores between ``.<name>.`` and
    ``.tmp``."""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (an open descriptor and its name), locked.

    The lock (flock, released when the descriptor closes, also when the process is killed) is
    what tells a live writer's temporary file from a dead one's. Between mkstemp and flock
    another writer's cleanup may take the unlocked file; then it is no longer at its name, and
    we make another.
    """
    while True:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        if fcntl is None:
            return handle, temporary
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            still_ours = os.stat(temporary).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            still_ours = False
        if still_ours:
            return handle, temporary
        os.close(handle)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of earlier writes of ``path`` that no live writer holds."""
    if fcntl is None:  # without flock a live writer cannot be told from a dead one
        return
    pattern = _temporary_pattern(path)
    try:
        names = [name for name in os.listdir(path.parent) if pattern.fullmatch(name)]
    except OSError:
        return
    for name in names:
        candidate = path.parent / name
        try:
            handle = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # gone already, or not ours to open
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)  # a live writer holds it
            continue
        try:
            if os.stat(candidate).st_ino == os.fstat(handle).st_ino:
                candidate.unlink()
        except OSError:
            pass
        finally:
            os.close(handle)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    """Write a text file (UTF-8) atomically: a temp file in the same folder, then a rename."""
    atomic_write(Path(path), [text.encode("utf-8")])


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); platforms that cannot open a directory skip it."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
