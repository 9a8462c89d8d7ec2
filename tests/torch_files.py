"""Write files in torch.save's zip format without torch, for tests and measurements.

``write_torch_file`` writes what ``torch.save(state_dict, path)`` writes for a dict of
contiguous tensors: ``<archive>/data.pkl`` (a protocol-2 pickle naming
``torch._utils._rebuild_tensor_v2`` and the storage classes, emitted opcode by opcode),
``<archive>/data/<key>`` (stored, uncompressed, 64-byte aligned as torch aligns them),
``byteorder`` and ``version``. Tensor bytes may be produced one tensor at a time, so a
7B-shaped checkpoint can be written without holding it in memory. ``pickle_opcodes`` lets a
test put any opcodes (a hostile global, say) in place of the state dict.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

STORAGE_CLASSES = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage",
                   "F64": "DoubleStorage", "I64": "LongStorage"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}
ALIGNMENT = 64


@dataclass
class Tensor:
    """One tensor to write: its storage dtype, shape, and its bytes (or a function making them).

    ``storage``/``offset`` let several tensors view one storage, as in Meta's shards.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | Callable[[], bytes] | None = None
    storage: str | None = None  # key of a shared storage; default: a storage of its own
    offset: int = 0  # in elements


def binint(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    encoded = pickle.encode_long(value)
    return pickle.LONG1 + bytes([len(encoded)]) + encoded


def unicode(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def int_tuple(values: Iterable[int]) -> bytes:
    return pickle.MARK + b"".join(binint(v) for v in values) + pickle.TUPLE


def state_dict_pickle(entries: dict[str, tuple[str, str, int, int, tuple, tuple]],
                      rebuild=("torch._utils", "_rebuild_tensor_v2")) -> bytes:
    """The pickle torch.save writes for {name: (dtype, storage key, storage numel, offset,
    shape, stride)}."""
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
    for name, (dtype, key, numel, offset, shape, stride) in entries.items():
        storage_id = (pickle.MARK + unicode("storage") + global_("torch", STORAGE_CLASSES[dtype])
                      + unicode(key) + unicode("cpu") + binint(numel) + pickle.TUPLE)
        out += [unicode(name), global_(*rebuild), pickle.MARK, storage_id, pickle.BINPERSID,
                binint(offset), int_tuple(shape), int_tuple(stride), pickle.NEWFALSE,
                global_("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
                pickle.TUPLE, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def write_torch_file(path, tensors: dict[str, Tensor], archive: str = "archive",
                     pickle_bytes: bytes | None = None, compress_storages: bool = False,
                     byteorder: bytes = b"little") -> None:
    """Write ``tensors`` as torch.save would; ``pickle_bytes`` replaces the generated pickle."""
    path = Path(path)
    storages: dict[str, tuple[str, int, list]] = {}  # key -> (dtype, numel, [(offset, data)])
    entries = {}
    for name, tensor in tensors.items():
        numel = int(np.prod(tensor.shape))
        key = tensor.storage if tensor.storage is not None else str(len(storages))
        dtype, size, pieces = storages.get(key, (tensor.dtype, 0, []))
        size = max(size, tensor.offset + numel)
        pieces.append((tensor.offset, tensor.data, numel))
        storages[key] = (dtype, size, pieces)
        entries[name] = (tensor.dtype, key, size, tensor.offset, tuple(tensor.shape),
                         contiguous_strides(tuple(tensor.shape)))
    # A shared storage's element count is its largest extent: fix the earlier entries' numel.
    entries = {name: (d, key, storages[key][1], o, s, st) for name, (d, key, _, o, s, st) in entries.items()}
    data_pickle = state_dict_pickle(entries) if pickle_bytes is None else pickle_bytes
    method = zipfile.ZIP_DEFLATED if compress_storages else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_entry(zf, f"{archive}/data.pkl", [data_pickle])
        _write_entry(zf, f"{archive}/byteorder", [byteorder])
        for key, (dtype, numel, pieces) in storages.items():
            _write_entry(zf, f"{archive}/data/{key}", _storage_chunks(dtype, numel, pieces),
                         size=numel * ITEMSIZE[dtype], method=method)
        _write_entry(zf, f"{archive}/version", [b"3\n"])


def _storage_chunks(dtype: str, numel: int, pieces: list):
    """The storage's bytes, piece by piece in offset order (gaps filled with zeros)."""
    itemsize, position = ITEMSIZE[dtype], 0
    for offset, data, count in sorted(pieces, key=lambda piece: piece[0]):
        if offset > position:
            yield bytes((offset - position) * itemsize)
        if offset + count <= position:
            continue  # a view of bytes already written
        chunk = data() if callable(data) else (data if data is not None else bytes(count * itemsize))
        if len(chunk) != count * itemsize:
            raise ValueError(f"tensor data has {len(chunk)} bytes, expected {count * itemsize}")
        yield chunk
        position = offset + count
    if numel > position:
        yield bytes((numel - position) * itemsize)


def _write_entry(zf: zipfile.ZipFile, name: str, chunks, size: int | None = None,
                 method=zipfile.ZIP_STORED) -> None:
    """One entry, its data starting at a multiple of 64 bytes (torch pads the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = method
    header_end = zf.fp.tell() + 30 + len(name.encode("utf-8"))
    padding = (-(header_end + 4)) % ALIGNMENT
    # An extra field of an unused id (0xf0f0, as in torch's writer) padding the data to alignment.
    info.extra = struct.pack("<HH", 0xF0F0, padding) + bytes(padding)
    with zf.open(info, "w", force_zip64=size is not None and size > 2**31) as entry:
        for chunk in chunks:
            entry.write(chunk)


def bf16_bits(values: np.ndarray) -> bytes:
    """float32 values -> little-endian bfloat16 bytes (round to nearest even, as torch does)."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return rounded.tobytes()


def write_random_meta_checkpoint(directory, params: dict, shards: int = 1, vocab_size: int = 32000,
                                 seed: int = 0) -> int:
    """A Meta-layout checkpoint of random bfloat16 weights: params.json and consolidated.NN.pth,
    each tensor split over the shards as Meta's model-parallel training splits it (docs/reference.md
    §9.2) and generated only when it is written. Returns the bytes of tensor data written.

    ``params`` is a params.json dict; its vocab_size, if positive, wins over ``vocab_size``.
    """
    import json
    import math

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    vocab = params.get("vocab_size", -1) if params.get("vocab_size", -1) > 0 else vocab_size
    head_dim = dim // n_heads
    kv_dim = params.get("n_kv_heads", n_heads) * head_dim
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((int(params.get("ffn_dim_multiplier", 1) * int(8 * dim / 3)) + multiple_of - 1)
                            // multiple_of)
    full = {"tok_embeddings.weight": ((vocab, dim), 1)}
    for i in range(n_layers):
        full.update({
            f"layers.{i}.attention.wq.weight": ((dim, dim), 0),
            f"layers.{i}.attention.wk.weight": ((kv_dim, dim), 0),
            f"layers.{i}.attention.wv.weight": ((kv_dim, dim), 0),
            f"layers.{i}.attention.wo.weight": ((dim, dim), 1),
            f"layers.{i}.feed_forward.w1.weight": ((hidden, dim), 0),
            f"layers.{i}.feed_forward.w2.weight": ((dim, hidden), 1),
            f"layers.{i}.feed_forward.w3.weight": ((hidden, dim), 0),
            f"layers.{i}.attention_norm.weight": ((dim,), None),
            f"layers.{i}.ffn_norm.weight": ((dim,), None),
        })
    full["norm.weight"] = ((dim,), None)
    full["output.weight"] = ((vocab, dim), 0)
    written = 0
    for shard in range(shards):
        tensors = {}
        for index, (name, (shape, axis)) in enumerate(full.items()):
            if axis is not None:
                shape = tuple(n // shards if a == axis else n for a, n in enumerate(shape))
            count = math.prod(shape)
            norm = axis is None

            def make(count=count, norm=norm, index=index):
                # Random sign and mantissa bits under a fixed exponent: weights of magnitude
                # [2**-7, 2**-6), norms in [1, 2). Cheap enough to write 13 GB in minutes.
                rng = np.random.default_rng([seed, shard if not norm else 0, index])
                bits = rng.integers(0, 2**16, size=count, dtype=np.uint16)
                bits &= 0x007F if norm else 0x807F
                bits |= 0x3F80 if norm else 0x3C00
                return bits.astype("<u2", copy=False).view(np.uint8)

            tensors[name] = Tensor("BF16", shape, make)
            written += count * 2
        write_torch_file(directory / f"consolidated.{shard:02d}.pth", tensors,
                         archive=f"consolidated.{shard:02d}")
    return written
