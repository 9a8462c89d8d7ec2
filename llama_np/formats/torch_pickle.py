"""Reading the tensors of a ``torch.save`` file without torch and without running its pickle.

A file written by ``torch.save`` (``consolidated.00.pth``, ``pytorch_model.bin``) is a zip
archive (docs/checkpoints.md, "Pickled files"):

    <name>/data.pkl      a pickle: the state dict, naming each tensor's storage, offset, shape
    <name>/data/<key>    the raw bytes of storage <key>, stored uncompressed
    <name>/byteorder     "little" (absent in files from old torch versions, also little)
    <name>/version       the format version

A pickle is a program for a small stack machine, and loading it with ``pickle.load`` can call any
function it names (``os.system`` included). So data.pkl is never given to ``pickle``: the
opcodes are read one by one with ``pickletools.genops`` (which only parses) and interpreted
here, and the only functions a pickle can name are the few a state dict of tensors needs
(``ALLOWED_GLOBALS``), each mapped to a harmless stand-in defined in this file. Any other name
is a CheckpointError naming it; nothing it names is ever imported or called.

Each tensor then becomes a ``checkpoint.StoredTensor`` over the archive's memory mapping, at the
storage entry's offset inside the zip plus the tensor's storage offset, exactly like a
safetensors tensor, so everything downstream (widening, shape checks) is shared.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llama_np.weights.codecs import BF16, CODECS, F16, F32, F64
from llama_np.formats.safetensors import Checkpoint, FileIdentity, StoredTensor, _MappedFile, _read_index
from llama_np.formats.files import is_file, open_regular
from llama_np.errors import CheckpointError

# A state dict's pickle names its tensors only: about 150 bytes and 30 opcodes per tensor, so even
# a 70B shard's is a few hundred kilobytes. More means a corrupt or hostile file; the limits keep
# what interpreting one can allocate to a few hundred megabytes.
MAX_PICKLE_BYTES = 16 * 1024 * 1024
MAX_PICKLE_OPERATIONS = 2_000_000
# Llama's tensors have one or two dimensions and at most a few billion elements.
MAX_TENSOR_RANK = 8
MAX_TENSOR_ELEMENTS = 2**40

PICKLED_SINGLE_FILE_NAME = "pytorch_model.bin"
PICKLED_INDEX_FILE_NAME = "pytorch_model.bin.index.json"

LOCAL_FILE_HEADER = struct.Struct("<4sHHHHHIIIHH")  # the 30 bytes before each zip entry's name
LOCAL_FILE_SIGNATURE = b"PK\x03\x04"


# --------------------------------------------------------------------------------------------
# The stand-ins: what each allowed global becomes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` and friends stand for: a storage dtype, or None if unsupported."""

    torch_name: str
    dtype: str | None  # a name of weights.codecs.CODECS, or None for integer and bool storages


@dataclass(frozen=True)
class StorageRef:
    """A persistent id ``('storage', type, key, location, numel)``: the bytes in data/<key>."""

    key: str
    type: StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """What ``torch._utils._rebuild_tensor_v2`` would build: a view of a storage."""

    storage: StorageRef
    offset: int  # in elements, from the start of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, reduced to recording which bytes the tensor views."""
    if not isinstance(storage, StorageRef):
        raise _PickleProblem(f"_rebuild_tensor_v2 got {type(storage).__name__} for a storage")
    for name, value in (("size", size), ("stride", stride)):
        # The rank first, before anything walks or multiplies the dimensions: a few megabytes of
        # pickle can declare a million of them, and their product is a number of a million digits.
        if isinstance(value, tuple) and len(value) > MAX_TENSOR_RANK:
            raise _PickleProblem(f"_rebuild_tensor_v2 got a {name} of {len(value):,} dimensions; a "
                                 f"weight has at most {MAX_TENSOR_RANK}")
    for name, value in (("size", size), ("stride", stride)):
        if not (isinstance(value, tuple) and all(_is_int(n) and n >= 0 for n in value)):
            raise _PickleProblem(f"_rebuild_tensor_v2 got {name} {describe(value)}; expected a tuple "
                                 "of non-negative ints")
    if not (_is_int(storage_offset) and storage_offset >= 0) or len(size) != len(stride):
        raise _PickleProblem(f"_rebuild_tensor_v2 got storage offset {describe(storage_offset)}, "
                             f"size {describe(size)} and stride {describe(stride)}")
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor."""
    return data


def _ordered_dict(*args):
    """collections.OrderedDict(): an empty dict (items arrive by SETITEMS, as for any dict)."""
    if args:
        raise _PickleProblem("OrderedDict is given arguments; a state dict gives none")
    return {}


def _storage_types() -> dict[str, StorageType]:
    supported = {"FloatStorage": F32.name, "HalfStorage": F16.name, "BFloat16Storage": BF16.name,
                 "DoubleStorage": F64.name}
    unsupported = ("LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
                   "BoolStorage")
    types = {f"torch.{name}": StorageType(f"torch.{name}", dtype) for name, dtype in supported.items()}
    types.update({f"torch.{name}": StorageType(f"torch.{name}", None) for name in unsupported})
    return types


# Every global a pickle may name, "module.name" -> its stand-in. Nothing else is allowed.
ALLOWED_GLOBALS: dict[str, object] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": _ordered_dict,
    **_storage_types(),
}
CALLABLE_STAND_INS = (_rebuild_tensor_v2, _rebuild_parameter, _ordered_dict)


class _PickleProblem(Exception):
    """Raised inside the interpreter; turned into a CheckpointError naming the file."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def describe(value, limit: int = 80) -> str:
    """A short description of a value built by a pickle, for error messages.

    Never ``repr`` of the whole value: a hostile pickle can nest tuples millions deep (repr would
    overflow the stack) or build a tuple of millions of ints. Strings and ints are shown
    shortened, a tuple by its first few items, anything else by its type.
    """
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if _is_int(value):
        text = str(value) if value.bit_length() < 256 else f"an int of {value.bit_length()} bits"
        return text[:limit]
    if isinstance(value, tuple):
        items = ", ".join(describe(item, 20) if isinstance(item, (str, int)) else type(item).__name__
                          for item in value[:6])
        return f"({items}{', ...' if len(value) > 6 else ''})"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------
# The interpreter: the opcodes a pickled state dict uses, and nothing else
# --------------------------------------------------------------------------------------------

_MARK = object()  # the MARK opcode's entry on the stack

PUSH_NEW = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
            "EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}  # a new one each time
PUSH_ARGUMENT = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT",
                 "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}
NO_EFFECT = {"PROTO", "FRAME"}


def interpret_pickle(data: bytes):
    """Run a state dict's pickle on our stack machine and return what it builds.

    Tensors come back as TensorRef. Raises _PickleProblem for any opcode, global or value a
    state dict of tensors does not need.
    """
    stack: list = []
    memo: dict[int, object] = {}
    for done, (opcode, argument) in enumerate(_parsed_opcodes(data)):
        if done >= MAX_PICKLE_OPERATIONS:
            raise _PickleProblem(f"it runs more than {MAX_PICKLE_OPERATIONS} opcodes, far more than "
                                 "a state dict's")
        name = opcode.name
        if name in NO_EFFECT:
            continue
        if name in PUSH_NEW:
            stack.append(PUSH_NEW[name]())
        elif name in PUSH_ARGUMENT:
            stack.append(argument)
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(argument)] = _top(stack)
        elif name == "MEMOIZE":
            memo[len(memo)] = _top(stack)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if int(argument) not in memo:
                raise _PickleProblem(f"{name} reads memo entry {argument}, which was never stored")
            stack.append(memo[int(argument)])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append(tuple(_pop(stack, int(name[-1]))))
        elif name == "TUPLE":
            stack.append(tuple(_pop_to_mark(stack)))
        elif name == "APPEND":
            value = _pop(stack, 1)[0]
            _expect(_top(stack), list, name).append(value)
        elif name == "APPENDS":
            values = _pop_to_mark(stack)
            _expect(_top(stack), list, name).extend(values)
        elif name == "SETITEM":
            key, value = _pop(stack, 2)
            _set_item(_expect(_top(stack), dict, name), key, value)
        elif name == "SETITEMS":
            items = _pop_to_mark(stack)
            if len(items) % 2:
                raise _PickleProblem("SETITEMS has a key without a value")
            target = _expect(_top(stack), dict, name)
            for key, value in zip(items[0::2], items[1::2]):
                _set_item(target, key, value)
        elif name == "GLOBAL":
            stack.append(_allowed_global(argument.replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            module, qualified = _pop(stack, 2)
            if not (isinstance(module, str) and isinstance(qualified, str)):
                raise _PickleProblem("STACK_GLOBAL needs two strings")
            stack.append(_allowed_global(f"{module}.{qualified}"))
        elif name == "BINPERSID":
            stack.append(_storage_ref(_pop(stack, 1)[0]))
        elif name == "REDUCE":
            function, arguments = _pop(stack, 2)
            if not any(function is allowed for allowed in CALLABLE_STAND_INS):
                raise _PickleProblem(f"REDUCE calls {describe(function)}, which is not callable here")
            try:
                stack.append(function(*_expect(arguments, tuple, name)))
            except TypeError as error:  # the wrong number of arguments
                raise _PickleProblem(f"REDUCE gives a stand-in the wrong arguments: {error}") from None
        elif name == "BUILD":
            # OrderedDict's state (a state dict's _metadata attribute) is not weights: dropped.
            _pop(stack, 1)
            _expect(_top(stack), dict, name)
        elif name == "STOP":
            if len(stack) != 1:
                raise _PickleProblem(f"it stops with {len(stack)} values on its stack, not one")
            return stack[0]
        else:
            raise _PickleProblem(f"it uses the opcode {name}, which a state dict of tensors "
                                 "does not need")
    raise _PickleProblem("it ends without a STOP opcode")


def _parsed_opcodes(data: bytes):
    """(opcode, argument) pairs as pickletools parses them, one at a time; parsing runs nothing."""
    operations = pickletools.genops(io.BytesIO(data))
    while True:
        try:
            opcode, argument, _ = next(operations)
        except StopIteration:
            return
        except (ValueError, EOFError, struct.error) as error:  # not a whole pickle
            raise _PickleProblem(f"it is not a valid pickle ({error})") from None
        yield opcode, argument


def _top(stack: list):
    if not stack or stack[-1] is _MARK:
        raise _PickleProblem("an opcode finds its stack empty")
    return stack[-1]


def _pop(stack: list, count: int) -> list:
    if len(stack) < count or any(item is _MARK for item in stack[len(stack) - count:]):
        raise _PickleProblem("an opcode finds too few values on its stack")
    items = stack[len(stack) - count:]
    del stack[len(stack) - count:]
    return items


def _pop_to_mark(stack: list) -> list:
    for position in range(len(stack) - 1, -1, -1):
        if stack[position] is _MARK:
            items = stack[position + 1:]
            del stack[position:]
            return items
    raise _PickleProblem("an opcode looks for a MARK that was never set")


def _expect(value, kind: type, opcode: str):
    if not isinstance(value, kind):
        raise _PickleProblem(f"{opcode} applies to a {type(value).__name__}; expected a {kind.__name__}")
    return value


def _set_item(target: dict, key, value) -> None:
    if not isinstance(key, (str, int)):  # a string or int key cannot run code when hashed
        raise _PickleProblem(f"a dict key is a {type(key).__name__}; expected a string")
    target[key] = value


def _allowed_global(dotted: str):
    if dotted not in ALLOWED_GLOBALS:
        raise _PickleProblem(
            f"it names the global {dotted}, which is not one a state dict of tensors needs "
            f"(allowed: {', '.join(sorted(ALLOWED_GLOBALS))}); it was not imported or run")
    return ALLOWED_GLOBALS[dotted]


def _storage_ref(persistent_id) -> StorageRef:
    if not (isinstance(persistent_id, tuple) and len(persistent_id) == 5
            and persistent_id[0] == "storage"):
        raise _PickleProblem(f"a persistent id is {describe(persistent_id)}; expected "
                             "('storage', type, key, location, numel)")
    _, storage_type, key, location, numel = persistent_id
    if not isinstance(storage_type, StorageType) or not isinstance(key, str) \
            or not isinstance(location, str) or not (_is_int(numel) and numel >= 0):
        raise _PickleProblem(f"a persistent id is {describe(persistent_id)}; expected "
                             "('storage', a torch storage type, key, location, element count)")
    return StorageRef(key, storage_type, numel)


# --------------------------------------------------------------------------------------------
# The zip archive
# --------------------------------------------------------------------------------------------


def read_torch_file(path) -> dict[str, StoredTensor]:
    """Every tensor of one ``torch.save`` file, by name, as memory-mapped StoredTensors.

    The file must be a zip archive holding a pickled dict of tensors (a state dict). Only its
    pickle and zip directory are read here; tensor bytes are mapped when first used. Every
    problem is a CheckpointError naming the file (and the tensor, storage or global).
    """
    path = Path(path)
    try:
        with open_regular(path) as f:  # a FIFO named consolidated.00.pth would block open() for ever
            head = f.read(4)
            size = f.seek(0, io.SEEK_END)
            if head != LOCAL_FILE_SIGNATURE:
                raise CheckpointError(_not_a_zip_message(path, head))
            try:
                archive = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError,
                    EOFError, OverflowError, struct.error) as error:  # what zipfile raises for bad bytes
                raise CheckpointError(f"{path} is not a readable zip archive ({error}); the "
                                      "file is truncated or corrupt") from None
            with archive:
                prefix, state = _read_state_dict(path, archive)
                entries = {info.filename: info for info in archive.infolist()}
                mapped = _MappedFile(path, FileIdentity.of(os.fstat(f.fileno())))
                return {
                    name: _stored_tensor(path, f, size, entries, prefix, name, reference, mapped)
                    for name, reference in state.items()
                }
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


def _not_a_zip_message(path: Path, head: bytes) -> str:
    if head[:1] == b"\x80":  # a pickle's PROTO opcode: torch.save before torch 1.6
        return (f"{path} is in torch's legacy format (torch.save before torch 1.6, or with "
                "_use_new_zipfile_serialization=False), a bare pickle that llama_np does not "
                "read; re-save it with a recent torch.save")
    return f"{path} is not a zip archive (it starts with {head!r}); torch.save writes zip archives"


def _read_state_dict(path: Path, archive: zipfile.ZipFile) -> tuple[str, dict[str, TensorRef]]:
    """The archive's folder name and its pickle interpreted: {tensor name: TensorRef}."""
    pickles = [info for info in archive.infolist()
               if info.filename.count("/") == 1 and info.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        found = ", ".join(info.filename for info in pickles) or "none"
        raise CheckpointError(f"{path} should hold one <name>/data.pkl, as torch.save writes; "
                              f"found {found}")
    info = pickles[0]
    prefix = info.filename[: -len("data.pkl")]
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: {info.filename} is {info.file_size} bytes, more than the "
                              f"{MAX_PICKLE_BYTES}-byte limit for the pickle of a state dict")
    _check_byte_order(path, archive, prefix)
    try:
        with archive.open(info) as entry:
            data = entry.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError) as error:
        raise CheckpointError(f"cannot read {info.filename} in {path}: {error}") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: {info.filename} unpacks to more than {MAX_PICKLE_BYTES} bytes")
    try:
        state = interpret_pickle(data)
    except _PickleProblem as problem:
        raise CheckpointError(f"refusing {path}: its pickle {info.filename} is not a plain "
                              f"state dict of tensors: {problem}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a pickled {type(state).__name__}; expected a dict of "
                              "tensors (a state dict)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise CheckpointError(f"{path} maps {describe(name)} to a {type(value).__name__}; a state "
                                  "dict maps tensor names to tensors")
    return prefix, state


def _check_byte_order(path: Path, archive: zipfile.ZipFile, prefix: str) -> None:
    """Files from old torch versions have no byteorder entry; they are little-endian too."""
    name = prefix + "byteorder"
    if name not in archive.namelist():
        return
    try:
        with archive.open(name) as entry:
            order = entry.read(16).strip()
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError) as error:
        raise CheckpointError(f"cannot read {name} in {path}: {error}") from None
    if order != b"little":
        raise CheckpointError(f"{path} stores its tensors in {order.decode('ascii', 'replace')!r} "
                              "byte order; llama_np reads little-endian files only")


def _stored_tensor(path: Path, f, file_size: int, entries: dict, prefix: str, name: str,
                   reference: TensorRef, mapped: _MappedFile) -> StoredTensor:
    """The StoredTensor for one TensorRef, its bytes checked to lie inside its storage entry."""
    where = f"tensor {name!r} in {path}"
    storage = reference.storage
    if storage.type.dtype is None:
        raise CheckpointError(f"{where} is stored as {storage.type.torch_name}; llama_np reads "
                              "float tensors only (F32, F16, BF16, F64)")
    itemsize = CODECS[storage.type.dtype].stored_dtype.itemsize
    shape = reference.shape
    if len(shape) > MAX_TENSOR_RANK or any(n > MAX_TENSOR_ELEMENTS for n in shape) or \
            math.prod(max(n, 1) for n in shape) > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where} has shape {describe(shape)}, beyond the {MAX_TENSOR_RANK} "
                              f"dimensions and {MAX_TENSOR_ELEMENTS} elements a weight can have")
    elements = math.prod(shape)
    if not _is_contiguous(shape, reference.stride):
        raise CheckpointError(f"{where} has shape {shape} and strides {reference.stride}: it is a "
                              "non-contiguous view, which llama_np does not read; save "
                              "tensor.contiguous() instead")
    if reference.offset + elements > storage.numel:
        raise CheckpointError(f"{where} reads elements {reference.offset} to "
                              f"{reference.offset + elements} of storage {storage.key}, which has "
                              f"{storage.numel}; the file is corrupt")
    start, length = _storage_entry(path, f, file_size, entries, prefix + "data/" + storage.key)
    if length != storage.numel * itemsize:
        raise CheckpointError(f"{where}: its storage {prefix}data/{storage.key} holds {length} "
                              f"bytes, but the pickle says {storage.numel} elements of "
                              f"{storage.type.torch_name} ({storage.numel * itemsize} bytes); the "
                              "file is truncated or corrupt")
    begin = start + reference.offset * itemsize
    return StoredTensor(name, path, storage.type.dtype, shape, mapped, begin, begin + elements * itemsize)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major with no gaps; the stride of a dimension of size 1 does not matter."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _storage_entry(path: Path, f, file_size: int, entries: dict, entry_name: str) -> tuple[int, int]:
    """(absolute offset of the entry's bytes in the file, their length), checked stored and inside."""
    info = entries.get(entry_name)
    if info is None:
        raise CheckpointError(f"{path} has no {entry_name}, which its pickle names; the file "
                              "is incomplete")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"{entry_name} in {path} is compressed (zip method "
                              f"{info.compress_type}); torch.save stores tensor bytes uncompressed, "
                              "which is what lets them be memory-mapped")
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{entry_name} in {path} is encrypted")
    if not 0 <= info.header_offset < file_size:
        raise CheckpointError(f"the zip directory of {path} places {entry_name} at byte "
                              f"{info.header_offset}, outside the {file_size}-byte file; it is corrupt")
    f.seek(info.header_offset)
    header = f.read(LOCAL_FILE_HEADER.size)
    if len(header) != LOCAL_FILE_HEADER.size or header[:4] != LOCAL_FILE_SIGNATURE:
        raise CheckpointError(f"the zip directory of {path} points {entry_name} at byte "
                              f"{info.header_offset}, where no entry starts; the file is corrupt")
    fields = LOCAL_FILE_HEADER.unpack(header)
    method, name_length, extra_length = fields[3], fields[9], fields[10]
    if method != zipfile.ZIP_STORED:
        raise CheckpointError(f"{entry_name} in {path} is compressed (zip method {method})")
    # The entry's own header must name the same entry, as zipfile.open checks for what it reads:
    # otherwise the directory would make these bytes stand for another storage.
    local_name = f.read(name_length)
    if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise CheckpointError(f"the zip directory of {path} names {entry_name}, but the entry at byte "
                              f"{info.header_offset} calls itself {local_name[:80]!r}; the file is corrupt "
                              "or crafted")
    start = info.header_offset + LOCAL_FILE_HEADER.size + name_length + extra_length
    if start + info.file_size > file_size:
        raise CheckpointError(f"{entry_name} in {path} runs to byte {start + info.file_size}, past "
                              f"the end of the {file_size}-byte file; the file is truncated")
    return start, info.file_size


# --------------------------------------------------------------------------------------------
# A directory of pytorch_model*.bin files (Hugging Face's older layout)
# --------------------------------------------------------------------------------------------


def has_pickled_weights(directory) -> bool:
    directory = Path(directory)
    return (is_file(directory / PICKLED_SINGLE_FILE_NAME)
            or is_file(directory / PICKLED_INDEX_FILE_NAME))


def open_pickled_checkpoint(directory) -> Checkpoint:
    """``pytorch_model.bin``, or the shards of ``pytorch_model.bin.index.json``, as a Checkpoint."""
    directory = Path(directory)
    if is_file(directory / PICKLED_SINGLE_FILE_NAME):
        files = {directory / PICKLED_SINGLE_FILE_NAME: None}
    else:
        files = _read_index(directory / PICKLED_INDEX_FILE_NAME)  # the safetensors index's format
    tensors: dict[str, StoredTensor] = {}
    for file, wanted in files.items():
        in_file = read_torch_file(file)
        if wanted is not None:
            absent = sorted(set(wanted) - in_file.keys())
            if absent:
                raise CheckpointError(f"{directory / PICKLED_INDEX_FILE_NAME} places these tensors "
                                      f"in {file.name}, which does not hold them: {', '.join(absent)}")
            in_file = {name: in_file[name] for name in wanted}
        tensors.update(in_file)
    checkpoint = Checkpoint(directory, list(files), tensors)
    checkpoint.layout = "Hugging Face, pickled (pytorch_model*.bin, read without running the pickle)"
    return checkpoint
