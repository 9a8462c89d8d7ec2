"""Meta's original Llama 2 checkpoints, read as they are downloaded (docs/reference.md §9).

A download from Meta holds ``consolidated.00.pth`` … (one file per model-parallel shard: 1 for
7B, 2 for 13B, 8 for 70B), ``params.json`` and ``tokenizer.model``. This module turns that
directory into what the rest of llama_np reads, a ``LlamaConfig`` and a ``Checkpoint`` of
tensors under Hugging Face's names, without converting anything up front:

- ``params.json`` -> ``LlamaConfig``, with the values Transformers' converter writes
  (``meta_config``);
- each Hugging Face tensor is a ``MetaTensor``: the Meta tensor of every shard, joined and with
  q/k rows permuted from Meta's interleaved RoPE layout to rotate-half, computed when it is used
  (so a 70B model is never merged in memory; one weight at a time is).

``open_model_files`` says which of the three layouts a directory holds and opens it.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.text.bpe import read_model
from llama_np.formats.safetensors import Checkpoint, StoredTensor
from llama_np.formats.files import is_file, read_json_object
from llama_np.config import CONFIG_FILE, LlamaConfig
from llama_np.errors import CheckpointError, ConfigError
from llama_np.formats.torch_pickle import read_torch_file
from llama_np.weights.codecs import CODECS

PARAMS_FILE = "params.json"
VOCAB_FILE_NAME = "tokenizer.model"
MISSING = object()  # a required params.json field
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")

# Transformers' converter (convert_llama_weights_to_hf.py, 4.45.2): max_position_embeddings by
# Llama version, and 16384 for a Llama 1/2 model with rope_theta above 10000 (Code Llama).
CONTEXT_LENGTH_FOR_VERSION = {"1": 2048, "2": 4096}
LONG_CONTEXT_LENGTH = 16384
DEFAULT_LLAMA_VERSION = "2"

# params.json fields that do not change the weights or the config (Meta's inference settings).
IGNORED_PARAMS = {"max_batch_size", "max_seq_len"}

# How Meta's model-parallel training split each weight (docs/reference.md §9.2).
ROWS = "rows"  # column-parallel layers: split by output features, joined along dim 0
COLUMNS = "columns"  # row-parallel layers and the embedding: split by input features, dim 1
REPLICATED = "replicated"  # the norms: the same vector in every shard


# --------------------------------------------------------------------------------------------
# params.json -> LlamaConfig
# --------------------------------------------------------------------------------------------


def compute_intermediate_size(dim: int, ffn_dim_multiplier: float = 1, multiple_of: int = 256) -> int:
    """The MLP width Meta's code builds and Transformers' converter recomputes (§9.3):

        multiple_of · ceil(int(ffn_dim_multiplier · int(8·dim/3)) / multiple_of)

    i.e. 2/3 of 4·dim, scaled, rounded up to a multiple of ``multiple_of`` (7B: 4096 -> 11008).
    """
    return multiple_of * ((int(ffn_dim_multiplier * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)


# Bounds on params.json's numbers, far beyond any Llama (405B: dim 16384, 126 layers,
# ffn_dim_multiplier 1.2), so that the sizes computed from them stay ordinary numbers: dim=10**400
# or ffn_dim_multiplier=1e308 overflowed float arithmetic in compute_intermediate_size.
MAX_PARAMS_INT = 2**31 - 1
MAX_FFN_DIM_MULTIPLIER = 64.0


def _short(value) -> str:
    """A params.json value for an error message: a huge int by its digit count, not its digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(value)):,} digits" if value.bit_length() < 20_000 else "a huge integer"
    return f"{value!r:.80}"


@dataclass(frozen=True)
class MetaParams:
    """The fields of params.json, validated; defaults are those of Meta's ModelArgs."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    vocab_size: int  # -1: as many as the tokenizer has


def read_params(path) -> MetaParams:
    """Read and check params.json; a missing or bad field is a ConfigError naming it."""
    path = Path(path)
    values = read_json_object(path, ConfigError)
    if isinstance(values.get("model"), dict):  # some releases nest the fields under "model"
        values = values["model"]

    def fail(message):
        raise ConfigError(f"{path}: {message}")

    def positive_int(name, default=None):
        if name not in values or values[name] is None:
            if default is None:
                fail(f"the field {name!r} is missing; Meta's params.json gives it")
            return default
        value = values[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            fail(f"{name} must be a positive integer, got {_short(value)}")
        if value > MAX_PARAMS_INT:
            fail(f"{name} must be at most {MAX_PARAMS_INT:,}, got {_short(value)}")
        return value

    def positive_number(name, default=None, largest=float(MAX_PARAMS_INT)):
        value = values.get(name)
        if value is None:
            if default is MISSING:
                fail(f"the field {name!r} is missing; Meta's params.json gives it")
            return default
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value > 0):
            fail(f"{name} must be a positive number, got {_short(value)}")
        if value > largest:
            fail(f"{name} must be at most {largest:g}, got {_short(value)}")
        return float(value)

    if "use_scaled_rope" in values or values.get("vocab_size") == 128256:
        fail("this is a Llama 3 checkpoint (use_scaled_rope / a 128256-token vocabulary); "
             "llama_np reads Llama 1 and 2 (and Code Llama) from Meta's layout")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "vocab_size"}
    unknown = sorted(set(values) - known - IGNORED_PARAMS)
    if unknown:
        warnings.warn(f"{path} has fields llama_np does not know, ignored: {', '.join(unknown)}",
                      stacklevel=3)
    params = MetaParams(
        dim=positive_int("dim"),
        n_layers=positive_int("n_layers"),
        n_heads=positive_int("n_heads"),
        n_kv_heads=None if values.get("n_kv_heads") is None else positive_int("n_kv_heads"),
        multiple_of=positive_int("multiple_of", 256),
        ffn_dim_multiplier=positive_number("ffn_dim_multiplier", largest=MAX_FFN_DIM_MULTIPLIER),
        norm_eps=positive_number("norm_eps", MISSING),
        rope_theta=positive_number("rope_theta", 10000.0, largest=1e30),
        vocab_size=values.get("vocab_size", -1),
    )
    if not (isinstance(params.vocab_size, int) and not isinstance(params.vocab_size, bool)
            and (params.vocab_size == -1 or params.vocab_size > 0)):
        fail(f"vocab_size must be -1 (as many as the tokenizer has) or a positive integer, got "
             f"{params.vocab_size!r:.80}")
    if params.dim % params.n_heads:
        fail(f"n_heads={params.n_heads} does not divide dim={params.dim}")
    if params.n_kv_heads is not None and params.n_heads % params.n_kv_heads:
        fail(f"n_kv_heads={params.n_kv_heads} does not divide n_heads={params.n_heads}")
    return params


def meta_config(params: MetaParams, vocab_size: int, llama_version: str = DEFAULT_LLAMA_VERSION,
                torch_dtype: str | None = None) -> LlamaConfig:
    """The LlamaConfig Transformers' converter writes for these params (4.45.2's write_model).

    ``llama_version`` ("1" or "2") sets max_position_embeddings, which params.json does not
    record: 2048 for Llama 1, 4096 for Llama 2, 16384 when rope_theta is above 10000.
    """
    if llama_version not in CONTEXT_LENGTH_FOR_VERSION:
        raise ConfigError(f"llama_version must be one of {sorted(CONTEXT_LENGTH_FOR_VERSION)}, "
                          f"got {llama_version!r}")
    if params.rope_theta > 10000.0:
        max_positions = LONG_CONTEXT_LENGTH
    else:
        max_positions = CONTEXT_LENGTH_FOR_VERSION[llama_version]
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=params.dim,
        intermediate_size=compute_intermediate_size(
            params.dim, params.ffn_dim_multiplier or 1, params.multiple_of),
        num_attention_heads=params.n_heads,
        num_hidden_layers=params.n_layers,
        num_key_value_heads=params.n_kv_heads or params.n_heads,
        rms_norm_eps=params.norm_eps,
        vocab_size=vocab_size,
        rope_theta=params.rope_theta,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=torch_dtype,
    )


def tokenizer_vocab_size(directory: Path, params_path: Path) -> int:
    """vocab_size -1 in params.json: the number of pieces of the directory's tokenizer.model."""
    vocab_file = directory / VOCAB_FILE_NAME
    if not is_file(vocab_file):
        raise ConfigError(
            f"{params_path} has vocab_size -1 (as many as the tokenizer has), but {directory} has "
            f"no {VOCAB_FILE_NAME}; Meta's download keeps it in the folder above the model's: copy "
            "or link it next to params.json")
    # Transformers' converter takes len(tokenizer): the pieces, special tokens among them.
    return len(read_model(vocab_file).pieces)


# --------------------------------------------------------------------------------------------
# Shards -> tensors under Hugging Face's names
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaTensor(StoredTensor):
    """One Hugging Face tensor made, on use, from the same Meta tensor in every shard.

    ``stored()`` joins the shards' tensors (``join``: ROWS, COLUMNS or REPLICATED) and, for
    q_proj/k_proj, permutes each head's rows from Meta's interleaved RoPE layout to rotate-half
    (``rope_heads`` heads; §3.6, ``layers.permute_rope_rows``). A single shard's unpermuted tensor
    is its memory mapping itself, no copy. The inherited ``numpy()`` widens that result as for
    any stored tensor; the inherited file fields point at the first shard's tensor.
    """

    parts: tuple[StoredTensor, ...] = field(default=(), repr=False, compare=False)
    join: str = ROWS
    rope_heads: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the files (one copy of a replicated tensor)."""
        return self.parts[0].nbytes if self.join == REPLICATED else sum(p.nbytes for p in self.parts)

    def stored(self) -> np.ndarray:
        """The joined, permuted tensor in its storage dtype (BF16 as uint16 bits), ``self.shape``."""
        return self.combine([part.stored() for part in self.parts])

    def combine(self, pieces: list[np.ndarray]) -> np.ndarray:
        """The tensor from its parts' stored values, one array per shard, however they were read."""
        if self.join == REPLICATED:
            for part, piece in zip(self.parts[1:], pieces[1:]):
                if not np.array_equal(piece, pieces[0]):
                    raise CheckpointError(
                        f"{part.name} differs between {self.parts[0].file.name} and "
                        f"{part.file.name}; every shard of one checkpoint holds the same norms, so "
                        "these shards come from different checkpoints")
            joined = pieces[0]
        elif len(pieces) == 1:
            joined = pieces[0]
        else:
            joined = np.concatenate(pieces, axis=0 if self.join == ROWS else 1)
        if self.rope_heads is not None:
            joined = layers.permute_rope_rows(joined, self.rope_heads)
        return joined


def tensor_plan(config: LlamaConfig) -> dict[str, tuple[str, str, int | None]]:
    """Hugging Face name -> (Meta name, how the shards join, heads to permute or None), in the
    order Transformers saves them (§9.1)."""
    plan = {"model.embed_tokens.weight": ("tok_embeddings.weight", COLUMNS, None)}
    H, KV = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        plan.update({
            hf + "self_attn.q_proj.weight": (meta + "attention.wq.weight", ROWS, H),
            hf + "self_attn.k_proj.weight": (meta + "attention.wk.weight", ROWS, KV),
            hf + "self_attn.v_proj.weight": (meta + "attention.wv.weight", ROWS, None),
            hf + "self_attn.o_proj.weight": (meta + "attention.wo.weight", COLUMNS, None),
            hf + "mlp.gate_proj.weight": (meta + "feed_forward.w1.weight", ROWS, None),
            hf + "mlp.up_proj.weight": (meta + "feed_forward.w3.weight", ROWS, None),
            hf + "mlp.down_proj.weight": (meta + "feed_forward.w2.weight", COLUMNS, None),
            hf + "input_layernorm.weight": (meta + "attention_norm.weight", REPLICATED, None),
            hf + "post_attention_layernorm.weight": (meta + "ffn_norm.weight", REPLICATED, None),
        })
    plan["model.norm.weight"] = ("norm.weight", REPLICATED, None)
    plan["lm_head.weight"] = ("output.weight", ROWS, None)
    return plan


def shard_files(directory: Path) -> list[Path]:
    """consolidated.00.pth … consolidated.NN.pth, checked to be numbered 00 to NN with no gap."""
    numbered = {}
    for path in directory.glob("consolidated.*.pth"):
        match = SHARD_NAME.fullmatch(path.name)
        if match:
            numbered[int(match[1])] = path
    if not numbered:
        raise CheckpointError(f"{directory} has {PARAMS_FILE} but no consolidated.NN.pth shard files")
    missing = [f"consolidated.{n:02d}.pth" for n in range(max(numbered) + 1) if n not in numbered]
    if missing:
        raise CheckpointError(
            f"{directory} has shards up to consolidated.{max(numbered):02d}.pth but lacks "
            f"{', '.join(missing)}; a model-parallel checkpoint needs every shard")
    return [numbered[n] for n in sorted(numbered)]


def meta_tensors(config: LlamaConfig, shards: list[dict[str, StoredTensor]],
                 files: list[Path]) -> dict[str, MetaTensor]:
    """Every Hugging Face tensor as a MetaTensor, each shard's part checked against the config.

    Shapes are checked here, before anything is read, with messages in Meta's names: a shard
    that holds the wrong share of a weight means shards are missing, extra or from another model.
    """
    _check_layer_count(config, shards[0], files[0])
    expected = _merged_shapes(config)
    count = len(shards)
    tensors, used = {}, set()
    for hf_name, (meta_name, join, rope_heads) in tensor_plan(config).items():
        parts = []
        for shard, file in zip(shards, files):
            if meta_name not in shard:
                raise CheckpointError(f"{file} has no tensor {meta_name!r}, which every shard of a "
                                      f"Llama checkpoint with {config.num_hidden_layers} layers holds")
            parts.append(shard[meta_name])
        used.add(meta_name)
        shape = _joined_shape(parts, join, meta_name, files)
        if shape != expected[hf_name]:
            raise CheckpointError(_shape_message(meta_name, join, parts, files, shape,
                                                 expected[hf_name], count))
        if rope_heads is not None or meta_name.endswith("attention.wv.weight"):
            heads = rope_heads or config.num_key_value_heads
            if heads % count:
                raise CheckpointError(
                    f"{meta_name}: {heads} heads cannot be split evenly over {count} shards, so "
                    f"{len(files)} consolidated.NN.pth files cannot be one checkpoint of this model")
        first = parts[0]
        tensors[hf_name] = MetaTensor(hf_name, first.file, first.dtype, shape, first._mapped,
                                      first._start, first._stop, tuple(parts), join, rope_heads)
    _warn_unused(shards, files, used)
    return tensors


def _check_layer_count(config: LlamaConfig, shard: dict, file: Path) -> None:
    """Before listing every tensor of n_layers layers: a corrupt n_layers such as 10**9 would
    never finish that list."""
    stored = {name.split(".")[1] for name in shard if name.startswith("layers.")}
    if config.num_hidden_layers != len(stored):
        raise CheckpointError(f"{PARAMS_FILE} has n_layers={config.num_hidden_layers}, but {file} "
                              f"holds {len(stored)} layers (layers.N.*)")


def _merged_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        shapes.update({
            hf + "self_attn.q_proj.weight": (q_rows, D), hf + "self_attn.k_proj.weight": (kv_rows, D),
            hf + "self_attn.v_proj.weight": (kv_rows, D), hf + "self_attn.o_proj.weight": (D, q_rows),
            hf + "mlp.gate_proj.weight": (I, D), hf + "mlp.up_proj.weight": (I, D),
            hf + "mlp.down_proj.weight": (D, I), hf + "input_layernorm.weight": (D,),
            hf + "post_attention_layernorm.weight": (D,),
        })
    return shapes


def _joined_shape(parts: list[StoredTensor], join: str, meta_name: str, files: list[Path]) -> tuple:
    """The shape of the joined tensor; the parts must agree in dtype and in the other dimension."""
    dtypes = {part.dtype for part in parts}
    if len(dtypes) > 1:
        raise CheckpointError(f"{meta_name} is stored as {', '.join(sorted(dtypes))} in different "
                              f"shards ({', '.join(f.name for f in files)}); one checkpoint has one dtype")
    shapes = [part.shape for part in parts]
    if join == REPLICATED:
        if len(set(shapes)) > 1:
            raise CheckpointError(f"{meta_name} has shapes {shapes} in {', '.join(f.name for f in files)}; "
                                  "a norm is the same in every shard")
        return shapes[0]
    axis = 0 if join == ROWS else 1
    if any(len(shape) != 2 for shape in shapes) or len({shape[1 - axis] for shape in shapes}) > 1:
        raise CheckpointError(f"{meta_name} has shapes {shapes} in {', '.join(f.name for f in files)}; "
                              f"its shards must be matrices that differ only in dimension {axis}")
    joined = list(shapes[0])
    joined[axis] = sum(shape[axis] for shape in shapes)
    return tuple(joined)


def _shape_message(meta_name, join, parts, files, shape, expected, count) -> str:
    if join == REPLICATED:
        return f"{meta_name} has shape {shape}; params.json implies {expected}"
    axis = 0 if join == ROWS else 1
    what = "rows" if axis == 0 else "columns"
    per_shard = ", ".join(f"{f.name} {p.shape}" for f, p in zip(files, parts))
    if shape[1 - axis] == expected[1 - axis] and expected[axis] % max(parts[0].shape[axis], 1) == 0:
        needed = expected[axis] // max(parts[0].shape[axis], 1)
        return (f"{meta_name} is split by {what} over {count} shard{'s' if count != 1 else ''} "
                f"({per_shard}), {shape[axis]} {what} in all, but params.json implies {expected}: "
                f"shards of this size need {needed} consolidated.NN.pth files, the directory holds "
                f"{count}")
    return (f"{meta_name} joined from {per_shard} has shape {shape}; params.json implies "
            f"{expected}")


def _warn_unused(shards, files, used) -> None:
    # rope.freqs holds the RoPE frequencies, recomputed from rope_theta like every RoPE table.
    unused = sorted({name for shard in shards for name in shard} - used - {"rope.freqs"})
    if unused:
        warnings.warn(f"{files[0].parent} holds tensors a Llama checkpoint does not use, ignored: "
                      f"{', '.join(unused)}", stacklevel=4)


# --------------------------------------------------------------------------------------------
# Opening a directory in any of the three layouts
# --------------------------------------------------------------------------------------------


def _warn_identical_shards(shards: list[dict[str, StoredTensor]], files: list[Path]) -> None:
    """Warn when two model-parallel shards begin with the same bytes in every tensor (checked on
    a digest of the first 4 KiB of each): a shard copied over another loads, but as a different
    model."""
    if len(shards) < 2:
        return
    seen = {}
    for shard, file in zip(shards, files):
        digest = hashlib.sha256()
        for name in sorted(shard):
            digest.update(name.encode())
            digest.update(shard[name].stored().reshape(-1).view(np.uint8)[:4096])
        key = digest.digest()
        if key in seen:
            warnings.warn(f"{file.name} and {seen[key].name} hold the same bytes (the first 4 KiB of every "
                          "tensor): one looks like a copy of the other, and together they are not the "
                          "model Meta's shards make", stacklevel=4)
        seen.setdefault(key, file)


def is_meta_checkpoint(directory) -> bool:
    """Meta's layout: params.json beside consolidated.NN.pth, and no Hugging Face config.json."""
    directory = Path(directory)
    # config.json first, as LlamaConfig.from_pretrained looks for it: an unsearchable directory
    # is then the same ConfigError naming config.json whichever layout it holds.
    return not is_file(directory / CONFIG_FILE, ConfigError) and is_file(directory / PARAMS_FILE, ConfigError)


def open_meta_checkpoint(directory, llama_version: str = DEFAULT_LLAMA_VERSION
                         ) -> tuple[LlamaConfig, Checkpoint]:
    """The config and the tensors (Hugging Face names, memory-mapped, merged on use) of a Meta
    directory. Reads params.json, tokenizer.model (for vocab_size -1) and each shard's pickle."""
    directory = Path(directory)
    params_path = directory / PARAMS_FILE
    params = read_params(params_path)
    files = shard_files(directory)
    shards = [read_torch_file(file) for file in files]
    if params.vocab_size == -1:
        vocab_size = tokenizer_vocab_size(directory, params_path)
    else:
        vocab_size = params.vocab_size
    embedding = shards[0].get("tok_embeddings.weight")
    config = meta_config(params, vocab_size, llama_version,
                         torch_dtype=CODECS[embedding.dtype].torch_name if embedding else None)
    checkpoint = Checkpoint(directory, files, meta_tensors(config, shards, files))
    _warn_identical_shards(shards, files)
    checkpoint.layout = (f"Meta (params.json and {len(files)} consolidated.NN.pth shard"
                         f"{'s' if len(files) != 1 else ''}; q/k rows permuted and shards joined on use)")
    return config, checkpoint
