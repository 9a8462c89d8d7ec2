"""Writing llama.cpp's GGUF files: any checkpoint llama_np reads, as F32, F16, BF16 or quantised.

The file is the one formats/gguf.py reads (its docstring draws the layout). From a checkpoint
directory it is written as llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama with
``gguf.GGUFWriter``:

    header      "GGUF", version 3, tensor count, metadata count
    metadata    general.architecture, general.type, general.name, general.size_label,
                llama.* (block_count … rope.dimension_count), general.file_type,
                tokenizer.ggml.* (model, pre, tokens, scores, token_type, special ids, add_bos/eos,
                chat_template, add_space_prefix), general.quantization_version
    tensor infos in the checkpoint's sorted Hugging Face names (what safetensors' keys() gives
                the converter), each at an offset that is a multiple of 32 from the data start
    data        each tensor's bytes, then zeros up to a multiple of 32

From a GGUF file in a float type, it is written as ``llama-quantize --pure`` writes it: the
source's metadata in its order and value types, then general.quantization_version and
general.file_type, and the tensors ordered by layer (those outside the layers first), each by
name.

Each tensor's type follows the converter's rule, which ``--pure`` shares: vectors (norms,
biases) are F32; a matrix is in the asked type, or F16 when its rows are not a whole number of
blocks (``gguf.quants`` refuses them and the converter falls back; llama-quantize stops). q_proj and k_proj rows are permuted into Meta's
interleaved RoPE layout (``layers.unpermute_rope_rows``, k_proj with the key/value head count),
the inverse of what the reader undoes. Values are widened to float32 first, then encoded by the
codec of their type (``weights.codecs``: a cast for the floats, weights/quants.py for the blocks).

The data is made one tensor at a time while the file is written, and the file is written
atomically (``files.atomic_write``): it appears whole or not at all.
"""

from __future__ import annotations

import math
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from llama_np import layers
from llama_np.config import LlamaConfig
from llama_np.errors import CheckpointError, InputError
from llama_np.formats import gguf
from llama_np.formats.files import atomic_write, is_file, read_json_object
from llama_np.formats.model_files import open_model_files
from llama_np.text import bpe
from llama_np.weights import gptq
from llama_np.weights.codecs import CODECS, F16, F32, LLAMA_FILE_TYPES, Q8_0, WRITTEN_TYPES, BlockCodec, Codec

VERSION = 3
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts of weights/quants.py
ENCODED_AT_A_TIME = 2**22  # numbers encoded at once: the encoders' temporaries stay near 100 MB
VALUE_TYPE_NUMBERS = {name: number for number, (name, _) in gguf.VALUE_TYPES.items()}
ARRAY_ITEM_TYPES = {np.dtype(fmt): name for name, fmt in (
    ("UINT8", "<u1"), ("INT8", "<i1"), ("UINT16", "<u2"), ("INT16", "<i2"), ("UINT32", "<u4"),
    ("INT32", "<i4"), ("FLOAT32", "<f4"), ("UINT64", "<u8"), ("INT64", "<i8"), ("FLOAT64", "<f8"))}


# ---------------------------------------------------------------------------- the bytes


def pack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def value_type(value) -> str:
    """The GGUF value type a metadata value is written as, as ``GGUFWriter`` chooses it: bool
    BOOL, int UINT32, float FLOAT32, str STRING, a list of str or a 1-D NumPy array ARRAY."""
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        if not 0 <= value < 2**32:
            raise InputError(f"GGUF metadata integer {value} is not a UINT32")
        return "UINT32"
    if isinstance(value, float):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, (list, np.ndarray)):
        return "ARRAY"
    raise InputError(f"cannot write {value!r:.60} as GGUF metadata")


def pack_value(value, kind: str | None = None) -> bytes:
    """A metadata value: its type (u32) and its bytes; ``kind`` (e.g. "INT32") overrides the
    type ``value_type`` would choose for a number."""
    kind = kind or value_type(value)
    return struct.pack("<I", VALUE_TYPE_NUMBERS[kind]) + pack_payload(value, kind)


def pack_payload(value, kind: str) -> bytes:
    if kind == "STRING":
        return pack_string(value)
    if kind != "ARRAY":
        return struct.pack(gguf.VALUE_TYPES[VALUE_TYPE_NUMBERS[kind]][1], value)
    if isinstance(value, list):  # strings
        if not all(isinstance(item, str) for item in value):
            raise InputError("a GGUF metadata list must hold strings (numbers go in a NumPy array)")
        return struct.pack("<IQ", VALUE_TYPE_NUMBERS["STRING"], len(value)) + b"".join(map(pack_string, value))
    item_type = "BOOL" if value.dtype == bool else ARRAY_ITEM_TYPES.get(value.dtype.newbyteorder("<"))
    if item_type is None or value.ndim != 1:
        raise InputError(f"cannot write a {value.ndim}-D array of {value.dtype} as GGUF metadata")
    items = value.astype(np.uint8 if item_type == "BOOL" else value.dtype.newbyteorder("<"))
    return struct.pack("<IQ", VALUE_TYPE_NUMBERS[item_type], len(value)) + items.tobytes()


@dataclass
class TensorToWrite:
    """One tensor of the file: its GGUF name, codec and NumPy shape, and how to get its float32
    values (called only while it is written, so one tensor is in memory at a time)."""

    name: str
    codec: Codec
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]
    source: str = ""  # the Hugging Face name it came from
    encoded: Callable[[], np.ndarray] | None = None  # its blocks made another way than the codec's (GPTQ)

    @property
    def nbytes(self) -> int:
        return self.codec.nbytes(self.shape)


def padding(size: int, alignment: int = gguf.DEFAULT_ALIGNMENT) -> bytes:
    return bytes(-size % alignment)


def alignment_of(metadata: dict) -> int:
    alignment = metadata.get("general.alignment", gguf.DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"general.alignment is {alignment!r}; expected a power of two")
    return alignment


def header_bytes(metadata: dict, tensors: list[TensorToWrite], value_types: dict | None = None) -> bytes:
    """Everything before the data: magic, counts, metadata, tensor infos, padding.
    ``value_types`` (key -> "INT32" …) overrides the type of a number."""
    value_types = value_types or {}
    alignment = alignment_of(metadata)
    parts = [gguf.MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    parts += [pack_string(key) + pack_value(value, value_types.get(key)) for key, value in metadata.items()]
    offset = 0
    for tensor in tensors:
        ne = tuple(reversed(tensor.shape))  # ne[0] is the row length
        parts.append(pack_string(tensor.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne,
                                                            tensor.codec.ggml_type, offset))
        offset += tensor.nbytes + len(padding(tensor.nbytes, alignment))
    header = b"".join(parts)
    return header + padding(len(header), alignment)


def write_gguf(path, metadata: dict, tensors: list[TensorToWrite], value_types: dict | None = None,
               progress: Callable[[int], None] | None = None) -> int:
    """Write a GGUF file of ``metadata`` (key -> value, in order) and ``tensors``, atomically.

    Returns the file's size. ``progress`` is called with the bytes written so far.
    """
    path = Path(path)
    header = header_bytes(metadata, tensors, value_types)
    alignment = alignment_of(metadata)

    def chunks():
        written = len(header)
        yield header
        for tensor in tensors:
            size = 0
            for data in encoded_chunks(tensor):
                size += data.nbytes
                yield data
            if size != tensor.nbytes:
                raise CheckpointError(f"{tensor.name} encoded to {size} bytes; {tensor.codec.name} "
                                      f"of shape {tensor.shape} takes {tensor.nbytes}")
            yield padding(size, alignment)
            written += size + len(padding(size, alignment))
            if progress:
                progress(written)

    atomic_write(path, chunks())
    return path.stat().st_size


def encoded_chunks(tensor: TensorToWrite):
    """A tensor's bytes, (n,) uint8 arrays: its own encoding, or its values through its codec a
    few rows at a time (small temporaries)."""
    if tensor.encoded is not None:
        yield np.ascontiguousarray(tensor.encoded()).reshape(-1).view(np.uint8)
        return
    values = tensor.values()
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    step = max(1, ENCODED_AT_A_TIME // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield np.ascontiguousarray(tensor.codec.encode(rows[start:start + step])).reshape(-1).view(np.uint8)


# ---------------------------------------------------------------------------- a Llama's metadata


GGUF_NAMES = {hf: name for name, hf in gguf.HF_NAMES.items()}  # Hugging Face -> llama.cpp
GGUF_LAYER_NAMES = {hf: name for name, hf in gguf.HF_LAYER_NAMES.items()}
HF_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
SKIPPED = ("rotary_emb.inv_freq",)  # recomputed from the config, as the converter skips it


def gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (``gguf.hf_name``
    undone); None for a tensor llama.cpp has no name for."""
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    match = HF_LAYER_NAME.fullmatch(hf_name)
    if match and match[2] in GGUF_LAYER_NAMES:
        return f"blk.{match[1]}.{GGUF_LAYER_NAMES[match[2]]}.{match[3]}"
    return None


def title_of(directory_name: str) -> str:
    """general.name from a directory name, as ``gguf.Metadata.id_to_title``: words split at "-"
    and spaces, lower-case ones capitalised unless they are a version or start with a digit."""
    return " ".join(word.title() if word.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", word) else word
                    for word in directory_name.strip().replace("-", " ").split())


def size_label(parameters: int) -> str:
    """general.size_label, as ``gguf.size_label``: 3795200 -> "3.8M", 6738415616 -> "6.7B"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if parameters > scale:
            break
    else:
        scale, suffix = 1e3, "K"
    scaled = parameters / scale
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


def llama_metadata(config: LlamaConfig, codec: Codec, name: str, parameters: int) -> dict:
    """general.* and llama.* keys, in the converter's order (``Model.set_gguf_parameters`` and
    ``LlamaModel.set_gguf_parameters``): key_length/value_length only when the config gives
    head_dim itself, the RoPE scaling only when it is linear."""
    metadata = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": name,
        "general.size_label": size_label(parameters),
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.freq_base": float(config.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    }
    if not config.__dict__.get("_head_dim_derived"):  # head_dim given, not hidden_size // heads
        metadata["llama.attention.key_length"] = config.head_dim
        metadata["llama.attention.value_length"] = config.head_dim
    metadata["general.file_type"] = LLAMA_FILE_TYPES[codec.name]
    metadata["llama.vocab_size"] = config.vocab_size
    metadata["llama.rope.dimension_count"] = config.head_dim
    if config.rope_parameters.get("rope_type", "default") == "linear":
        metadata["llama.rope.scaling.type"] = "linear"
        metadata["llama.rope.scaling.factor"] = float(config.rope_parameters["factor"])
    return metadata


# ---------------------------------------------------------------------------- its vocabulary


# sentencepiece's piece types, which are also llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``: added tokens it makes control tokens anyway."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def sentencepiece_vocabulary(directory: Path, config: LlamaConfig) -> dict:
    """tokenizer.ggml.* from ``directory``'s tokenizer.model, tokenizer_config.json and
    added_tokens.json, as the converter's ``_set_vocab_sentencepiece`` and ``gguf.SpecialVocab``
    write them: ``vocab_size`` tokens (those past the model's are ``[PADi]``, unused), pieces
    typed normal/unknown/control/unused/byte (a user-defined piece counts as normal), added
    tokens with score −1000, special ids from config.json, add_bos/add_eos and the chat
    template from tokenizer_config.json."""
    model = bpe.read_model(directory / "tokenizer.model")
    size = config.vocab_size
    if len(model.pieces) > size:
        raise CheckpointError(f"{directory / 'tokenizer.model'} has {len(model.pieces)} pieces, more than "
                              f"the config's vocab_size {size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = np.full(size, -10000.0, dtype=np.float32)
    types = np.full(size, UNUSED, dtype=np.int32)
    for i, (piece, score, kind) in enumerate(zip(model.pieces, model.scores, model.types)):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    added = directory / "added_tokens.json"
    for token, token_id in (read_json_object(added).items() if is_file(added) else ()):
        if isinstance(token_id, int) and 0 <= token_id < size:
            tokens[token_id], scores[token_id], types[token_id] = token, -1000.0, USER_DEFINED
    settings_file = directory / "tokenizer_config.json"
    settings = read_json_object(settings_file) if is_file(settings_file) else {}
    for token_id, token in settings.get("added_tokens_decoder", {}).items():
        content, token_id = token["content"], int(token_id)
        special = token.get("special") or looks_special(content)
        tokens[token_id] = content if special else content.replace("\u2581", " ")
        types[token_id] = CONTROL if special else USER_DEFINED
        scores[token_id] = -1000.0
    vocabulary = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                  "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                  "tokenizer.ggml.token_type": types}
    vocabulary.update(special_token_ids(directory, config, settings, size))
    for kind in ("bos", "eos"):
        if isinstance(settings.get(f"add_{kind}_token"), bool):
            vocabulary[f"tokenizer.ggml.add_{kind}_token"] = settings[f"add_{kind}_token"]
    if isinstance(settings.get("chat_template"), str):
        vocabulary["tokenizer.chat_template"] = settings["chat_template"]
    if "add_prefix_space" in settings:
        vocabulary["tokenizer.ggml.add_space_prefix"] = bool(settings["add_prefix_space"])
    return vocabulary


# gguf.SpecialVocab's special token kinds, in its order, and their GGUF keys' spelling
SPECIAL_TOKEN_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "sep": "seperator", "pad": "padding",
                      "cls": "cls", "mask": "mask"}


def special_token_ids(directory: Path, config: LlamaConfig, settings: dict, size: int) -> dict:
    """tokenizer.ggml.<kind>_token_id as ``gguf.SpecialVocab`` finds them: first the
    ``<kind>_token`` of tokenizer_config.json looked up among tokenizer.json's added tokens,
    then config.json's ``<kind>_token_id`` for the kinds still missing; ids past the vocabulary
    are left out."""
    found = {}
    tokenizer_json = directory / "tokenizer.json"
    added = read_json_object(tokenizer_json).get("added_tokens", []) if is_file(tokenizer_json) else []
    for kind in SPECIAL_TOKEN_KEYS:
        entry = settings.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        token_id = next((token.get("id") for token in added if token.get("content") == content), None)
        if isinstance(content, str) and isinstance(token_id, int) and 0 <= token_id < size:
            found[kind] = token_id
    for kind in SPECIAL_TOKEN_KEYS:
        token_id = getattr(config, f"{kind}_token_id", None)
        if kind not in found and isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < size:
            found[kind] = token_id
    return {f"tokenizer.ggml.{SPECIAL_TOKEN_KEYS[kind]}_token_id": token_id for kind, token_id in found.items()}


def vocabulary_of(checkpoint, config: LlamaConfig) -> dict:
    """The tokenizer.* keys to write: those of the directory's tokenizer.model, or none (the file
    then runs with a tokenizer given apart)."""
    if is_file(checkpoint.directory / "tokenizer.model"):
        return sentencepiece_vocabulary(checkpoint.directory, config)
    return {}


def requantized_metadata(checkpoint: gguf.GGUFCheckpoint, codec: Codec) -> tuple[dict, dict]:
    """(metadata, value types) as llama-quantize writes them from a GGUF file: every key of the
    source in its order and type, then general.quantization_version and general.file_type
    moved to the end (``gguf_set_val_u32`` removes a key and appends it)."""
    moved = ("general.quantization_version", "general.file_type")
    metadata = {key: value for key, value in checkpoint.metadata.items() if key not in moved}
    metadata["general.quantization_version"] = QUANTIZATION_VERSION
    metadata["general.file_type"] = LLAMA_FILE_TYPES[codec.name]
    value_types = {key: kind for key, kind in checkpoint.value_types.items() if key not in moved}
    return metadata, value_types


# ---------------------------------------------------------------------------- quantising a model


@dataclass
class QuantizeResult:
    """What ``quantize_to_gguf`` wrote."""

    path: Path
    type: str  # the asked type, e.g. "Q4_0"
    tensors: list[TensorToWrite] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # matrices kept in F16: rows not whole blocks
    bytes: int = 0
    has_tokenizer: bool = False
    seconds: float = 0.0

    def types(self) -> dict[str, int]:
        """Tensor count by type, in the order first written."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.codec.name] = counts.get(tensor.codec.name, 0) + 1
        return counts


def tensor_codec(name: str, shape: tuple, codec: Codec) -> Codec:
    """The type the converter stores a tensor in for a file of ``codec`` (``prepare_tensors``)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or codec is F32:
        return F32
    if isinstance(codec, BlockCodec) and codec.row_problem(shape[-1]):
        return F16
    return codec


def llama_quantize_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order (``weight_name_comparer``): by layer, the tensors outside
    the layers first, then by name: output.weight, output_norm.weight, token_embd.weight, blk.0.…"""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match[1]) if match else -1, name)


def plan_tensors(config: LlamaConfig, checkpoint, codec: Codec) -> list[TensorToWrite]:
    """Every tensor of ``checkpoint`` as it is written: GGUF name, type, and its values (q/k rows
    permuted into Meta's interleaved layout), in sorted Hugging Face order — the converter's —
    or, from a GGUF file, in llama-quantize's order."""
    rope_heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    tensors = []
    for hf in sorted(checkpoint.tensors):
        stored = checkpoint.tensors[hf]
        if hf.endswith(SKIPPED):
            continue
        name = gguf_name(hf)
        if name is None:
            raise CheckpointError(f"{stored.file}: tensor {hf!r} has no llama.cpp name; a GGUF Llama holds "
                                  "the embedding, the decoder layers, the final norm and lm_head only")
        if isinstance(CODECS[stored.dtype], BlockCodec):
            raise CheckpointError(f"{stored.file}: tensor {hf!r} is already quantised ({stored.dtype}); "
                                  "quantise from the float checkpoint it was made from")
        heads = next((h for part, h in rope_heads.items() if f".{part}." in hf), None)
        tensors.append(TensorToWrite(name, tensor_codec(name, stored.shape, codec), tuple(stored.shape),
                                     lambda stored=stored, heads=heads: file_values(stored, heads), source=hf))
    if isinstance(checkpoint, gguf.GGUFCheckpoint):
        tensors.sort(key=lambda tensor: llama_quantize_order(tensor.name))
    return tensors


def file_values(stored, rope_heads: int | None) -> np.ndarray:
    """A tensor's float32 values as the file holds them: q/k rows in Meta's interleaved order."""
    values = stored.numpy(np.float32)
    if rope_heads is None:
        return values
    rows = values.reshape(values.shape[0], -1)  # a bias is one number a row
    return layers.unpermute_rope_rows(rows, rope_heads).reshape(values.shape)


def quantize_to_gguf(model, out_path, type: str = Q8_0.name, *, name: str | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     calibration: dict[str, np.ndarray] | None = None, act_order: bool = False) -> QuantizeResult:
    """Write ``model`` (a checkpoint directory, bundled name or GGUF file llama_np reads) as the
    GGUF file ``out_path`` of ``type`` (one of ``WRITTEN_TYPES``: F32, F16, BF16, Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1): from a directory as llama.cpp's ``convert_hf_to_gguf.py --outtype``
    writes it, from a GGUF file (in a float type) as ``llama-quantize --pure`` writes it — the
    file's own metadata, file_type and quantization_version last, tensors by layer.

    ``name`` is general.name; by default the source's (a GGUF file's own, else its directory's
    name in title case, as the converter derives it). ``progress(bytes written, total)`` is
    called after each tensor. Nothing is written if anything fails.

    ``calibration`` (Hugging Face weight name -> that linear layer's inputs (..., columns), e.g.
    from ``calibration_inputs``) quantises those matrices with GPTQ (``weights.gptq``, with
    ``act_order`` if asked) instead of round-to-nearest; the type must be Q4_0 or Q4_1, and
    the file is an ordinary one of that type. Matrices without inputs (the embedding) and those
    kept in F16 are written as without it.
    """
    started = time.perf_counter()
    if type not in WRITTEN_TYPES:
        raise InputError(f"cannot write GGUF type {type!r}; llama_np writes {', '.join(WRITTEN_TYPES)}")
    codec = CODECS[type]
    config, checkpoint = open_model_files(model)
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise CheckpointError(f"{checkpoint.directory}: RoPE type {rope_type!r} is not written to GGUF by llama_np "
                              "(it writes the default and linear ones)")
    tensors = plan_tensors(config, checkpoint, codec)
    if calibration is not None:
        use_gptq(tensors, codec, calibration, act_order)
    if isinstance(checkpoint, gguf.GGUFCheckpoint):  # llama-quantize's way: the file's own keys
        metadata, value_types = requantized_metadata(checkpoint, codec)
        if name is not None:
            metadata["general.name"] = name
    else:  # convert_hf_to_gguf.py's way
        name = name if name is not None else title_of(Path(checkpoint.directory).resolve().name)
        metadata = llama_metadata(config, codec, name, sum(math.prod(tensor.shape) for tensor in tensors))
        metadata.update(vocabulary_of(checkpoint, config))
        metadata["general.quantization_version"] = QUANTIZATION_VERSION
        value_types = {}
    out_path = Path(out_path)
    alignment = alignment_of(metadata)
    total = len(header_bytes(metadata, tensors, value_types)) + sum(
        t.nbytes + len(padding(t.nbytes, alignment)) for t in tensors)
    size = write_gguf(out_path, metadata, tensors, value_types,
                      progress=(lambda done: progress(done, total)) if progress else None)
    fallbacks = [t.source for t in tensors if isinstance(codec, BlockCodec) and t.codec is F16]
    has_tokenizer = any(key.startswith("tokenizer.ggml.") for key in metadata)
    return QuantizeResult(out_path, type, tensors, fallbacks, size, has_tokenizer, time.perf_counter() - started)


# ---------------------------------------------------------------------------- GPTQ


CALIBRATION_HOOKS = ("ln1.hook_normalized", "attn.hook_z", "ln2.hook_normalized", "mlp.hook_post",
                     "ln_final.hook_normalized")


def calibration_inputs(model, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """What every linear layer of ``model`` (a ``LlamaForCausalLM``) sees on ``input_ids`` (B, T):
    Hugging Face weight name -> its inputs (B·T, columns) float32, read from one traced forward.

    q/k/v_proj see ``ln1.hook_normalized`` times the input norm's weight, o_proj ``attn.hook_z``
    with its heads side by side, gate/up_proj ``ln2.hook_normalized`` times the post-attention
    norm's weight, down_proj ``mlp.hook_post``, lm_head ``ln_final.hook_normalized`` times the
    final norm's weight.
    """
    _, cache = model.run_with_cache(input_ids, names_filter=lambda name: name.endswith(CALIBRATION_HOOKS))
    weights, prefix = model.weights, model.base_prefix

    def flat(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32).reshape(-1, math.prod(x.shape[2:]))  # (B, T, ...) -> (B·T, columns)

    inputs = {}
    for layer in range(model.config.num_hidden_layers):
        block, stem = f"blocks.{layer}", f"{prefix}layers.{layer}"
        attention_in = flat(cache[f"{block}.ln1.hook_normalized"] * weights[f"{stem}.input_layernorm.weight"])
        mlp_in = flat(cache[f"{block}.ln2.hook_normalized"] * weights[f"{stem}.post_attention_layernorm.weight"])
        for part in ("q_proj", "k_proj", "v_proj"):
            inputs[f"{stem}.self_attn.{part}.weight"] = attention_in
        inputs[f"{stem}.self_attn.o_proj.weight"] = flat(cache[f"{block}.attn.hook_z"])  # (B, T, H, hd)
        inputs[f"{stem}.mlp.gate_proj.weight"] = inputs[f"{stem}.mlp.up_proj.weight"] = mlp_in
        inputs[f"{stem}.mlp.down_proj.weight"] = flat(cache[f"{block}.mlp.hook_post"])
    inputs["lm_head.weight"] = flat(cache["ln_final.hook_normalized"] * weights[f"{prefix}norm.weight"])
    return inputs


def use_gptq(tensors: list[TensorToWrite], codec: Codec, calibration: dict[str, np.ndarray],
             act_order: bool) -> None:
    """Make every matrix of ``codec`` with calibration inputs encode itself with GPTQ."""
    if codec not in gptq.TYPES:
        raise InputError(f"GPTQ writes {' or '.join(c.name for c in gptq.TYPES)} blocks, not {codec.name}")
    for tensor in tensors:
        inputs = calibration.get(tensor.source)
        if inputs is not None and tensor.codec is codec:
            tensor.encoded = lambda tensor=tensor, inputs=inputs: gptq.gptq_quantize(
                tensor.values(), inputs, codec, act_order=act_order)
