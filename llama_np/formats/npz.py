"""Reading and writing .npz files of named arrays (reference logits, golden activations) that
may come from anywhere.

An .npz is a zip archive of ``NAME.npy`` members; each .npy is a header declaring a shape and a
dtype, then the raw data. ``np.load`` trusts that header and allocates what it declares before
reading a byte of data, so a few hundred bytes can ask for terabytes. ``read_npz`` checks every
member from its header alone before it reads any of them, and refuses:

- a member whose declared size differs from the bytes it holds (a forged or damaged header);
- arrays that together would take more than ``npz_size_limit()``, judged on their declared
  sizes, so a member that inflates from a few compressed bytes to terabytes (a deflate bomb)
  is never inflated;
- object arrays, which are stored as a pickle: loading one could run code (allow_pickle=False);
- encrypted members, members that are not .npy arrays, .npy format versions other than 1.0 and
  2.0, and a single .npy array renamed to .npz.

Each refusal is an ``InputError`` naming the file and the array. ``save_npz`` writes through
``atomic_write``, so a crash never leaves half a file.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from llama_np.errors import InputError
from llama_np.formats.files import atomic_write, open_regular
from llama_np.weights.memory import human_bytes, keep_widened_limit

NPY_MAGIC = b"\x93NUMPY"  # how an .npy file starts


def save_npz(path: Path, **arrays) -> None:
    """np.savez through ``atomic_write`` (a temporary file beside ``path``, then a rename)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, [buffer.getvalue()])


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (a zip archive of NAME.npy members), each checked before it
    is read.

    An .npy header declares a shape and a dtype, and NumPy allocates that much before it reads
    any data: a 200-byte file declaring (1, 3, 2**40) would ask for terabytes. So each member's
    declared size must equal the bytes it holds (the zip's uncompressed size, ``file_size``),
    and all the arrays together must fit in ``npz_size_limit()`` -- a member that inflates from
    a few bytes to terabytes (a deflate bomb) is refused on its declared size, before reading.
    Pickled object arrays are refused (allow_pickle=False): loading one could run code.
    """
    if not path.exists():
        raise InputError(f"{path} does not exist")
    with open_regular(path, InputError) as f:  # a FIFO or a device is refused, not waited on
        if not zipfile.is_zipfile(f):
            f.seek(0)
            if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
                raise InputError(f"{path} holds a single array, not an .npz archive of named arrays")
            raise InputError(f"{path} is not an .npz file: an .npz is a zip archive of .npy arrays, and this "
                             "file is not a zip archive")
        return _read_npz_archive(path, f)


def _read_npz_archive(path: Path, f) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(f) as archive:
            sizes = {info.filename: npy_member_size(path, archive, info) for info in archive.infolist()}
            total, limit = sum(sizes.values()), npz_size_limit()
            if total > limit:
                largest = max(sizes, key=sizes.get)
                raise InputError(f"{path}: its arrays would take {human_bytes(total)} in memory (the largest, "
                                 f"{largest.removesuffix('.npy')}, {human_bytes(sizes[largest])}), more than "
                                 f"the {human_bytes(limit)} read from one file (half the memory available "
                                 "now, at least 2 GiB)")
            arrays = {}
            for member in sizes:
                with archive.open(member) as f:
                    arrays[member.removesuffix(".npy")] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except InputError:
        raise
    except (ValueError, OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as error:
        raise InputError(f"{path} is not a readable .npz file: {error}") from None


def npz_size_limit() -> int:
    """The most bytes read_npz loads from one file: half the memory available now, at least
    2 GiB -- the rule that decides whether widened weights are kept (``keep_widened_limit``)."""
    return keep_widened_limit()


def npy_member_size(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The bytes one .npz member's array takes, from its .npy header alone; InputError naming
    the file and the array when the header is unreadable, asks for a pickle, or declares more
    (or less) data than the member holds."""
    name = info.filename.removesuffix(".npy")
    if not info.filename.endswith(".npy"):
        raise InputError(f"{path}: member {info.filename} is not an .npy array (an .npz holds NAME.npy members)")
    if info.flag_bits & 0x1:
        raise InputError(f"{path}: array {name} is encrypted")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise InputError(f"{path}: array {name} is in .npy format version {version[0]}.{version[1]}; "
                                 "only 1.0 and 2.0 are read (3.0 only adds Unicode field names)")
            shape, _, dtype = readers[version](f)
        except InputError:
            raise
        except ValueError as error:
            raise InputError(f"{path}: array {name} has no readable .npy header: {error}") from None
        header_bytes = f.tell()
    if any(n < 0 for n in shape):
        raise InputError(f"{path}: array {name} declares a negative size in its shape {shape}")
    if dtype.hasobject:
        raise InputError(f"{path}: array {name} holds Python objects, stored as a pickle; refused, since "
                         "loading a pickle can run code (allow_pickle=False)")
    declared = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_bytes
    if declared != held:
        raise InputError(f"{path}: array {name} declares shape {shape} {dtype} ({human_bytes(declared)}) but "
                         f"holds {held:,} bytes of data; the file is damaged or was not written by NumPy")
    return max(declared, math.prod(shape))  # a zero-size dtype still costs per element

