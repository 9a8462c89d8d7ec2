"""llama.cpp's GGUF files (version 2 and 3), read as a config and Hugging Face-named tensors.

A GGUF file is one header followed by the tensors' bytes (ggml's docs/gguf.md,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:

    "GGUF"  version (u32)  tensor_count (u64)  metadata_kv_count (u64)
    metadata_kv_count × [ key (string)  value_type (u32)  value ]
    tensor_count      × [ name (string)  n_dims (u32)  ne[0] … ne[n_dims-1] (u64 each)
                          ggml_type (u32)  offset (u64, from the start of the data) ]
    padding to general.alignment (default 32)
    data: each tensor at its offset, itself a multiple of the alignment

    string = length (u64) + that many bytes of UTF-8;  array = type (u32) + count (u64) + values

``ne[0]`` is the number of elements in a row, the fastest-changing index: the NumPy shape is
the dims reversed (a q_proj of (4096, 4096) in NumPy is ne = [4096, 4096]; an embedding (V, D)
is ne = [D, V]).

Everything is checked before a byte of tensor data is read, against the size of the file: a
hostile or truncated file is one CheckpointError naming the file, the field and its value, and
no count or length read from the file can make us allocate more than the file holds. The data
is memory-mapped; each tensor is a ``GGUFTensor`` whose dtype names a codec of
``weights.codecs`` (``CODECS``), block-quantised ones included, so the rest of llama_np reads
it like a safetensors tensor.

Names and layout: llama.cpp names tensors ``blk.N.attn_q.weight`` … (``HF_NAMES``), and its
converter permutes the rows of q_proj and k_proj into Meta's interleaved RoPE layout
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``); ``GGUFTensor.stored`` permutes them back
(``layers.permute_rope_rows``), with the key/value head count for k_proj.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.config import LlamaConfig
from llama_np.errors import CheckpointError, ConfigError, TokenizerError
from llama_np.formats import sentencepiece_model
from llama_np.formats.files import is_file, open_regular
from llama_np.formats.safetensors import (
    Checkpoint,
    FileIdentity,
    StoredTensor,
    _MappedFile,
)
from llama_np.weights.codecs import CODECS, GGML_TYPES

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and lengths; nothing writes it any more
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 3  # an array of arrays of arrays at most: nothing llama.cpp writes nests deeper

# value_type -> (name in the spec, struct format of one value); STRING and ARRAY are read apart
STRING, ARRAY, BOOL = 8, 9, 7
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
SMALLEST_VALUE = {8: 8, 9: 12}  # a string is at least its length, an array its type and count


# ---------------------------------------------------------------------------- the header


class HeaderReader:
    """A cursor over a GGUF file's bytes that refuses to read, or allocate, past the file's end."""

    def __init__(self, path: Path, data):
        self.path, self.data, self.offset = path, data, 0

    def error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, count: int, what: str) -> bytes:
        """The next ``count`` bytes, or a CheckpointError saying ``what`` runs past the end."""
        if count > self.remaining():
            raise self.error(f"{what} needs {count} bytes at offset {self.offset}, but the file ends "
                             f"{self.remaining()} bytes later (truncated, or not a GGUF file)")
        taken = self.data[self.offset:self.offset + count]  # a copy: the mapping closes after the header
        self.offset += count
        return taken

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, smallest: int) -> int:
        """A u64 count of things each at least ``smallest`` bytes long, checked against the file."""
        count = self.scalar("<Q", what)
        if count * smallest > self.remaining():
            raise self.error(f"{what} is {count}, but {count} of them need at least {count * smallest} "
                             f"bytes and only {self.remaining()} are left")
        return count

    def string(self, what: str) -> str:
        length = self.count(f"the length of {what}", 1)
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.error(f"{what} is not UTF-8 ({error.reason} at byte {error.start})") from None

    def value(self, value_type: int, what: str, depth: int = 0):
        """One metadata value: int, float, bool, str, or an array (NumPy for numbers, else a list)."""
        if value_type not in VALUE_TYPES:
            raise self.error(f"{what} has value type {value_type}; GGUF value types are 0 to 12")
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY:
            return self.array(what, depth + 1)
        value = self.scalar(VALUE_TYPES[value_type][1], what)
        if value_type == BOOL:
            if value > 1:
                raise self.error(f"{what} is a BOOL of value {value}; GGUF allows only 0 and 1")
            return bool(value)
        return value

    def array(self, what: str, depth: int):
        if depth > MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays {depth} deep; llama_np reads at most {MAX_ARRAY_DEPTH}")
        item_type = self.scalar("<I", f"the item type of {what}")
        if item_type not in VALUE_TYPES:
            raise self.error(f"{what} is an array of value type {item_type}; GGUF value types are 0 to 12")
        fmt = VALUE_TYPES[item_type][1]
        smallest = SMALLEST_VALUE.get(item_type) or struct.calcsize(fmt)
        count = self.count(f"the length of {what}", smallest)
        if fmt is None:
            return [self.value(item_type, f"item {i} of {what}", depth) for i in range(count)]
        values = np.frombuffer(self.take(count * smallest, what), dtype=np.dtype(fmt))
        if item_type == BOOL:
            if values.size and values.max() > 1:
                raise self.error(f"{what} holds a BOOL of value {values.max()}; GGUF allows only 0 and 1")
            values = values.astype(bool)
        return values


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its codec name, NumPy shape and bytes [start, stop) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass
class GGUFFile:
    """A GGUF file's header, read and checked: metadata and tensor infos, no tensor bytes."""

    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    identity: FileIdentity
    value_types: dict[str, str] = field(default_factory=dict)  # key -> its value type's name ("UINT32")


def read_gguf(path) -> GGUFFile:
    """Read and check the header of the GGUF file ``path``: metadata and tensor infos."""
    path = Path(path)
    try:
        with open_regular(path) as f:  # a FIFO or a device is refused, not waited on
            identity = FileIdentity.of(os.fstat(f.fileno()))
            if identity.size < 24:
                raise CheckpointError(f"{path} has {identity.size} bytes; a GGUF file starts with 24 "
                                      "bytes of magic, version and counts")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read_header(HeaderReader(path, data), identity)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


def _read_header(reader: HeaderReader, identity: FileIdentity) -> GGUFFile:
    path = reader.path
    magic = bytes(reader.take(4, "the magic"))
    if magic != MAGIC:
        raise reader.error(f"starts with {magic!r}, not {MAGIC!r}: it is not a GGUF file")
    version = reader.scalar("<I", "the version")
    if version not in VERSIONS:
        swapped = "; it looks big-endian, which llama_np does not read" if version >= 1 << 16 else ""
        raise reader.error(f"is GGUF version {version}; llama_np reads versions 2 and 3{swapped}")
    tensor_count = reader.count("tensor_count", 24)  # name length, n_dims, type, offset
    kv_count = reader.count("metadata_kv_count", 13)  # key length, value type, one byte
    metadata, value_types = {}, {}
    for index in range(kv_count):
        key = reader.string(f"the key of metadata entry {index}")
        if key in metadata:
            raise reader.error(f"metadata key {key!r} appears twice")
        value_type = reader.scalar("<I", f"the value type of metadata key {key!r}")
        metadata[key] = reader.value(value_type, f"metadata key {key!r}")
        value_types[key] = VALUE_TYPES[value_type][0]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise reader.error(f"general.alignment is {alignment!r}; expected a power of two")
    infos = [_read_tensor_info(reader, index, alignment) for index in range(tensor_count)]
    data_start = -(-reader.offset // alignment) * alignment
    tensors = {}
    for name, dtype, shape, offset in infos:
        if name in tensors:
            raise reader.error(f"tensor {name!r} appears twice")
        start = data_start + offset
        stop = start + CODECS[dtype].nbytes(shape)
        if stop > identity.size:
            raise reader.error(f"tensor {name!r} ({dtype}, shape {shape}) takes bytes {start} to {stop}, "
                               f"past the end of the file ({identity.size} bytes): the file is truncated")
        tensors[name] = TensorInfo(name, dtype, shape, start, stop)
    _check_no_overlaps(path, tensors.values())
    return GGUFFile(path, version, metadata, tensors, identity, value_types)


def _read_tensor_info(reader: HeaderReader, index: int, alignment: int) -> tuple[str, str, tuple, int]:
    """(name, codec name, NumPy shape, offset in the data) of tensor info ``index``."""
    name = reader.string(f"the name of tensor {index}")
    n_dims = reader.scalar("<I", f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise reader.error(f"tensor {name!r} has n_dims {n_dims}; ggml tensors have 1 to {MAX_DIMS}")
    ne = [reader.scalar("<Q", f"dimension {i} of tensor {name!r}") for i in range(n_dims)]
    ggml_type = reader.scalar("<I", f"the type of tensor {name!r}")
    codec = GGML_TYPES.get(ggml_type)
    if codec is None:
        readable = ", ".join(f"{c.name} ({number})" for number, c in sorted(GGML_TYPES.items()))
        raise reader.error(f"tensor {name!r} has ggml type {ggml_type}, which llama_np does not read; "
                           f"it reads {readable}")
    problem = codec.row_problem(ne[0])
    if problem:
        raise reader.error(f"tensor {name!r} has rows of ne[0] = {ne[0]} numbers: {problem}")
    offset = reader.scalar("<Q", f"the offset of tensor {name!r}")
    if offset % alignment:
        raise reader.error(f"tensor {name!r} starts at data offset {offset}, not a multiple of the "
                           f"alignment {alignment}")
    if math.prod(ne) > 8 * len(reader.data):  # no codec packs more than 8 numbers in a byte
        raise reader.error(f"tensor {name!r} has dimensions {ne}, more numbers than the file can hold")
    return name, codec.name, tuple(reversed(ne)), offset


def _check_no_overlaps(path: Path, tensors) -> None:
    ordered = sorted((t for t in tensors if t.stop > t.start), key=lambda t: t.start)
    for before, after in itertools.pairwise(ordered):
        if after.start < before.stop:
            raise CheckpointError(f"{path}: tensors {before.name!r} and {after.name!r} overlap "
                                  f"(bytes {before.start}-{before.stop} and {after.start}-{after.stop})")


# ---------------------------------------------------------------------------- Llama: config and names


# llama.cpp's tensor names -> Hugging Face's. A decoder layer's are blk.N.<name>.weight (or .bias).
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; a name llama_np does
    not know (``rope_freqs.weight``) is kept as it is."""
    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    match = LAYER_NAME.fullmatch(gguf_name)
    if match and match[2] in HF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{HF_LAYER_NAMES[match[2]]}.{match[3]}"
    return gguf_name


def metadata_value(gguf: GGUFFile, key: str, kind, default=None, required: bool = False):
    """Metadata ``key`` checked to be of ``kind`` (int, float, str, bool), or ``default``."""
    if key not in gguf.metadata:
        if required:
            raise CheckpointError(f"{gguf.path} has no metadata key {key!r}, which a Llama model needs")
        return default
    value = gguf.metadata[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{gguf.path}: metadata key {key!r} is {value!r:.80}; expected a {kind.__name__}")
    return value


def gguf_config(gguf: GGUFFile) -> LlamaConfig:
    """The LlamaConfig of a GGUF file's ``llama.*`` and ``tokenizer.ggml.*`` metadata.

    As Transformers reads it (``gguf_file=``): the vocabulary is the tokenizer's token count when
    ``llama.vocab_size`` is absent, the embeddings are tied when ``output.weight`` is absent, and
    head_dim is ``rope.dimension_count``; ``attention.key_length`` wins when present, as in
    llama.cpp. ``rope.scaling.type`` linear is read as a linear RoPE scaling (Transformers
    ignores it, llama.cpp does not).
    """
    architecture = metadata_value(gguf, "general.architecture", str, required=True)
    if architecture != "llama":
        raise CheckpointError(f"{gguf.path} holds a {architecture!r} model (general.architecture); "
                              "llama_np runs 'llama' ones")

    def llama(key, kind, default=None, required=False):
        return metadata_value(gguf, f"llama.{key}", kind, default, required)

    heads = llama("attention.head_count", int, required=True)
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    embedding = gguf.tensors.get("token_embd.weight")
    vocab_size = llama("vocab_size", int, len(tokens) if isinstance(tokens, list) else
                       embedding.shape[0] if embedding else None)
    fields = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        hidden_size=llama("embedding_length", int, required=True),
        intermediate_size=llama("feed_forward_length", int, required=True),
        num_hidden_layers=llama("block_count", int, required=True),
        num_attention_heads=heads,
        num_key_value_heads=llama("attention.head_count_kv", int, heads),
        rms_norm_eps=llama("attention.layer_norm_rms_epsilon", float, 1e-6),
        rope_theta=llama("rope.freq_base", float, 10000.0),
        max_position_embeddings=llama("context_length", int, 2048),
        vocab_size=vocab_size,
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )
    head_dim = llama("attention.key_length", int, llama("rope.dimension_count", int))
    if head_dim is not None:
        fields["head_dim"] = head_dim
    value_length = llama("attention.value_length", int, head_dim)
    if value_length != head_dim:
        raise CheckpointError(f"{gguf.path}: llama.attention.value_length is {value_length} but the key length is "
                              f"{head_dim}; Llama's values and keys have the same head_dim")
    for token in ("bos", "eos", "pad"):
        token_id = metadata_value(gguf, f"tokenizer.ggml.{token}_token_id", int)
        if token_id is not None:
            fields[f"{token}_token_id"] = token_id
    scaling = llama("rope.scaling.type", str, "none")
    if scaling == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": llama("rope.scaling.factor", float, 1.0)}
    elif scaling != "none":
        raise CheckpointError(f"{gguf.path}: llama.rope.scaling.type is {scaling!r}; llama_np reads "
                              "'none' and 'linear' from GGUF files")
    try:
        return LlamaConfig(**fields)
    except ConfigError as error:
        raise ConfigError(f"{gguf.path} (its llama.* metadata): {error}") from None


# ---------------------------------------------------------------------------- the tokenizer


def gguf_tokenizer(gguf: GGUFFile) -> tuple[bytes, dict]:
    """A sentencepiece model (serialized ModelProto) and LlamaTokenizer settings from
    ``tokenizer.ggml.*``: tokens, scores, token types, bos/eos/unk/pad ids, ``add_bos_token``,
    ``add_eos_token`` and ``add_space_prefix`` (sentencepiece's dummy prefix); and
    ``tokenizer.chat_template`` when the file has one.

    Only ``tokenizer.ggml.model == "llama"`` (sentencepiece BPE) is read; a missing
    ``add_bos_token`` means True, as in llama.cpp and Transformers, and a missing unknown id the
    first token of type unknown, else 0, as in llama.cpp.
    """
    def error(what: str) -> TokenizerError:
        return TokenizerError(f"{gguf.path}: {what}")

    model = gguf.metadata.get("tokenizer.ggml.model")
    if model is None:
        raise error("holds no tokenizer (no tokenizer.ggml.model key); give a tokenizer of the same vocabulary")
    if model != "llama":
        raise error(f"tokenizer.ggml.model is {model!r}; llama_np reads 'llama' (sentencepiece) vocabularies")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise error("tokenizer.ggml.tokens is missing or not an array of strings")
    count = len(tokens)
    scores = gguf.metadata.get("tokenizer.ggml.scores", np.zeros(count))
    types = gguf.metadata.get("tokenizer.ggml.token_type", np.full(count, sentencepiece_model.NORMAL))
    for key, values in (("scores", scores), ("token_type", types)):
        if not isinstance(values, np.ndarray) or values.shape != (count,):
            raise error(f"tokenizer.ggml.{key} should hold one number per token ({count})")
    if len(set(tokens)) != count:
        raise error("tokenizer.ggml.tokens holds the same token twice")
    if not np.isin(types, range(1, 7)).all():
        raise error(f"tokenizer.ggml.token_type holds {sorted(set(types.tolist()) - set(range(1, 7)))}; "
                    "token types are 1 to 6")

    def token_id(name: str, required: bool):
        key = f"tokenizer.ggml.{name}_token_id"
        value = gguf.metadata.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
            raise error(f"{key} is {value!r}; expected a token id below {count}")
        return value

    unknown = [i for i, t in enumerate(types.tolist()) if t == sentencepiece_model.UNKNOWN]
    unk_id = token_id("unknown", False)
    # llama.cpp's converter writes no unknown_token_id when tokenizer_config.json makes <unk> a
    # control token; llama.cpp then takes id 0, its default for a "llama" vocabulary (llama-vocab.cpp)
    unk_id = unk_id if unk_id is not None else unknown[0] if unknown else 0
    bos_id, eos_id, pad_id = token_id("bos", True), token_id("eos", True), token_id("padding", False)
    types = types.astype(int)
    types[unk_id] = sentencepiece_model.UNKNOWN
    proto = sentencepiece_model.model_proto(
        tokens, scores, types.tolist(), unk_id, bos_id, eos_id, -1 if pad_id is None else pad_id,
        add_dummy_prefix=bool(gguf.metadata.get("tokenizer.ggml.add_space_prefix", True)))
    settings = {"unk_token": tokens[unk_id], "bos_token": tokens[bos_id], "eos_token": tokens[eos_id],
                "pad_token": None if pad_id is None else tokens[pad_id],
                "add_bos_token": bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", True)),
                "add_eos_token": bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False))}
    chat_template = gguf.metadata.get("tokenizer.chat_template")
    if isinstance(chat_template, str):
        settings["chat_template"] = chat_template
    return proto, settings


# ---------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GGUFTensor(StoredTensor):
    """One tensor of a GGUF file under its Hugging Face name, read from the memory map when used.

    ``stored()`` is the codec's view of its bytes (a block-quantised tensor's raw blocks,
    (rows, blocks per row, block bytes)); for q_proj and k_proj, ``rope_heads`` is set and the
    rows are permuted back from Meta's interleaved layout to rotate-half, head by head, which
    moves whole rows and so works on quantised blocks as on numbers.
    """

    gguf_name: str = ""
    rope_heads: int | None = None

    def stored(self) -> np.ndarray:
        stored = super().stored()
        if self.rope_heads is None:
            return stored
        rows = stored.reshape(stored.shape[0], -1)  # (rows, bytes or numbers of a row)
        return layers.permute_rope_rows(rows, self.rope_heads).reshape(stored.shape)


class GGUFCheckpoint(Checkpoint):
    """The tensors of one GGUF file, under Hugging Face's names; ``metadata`` is its header's."""

    layout = "GGUF (llama.cpp)"

    def __init__(self, gguf: GGUFFile, tensors: dict[str, GGUFTensor]):
        super().__init__(gguf.path.parent, [gguf.path], tensors)
        self.path = gguf.path
        self.metadata = gguf.metadata
        self.value_types = gguf.value_types
        self.version = gguf.version


def open_gguf_checkpoint(path) -> tuple[LlamaConfig, GGUFCheckpoint]:
    """The config and the Hugging Face-named tensors of the GGUF file ``path``; only its header is read."""
    path = Path(path)
    if not is_file(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    mapped = _MappedFile(path, gguf.identity)
    rope_heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    tensors = {}
    for info in gguf.tensors.values():
        name = hf_name(info.name)
        if name in tensors:
            raise CheckpointError(f"{path}: tensors {tensors[name].gguf_name!r} and {info.name!r} are both "
                                  f"{name!r} once named as Hugging Face names them")
        heads = next((h for part, h in rope_heads.items() if f".{part}." in name), None)
        tensors[name] = GGUFTensor(name, path, info.dtype, info.shape, mapped, info.start, info.stop,
                                   gguf_name=info.name, rope_heads=heads)
    return config, GGUFCheckpoint(gguf, tensors)


def is_gguf_file(path) -> bool:
    """Whether ``path`` (a str or path; anything else is not) is a file that starts with GGUF's magic."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        if not is_file(path):  # a directory, a FIFO (which open() would wait on), a NUL in the name
            return False
        with open_regular(path) as f:
            return f.read(4) == MAGIC
    except (CheckpointError, OSError):
        return False
