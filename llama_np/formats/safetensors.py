"""Reading and writing Llama weights stored as safetensors (docs/reference.md §2).

A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes; offsets count from the end of the header.

Opening a checkpoint reads and validates the headers only: the ``safetensors`` library checks
each one first, then the checks below (which name the tensor and what is wrong). Each file is
memory-mapped once, the first time one of its tensors is used, and every tensor is a view into
that mapping, so a 13 GB float16 checkpoint opens in moments and a weight is widened to the
compute dtype only when a layer asks for it.

A mapped file must not change while it is in use: reading a page of a file that shrank since it
was mapped kills the process with SIGBUS, with no Python exception to catch. So every read
re-checks the file first (``Checkpoint.check_unchanged``), and a widened tensor that holds NaN or
inf is refused rather than turned into NaN logits.

Pickled PyTorch weights (``pytorch_model.bin``, ``consolidated.00.pth``) are never unpickled:
unpickling a file can run arbitrary code. ``torch_pickle.py`` reads their tensors without running
the pickle, into the same StoredTensor objects.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import numpy as np
from safetensors import safe_open

from llama_np.errors import CheckpointError
from llama_np.formats.files import atomic_write, is_dir, is_file, open_regular, read_json_object
from llama_np.weights.codecs import BF16, CODECS, COMPUTE_DTYPES, codec_for_numpy


SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are kilobytes; more means a corrupt length
# Llama's tensors have one or two dimensions and at most a few billion elements (a 256k x 16k
# embedding). A header declaring more is corrupt or hostile, even for an empty tensor: NumPy
# cannot even describe a shape such as (0, 2**70).
MAX_TENSOR_RANK = 32  # NumPy 1.x's limit
MAX_TENSOR_ELEMENTS = 2**40  # the product of the dimensions, counting a 0 as 1
MAX_TENSORS = 100_000  # per file: a 100 MB header of a million empty tensors took a minute to check
IGNORED_TENSOR_SUFFIX = "rotary_emb.inv_freq"  # a buffer old conversions saved; recomputed

PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl")


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it.

    ``start`` and ``stop`` are absolute byte positions in the file (the header's data_offsets
    plus 8 + N), so ``file_bytes[start:stop]`` are the tensor's bytes.
    """

    name: str
    dtype: str  # a name of weights.codecs.CODECS
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of one safetensors file without touching its tensor bytes.

    Returns ``(tensors, metadata)``: ``tensors`` maps each tensor name to a TensorInfo whose byte
    range lies inside the file and overlaps no other tensor's; ``metadata`` is the optional
    ``__metadata__`` dict of str -> str (empty when absent).

    Every problem is a CheckpointError naming the file and what is wrong, so a corrupt file can
    never cause an out-of-bounds read later.
    """
    tensors, metadata, _ = _read_header(Path(path))
    return tensors, metadata


class FileIdentity(NamedTuple):
    """What tells one state of a file from another: replaced (device, inode), resized, rewritten."""

    device: int
    inode: int
    size: int
    modified_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> "FileIdentity":
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], FileIdentity]:
    """read_safetensors_header, plus the identity of the file whose header was read.

    The safetensors library (the format's own, maintained parser) validates the file first. When
    it refuses one, the checks here usually say more exactly what is wrong, naming the tensor;
    when they find nothing, its message is the error.
    """
    header_bytes, identity = _read_header_bytes(path)  # first: a FIFO or device is refused here
    # Counted before any per-tensor work, parsing included: every entry names its data_offsets.
    declared = header_bytes.count(b'"data_offsets"')
    header = _parse_header_json(path, header_bytes) if declared <= MAX_TENSORS else {}
    declared = max(declared, len(header) - ("__metadata__" in header))
    if declared > MAX_TENSORS:
        raise CheckpointError(f"{path} declares {declared:,} tensors; a checkpoint file holds at most "
                              f"{MAX_TENSORS:,} (a 405B Llama has about 1,100), so the header is corrupt")
    library_problem = _safetensors_library_problem(path)
    metadata = _validate_metadata(path, header.pop("__metadata__", {}))
    data_start = HEADER_LENGTH_BYTES + len(header_bytes)
    data_size = identity.size - data_start
    tensors = {
        name: _validate_entry(path, name, entry, data_start, data_size)
        for name, entry in header.items()
    }
    _check_no_overlaps(path, tensors.values())
    if library_problem is not None:
        raise CheckpointError(f"{path} is not a valid safetensors file: {library_problem}")
    return tensors, metadata, identity


def _safetensors_library_problem(path: Path) -> str | None:
    """What ``safetensors.safe_open`` finds wrong with the file's header, or None if nothing.

    It checks, among other things, that the tensors cover the data section without holes, as the
    format requires. Only the header is parsed; no tensor is read.
    """
    try:
        with safe_open(path, framework="numpy"):
            return None
    except Exception as error:  # SafetensorError, or OSError for a file it cannot open
        return str(error)


def _read_header_bytes(path: Path) -> tuple[bytes, FileIdentity]:
    """The N JSON bytes after the 8-byte length, and the identity of the file they came from."""
    try:
        with open_regular(path) as f:
            identity = FileIdentity.of(os.fstat(f.fileno()))
            file_size = identity.size
            if file_size < HEADER_LENGTH_BYTES:
                raise CheckpointError(
                    f"{path} is {file_size} bytes long; a safetensors file starts with an "
                    f"{HEADER_LENGTH_BYTES}-byte header length, so the file is truncated or not "
                    "safetensors"
                )
            (header_length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
            if header_length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path} declares a {header_length}-byte header, more than the "
                    f"{MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors"
                )
            if HEADER_LENGTH_BYTES + header_length > file_size:
                raise CheckpointError(
                    f"{path} declares a {header_length}-byte header but the file is only "
                    f"{file_size} bytes long; the file is truncated"
                )
            header_bytes = f.read(header_length)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if len(header_bytes) != header_length:  # the file shrank while we read it
        raise CheckpointError(f"{path} changed while its header was read; try again")
    return header_bytes, identity


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a name given twice would silently keep only one of the two tensors."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _parse_header_json(path: Path, header_bytes: bytes) -> dict:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"the header of {path} is not valid UTF-8: {error}") from error
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as error:  # RecursionError: nested thousands deep
        raise CheckpointError(f"the header of {path} is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"the header of {path} is a JSON {type(header).__name__}; expected an object "
            "mapping tensor names to {dtype, shape, data_offsets}"
        )
    return header


def _validate_metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise CheckpointError(
            f"__metadata__ in {path} must be an object of string keys and string values; "
            f"got {metadata!r}"
        )
    return metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_entry(
    path: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    """Check one header entry against the format and the data section of ``data_size`` bytes."""
    where = f"tensor {name!r} in {path}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(
            f"{where} is described by {entry!r}; expected an object with dtype, shape and "
            "data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in CODECS:
        raise CheckpointError(
            f"{where} has dtype {dtype!r}; llama_np reads {', '.join(CODECS)} "
            "(integer, quantized and float8 weights are not supported)"
        )
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(
            f"{where} has shape {shape!r:.200}; expected a list of non-negative ints"
        )
    if len(shape) > MAX_TENSOR_RANK or math.prod(max(n, 1) for n in shape) > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(
            f"{where} has shape {shape!r:.200}; a tensor may have at most {MAX_TENSOR_RANK} "
            f"dimensions and {MAX_TENSOR_ELEMENTS} elements (a dimension of 0 counted as 1), so "
            "the header is corrupt"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(
            f"{where} has data_offsets {offsets!r}; expected two ints [begin, end]"
        )
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where} has data_offsets [{begin}, {end}], outside the data section of "
            f"{data_size} bytes (0 <= begin <= end <= {data_size}); the file is truncated or "
            "corrupt"
        )
    expected_bytes = CODECS[dtype].nbytes(shape)
    if end - begin != expected_bytes:
        raise CheckpointError(
            f"{where} has shape {tuple(shape)} of {dtype} ({expected_bytes} bytes) but its "
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlaps(path: Path, tensors: Iterable[TensorInfo]) -> None:
    """Sorted by start, each non-empty byte range must begin where the previous ones ended."""
    previous = None
    for tensor in sorted((t for t in tensors if t.nbytes > 0), key=lambda t: (t.start, t.stop)):
        if previous is not None and tensor.start < previous.stop:
            raise CheckpointError(
                f"tensors {previous.name!r} and {tensor.name!r} in {path} overlap: their "
                "data_offsets share bytes; the file is corrupt"
            )
        if previous is None or tensor.stop > previous.stop:
            previous = tensor


# --------------------------------------------------------------------------------------------
# Memory-mapped tensors
# --------------------------------------------------------------------------------------------


class _MappedFile:
    """One safetensors file, memory-mapped read-only the first time any tensor in it is used."""

    def __init__(self, path: Path, identity: FileIdentity):
        self.path = path
        self.identity = identity  # when the header was read; the mapping must be of this file
        self.finite: set[tuple[str, np.dtype]] = set()  # (tensor, compute dtype) checked finite
        self._bytes: np.ndarray | None = None

    def check_unchanged(self) -> None:
        """CheckpointError unless the file is still the one whose header was read.

        A read of the mapping past the end of a file that has since shrunk (a re-download in
        place, a full disk) is a SIGBUS that kills the process; a rewritten or replaced file
        would give other numbers than its header promised. One os.stat, so cheap enough before
        every read.
        """
        try:
            now = FileIdentity.of(os.stat(self.path))
        except OSError as error:
            raise CheckpointError(
                f"{self.path} changed since it was opened: it cannot be found any more "
                f"({error.strerror or error}); open the checkpoint again"
            ) from None
        if now != self.identity:
            raise _changed_since_opened(self.path, self.identity, now)

    @property
    def bytes(self) -> np.ndarray:
        """The whole file as a read-only uint8 array, shape (file size,), checked unchanged."""
        self.check_unchanged()
        if self._bytes is None:
            self._bytes = self._map()
        return self._bytes

    def _map(self) -> np.ndarray:
        try:
            with open_regular(self.path) as f:
                now = FileIdentity.of(os.fstat(f.fileno()))
                if now != self.identity:  # replaced between the os.stat above and this open
                    raise _changed_since_opened(self.path, self.identity, now)
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise CheckpointError(
                f"cannot memory-map {self.path}: {error.strerror or error}"
            ) from None
        return np.frombuffer(mapping, dtype=np.uint8)


def _changed_since_opened(path: Path, before: FileIdentity, now: FileIdentity) -> CheckpointError:
    if (now.device, now.inode) != (before.device, before.inode):
        what = "another file has replaced it"
    elif now.size != before.size:
        what = f"its size went from {before.size} to {now.size} bytes"
    else:
        what = "it was rewritten (its modification time changed)"
    return CheckpointError(
        f"{path} changed since it was opened: {what}. Its tensors cannot be read safely any "
        "more; open the checkpoint again"
    )


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of one safetensors file, read from the file's memory mapping when asked for."""

    name: str
    file: Path
    dtype: str  # storage dtype, a name of weights.codecs.CODECS
    shape: tuple[int, ...]
    _mapped: _MappedFile = field(repr=False, compare=False)
    _start: int = field(repr=False)
    _stop: int = field(repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self._stop - self._start

    def stored(self) -> np.ndarray:
        """The tensor exactly as stored, a read-only view of the mapping (``Codec.view``).

        For the float codecs its shape is ``self.shape``; BF16 comes back as its uint16 bit
        pattern, since NumPy has no bfloat16. The file is checked unchanged first
        (CheckpointError otherwise).
        """
        raw = self._mapped.bytes[self._start : self._stop] if self.nbytes else np.empty(0, np.uint8)
        return CODECS[self.dtype].view(raw, self.shape)

    def numpy(self, dtype=np.float32) -> np.ndarray:
        """The tensor widened to the compute dtype (float32 or float64), shape ``self.shape``.

        When the stored dtype already is the compute dtype (F32 -> float32) this is the
        read-only memory-mapped view itself, no copy; otherwise a new array. A NaN or inf
        among the values is a CheckpointError: one such weight makes every logit NaN.
        """
        compute = np.dtype(dtype)
        if compute not in COMPUTE_DTYPES:
            raise CheckpointError(
                f"cannot read {self.name!r} as {compute}; the compute dtype is float32 or float64"
            )
        stored = self.stored()
        # Checked once per tensor and dtype: check_unchanged guarantees the bytes are the same later.
        unchecked = (self.name, compute) not in self._mapped.finite
        what = f"tensor {self.name!r} in {self.file}"
        widened = CODECS[self.dtype].decode(stored, compute, what if unchecked else None)
        self._mapped.finite.add((self.name, compute))
        return widened


# --------------------------------------------------------------------------------------------
# A checkpoint directory
# --------------------------------------------------------------------------------------------


class Checkpoint:
    """All tensors of one checkpoint (one file or shards with an index), headers read, data mapped.

    Attributes:
        directory: where the weights were found.
        files: the safetensors files, in the order first used.
        tensors: tensor name -> StoredTensor.
        layout: which layout the files are in, for people (``llama-np inspect`` prints it).
    """

    layout = "Hugging Face (safetensors)"  # torch_pickle.py and meta.py open the other two

    def __init__(self, directory: Path, files: list[Path], tensors: dict[str, StoredTensor]):
        self.directory = directory
        self.files = files
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open ``model.safetensors`` or the shards of ``model.safetensors.index.json``.

        ``path`` is a model directory, or a single ``.safetensors`` file. Only headers are read.
        """
        path = Path(path)
        if is_file(path) and path.suffix == ".safetensors":
            return cls._open_files(path.parent, {path: None})
        if is_file(path):
            raise CheckpointError(
                f"{path} is neither a checkpoint directory nor a .safetensors file"
            )
        if not is_dir(path):
            raise CheckpointError(
                f"checkpoint directory {path} does not exist; expected a directory holding "
                f"{SINGLE_FILE_NAME} or {INDEX_FILE_NAME}"
            )
        if is_file(path / SINGLE_FILE_NAME):
            return cls._open_files(path, {path / SINGLE_FILE_NAME: None})
        if is_file(path / INDEX_FILE_NAME):
            return cls._open_files(path, _read_index(path / INDEX_FILE_NAME))
        raise _no_weights_error(path)

    @classmethod
    def _open_files(cls, directory: Path, shards: dict[Path, list[str] | None]) -> "Checkpoint":
        """Read each file's header once. ``shards`` maps a file to the tensor names the index
        places in it, or to None to take every tensor in the file."""
        tensors: dict[str, StoredTensor] = {}
        for file, wanted in shards.items():
            infos, _, identity = _read_header(file)
            mapped = _MappedFile(file, identity)
            if wanted is not None:
                _check_shard_matches_index(directory, file, infos, wanted)
                infos = {name: infos[name] for name in wanted}
            for info in infos.values():
                tensors[info.name] = StoredTensor(
                    info.name, file, info.dtype, info.shape, mapped, info.start, info.stop
                )
        return cls(directory, list(shards), tensors)

    def check_unchanged(self) -> None:
        """CheckpointError if a file of this checkpoint changed since it was opened.

        ``StoredTensor.numpy()`` checks before each read, but the float32 arrays it returned
        for F32 tensors are views of the memory mapping: whoever keeps them (a model keeping its
        widened weights) must call this before using them again, since reading a mapping of a
        file that shrank kills the process (SIGBUS). One os.stat per file.
        """
        for mapped in {id(t._mapped): t._mapped for t in self.tensors.values()}.values():
            mapped.check_unchanged()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> StoredTensor:
        if name not in self.tensors:
            close = difflib.get_close_matches(name, self.tensors, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CheckpointError(
                f"the checkpoint in {self.directory} has no tensor {name!r} "
                f"({len(self.tensors)} tensors){hint}"
            )
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def storage_dtypes(self) -> set[str]:
        """The stored dtypes present, e.g. {F16} for a Llama 2 hub checkpoint (names of CODECS)."""
        return {tensor.dtype for tensor in self.tensors.values()}

    @property
    def nbytes(self) -> int:
        """Bytes the tensors occupy on disk (headers not counted)."""
        return sum(tensor.nbytes for tensor in self.tensors.values())

    def check_shapes(
        self, expected: Mapping[str, tuple[int, ...]], optional: Iterable[str] = ()
    ) -> None:
        """Compare tensor names and shapes with those the config implies.

        Missing tensors and wrong shapes are one CheckpointError listing every problem;
        tensors nobody expects are one warning. Names in ``optional`` may be absent (lm_head
        with tied embeddings); ``...rotary_emb.inv_freq`` buffers are ignored.
        """
        optional = set(optional)
        present = {name for name in self.tensors if not name.endswith(IGNORED_TENSOR_SUFFIX)}
        missing = [name for name in expected if name not in present and name not in optional]
        wrong = [
            f"{name} has shape {self.tensors[name].shape}; the config expects {tuple(shape)}"
            for name, shape in expected.items()
            if name in present and self.tensors[name].shape != tuple(shape)
        ]
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} tensors the config expects are missing: {', '.join(missing)}"
            )
        problems.extend(wrong)
        if problems:
            raise CheckpointError(
                f"the checkpoint in {self.directory} does not match its config:\n  "
                + "\n  ".join(problems)
            )
        unexpected = sorted(present - expected.keys() - optional)
        if unexpected:
            warnings.warn(
                f"the checkpoint in {self.directory} has {len(unexpected)} tensors the config "
                f"does not use, ignored: {', '.join(unexpected)}",
                stacklevel=2,
            )


def _read_index(index_path: Path) -> dict[Path, list[str]]:
    """model.safetensors.index.json -> {shard file: tensor names the index places in it}."""
    directory = index_path.parent
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path} has no usable weight_map; expected "
            '{"weight_map": {"tensor name": "shard file name", ...}}'
        )
    shards: dict[Path, list[str]] = {}
    for name, file_name in weight_map.items():
        shard = directory / file_name
        # Shards live next to the index; a name that climbs out of the directory is not a shard.
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise CheckpointError(
                f"{index_path} places {name!r} in {file_name!r}, outside {directory}"
            )
        shards.setdefault(shard, []).append(name)
    absent = [shard.name for shard in shards if not is_file(shard)]
    if absent:
        raise CheckpointError(
            f"{index_path} names shard files that are not in {directory}: {', '.join(absent)}"
        )
    return shards


def _check_shard_matches_index(
    directory: Path, shard: Path, infos: dict[str, TensorInfo], wanted: list[str]
) -> None:
    """Every tensor the index places in ``shard`` must be there; extras there are only odd."""
    absent = [name for name in wanted if name not in infos]
    if absent:
        raise CheckpointError(
            f"{directory / INDEX_FILE_NAME} places these tensors in {shard.name}, which does not "
            f"contain them: {', '.join(absent)}"
        )
    unlisted = sorted(infos.keys() - set(wanted))
    if unlisted:
        warnings.warn(
            f"{shard} holds tensors that {INDEX_FILE_NAME} does not list, ignored: "
            f"{', '.join(unlisted)}",
            stacklevel=4,
        )


def _no_weights_error(directory: Path) -> CheckpointError:
    """The error for a directory without safetensors weights, saying what is there instead."""
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
    if pickles:
        return CheckpointError(
            f"{directory} has only PyTorch pickle weights ({', '.join(pickles)}). llama_np never "
            "unpickles a file, because unpickling can run arbitrary code; it reads the tensors of "
            "two pickled layouts without running the pickle (llama_np.formats.torch_pickle): "
            "pytorch_model.bin (or its index) beside config.json, and Meta's consolidated.NN.pth "
            "beside params.json, through from_pretrained or --model. Convert other pickles once, "
            "in an environment you trust: load the model with Transformers and call "
            "model.save_pretrained(directory, safe_serialization=True), or write the state dict "
            "with safetensors.torch.save_file(state_dict, 'model.safetensors'). Meta's "
            "consolidated.NN.pth files convert with llama-np convert."
        )
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f"; found {', '.join(others)}: pass that file's path to open it" if others else ""
    return CheckpointError(
        f"no weights in {directory}: looked for {SINGLE_FILE_NAME} or {INDEX_FILE_NAME}, "
        f"pytorch_model.bin or its index, and Meta's consolidated.NN.pth beside params.json{hint}"
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    bf16: bool = False,
) -> None:
    """Write ``tensors`` (name -> float64/float32/float16 array) as one safetensors file.

    With ``bf16=True`` every float32 array is stored as BF16 (rounded to nearest even); other
    arrays keep their dtype. The file appears complete or not at all: it is written to a
    temporary file in the same directory, flushed to disk, then renamed over ``path``.
    """
    path = Path(path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"metadata for {path} must map strings to strings")
    dtypes = {name: _saved_dtype(path, name, array, bf16) for name, array in tensors.items()}
    # Widest dtype first, then by name, like the safetensors library: with the data section
    # starting 8-byte aligned, every tensor then starts aligned to its own item size.
    order = sorted(tensors, key=lambda name: (-CODECS[dtypes[name]].stored_dtype.itemsize, name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        nbytes = CODECS[dtypes[name]].nbytes(np.shape(tensors[name]))
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(np.shape(tensors[name])),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    data = (_stored_bytes(tensors[name], dtypes[name]) for name in order)
    atomic_write(path, itertools.chain([_encode_header(header)], data))


def _saved_dtype(path: Path, name: object, array: np.ndarray, bf16: bool) -> str:
    if not isinstance(name, str) or name == "__metadata__":
        raise CheckpointError(f"cannot save a tensor named {name!r} in {path}")
    dtype = np.asarray(array).dtype
    codec = codec_for_numpy(dtype)
    if codec is None:
        raise CheckpointError(
            f"cannot save {name!r} of dtype {dtype} in {path}; expected float64, float32 or "
            "float16"
        )
    return BF16.name if bf16 and dtype == np.float32 else codec.name


def _encode_header(header: dict) -> bytes:
    """8-byte little-endian length + JSON padded with spaces to a multiple of 8 bytes."""
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _stored_bytes(array: np.ndarray, dtype: str) -> np.ndarray:
    """The little-endian bytes of ``array`` in the given safetensors dtype, C order, as uint8."""
    stored = CODECS[dtype].encode(np.asarray(array))
    return np.ascontiguousarray(stored).reshape(-1).view(np.uint8)


# --------------------------------------------------------------------------------------------
# Finding a model by path or bundled name
# --------------------------------------------------------------------------------------------


