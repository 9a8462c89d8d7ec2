"""Converting Meta's original checkpoint into a Hugging Face directory, one tensor at a time.

Transformers' ``convert_llama_weights_to_hf.py`` unpickles every shard with torch and holds the
whole model in memory (twice, for a while). Here each output tensor is made from the memory-mapped
shards when it is written (``meta.MetaTensor``: shards joined, q/k rows permuted), converted to
the output dtype and written out, so the memory in use is a few tensors, whatever the model's
size. The output is what the converter writes (docs/reference.md §9.4), tensor for tensor:

    config.json                   Transformers' 4.x spelling, read by 4.x and 5.x alike
    generation_config.json        bos and eos token ids
    tokenizer.model, tokenizer_config.json, special_tokens_map.json
    model.safetensors             or model-0000i-of-0000n.safetensors shards of at most about
                                  5 GB with model.safetensors.index.json

Every file is written atomically (a temporary file, then a rename), config.json last, and a
conversion that fails removes what it wrote, so an output directory never holds half a model.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_np.config import CONFIG_FILE, LlamaConfig
from llama_np.errors import CheckpointError, InputError
from llama_np.inputs import is_integer
from llama_np.formats.files import atomic_write, atomic_write_text, is_file, open_regular
from llama_np.formats.meta import VOCAB_FILE_NAME, MetaTensor, is_meta_checkpoint, open_meta_checkpoint
from llama_np.formats.safetensors import INDEX_FILE_NAME, SINGLE_FILE_NAME, _encode_header
from llama_np.weights.codecs import BF16, CODECS, F16, F32

OUTPUT_DTYPES = {codec.torch_name: codec.name for codec in (F32, F16, BF16)}  # --dtype -> codec name
MAX_SHARD_BYTES = 5 * 10**9  # Transformers' save_pretrained default, max_shard_size="5GB"
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_ELEMENTS = 2**24  # values converted at a time: 64 MB of float32 temporaries


@dataclass
class ConversionResult:
    """What ``convert_meta_checkpoint`` wrote."""

    directory: Path
    files: list[Path] = field(default_factory=list)  # every file written, in order
    weight_files: list[Path] = field(default_factory=list)  # the safetensors files
    tensors: int = 0
    bytes: int = 0  # tensor bytes written
    dtypes: set[str] = field(default_factory=set)  # safetensors dtypes written
    seconds: float = 0.0


def convert_meta_checkpoint(meta_dir, out_dir, dtype: str | None = None, *,
                            llama_version: str = "2", max_shard_bytes: int = MAX_SHARD_BYTES,
                            progress: bool | None = None) -> ConversionResult:
    """Write Meta's checkpoint in ``meta_dir`` as a Hugging Face directory ``out_dir``.

    ``dtype`` is "bfloat16", "float16" or "float32"; None keeps the stored dtype (Meta ships
    bfloat16). float16 refuses, by name, a weight whose values overflow it (|x| > 65504).
    ``llama_version`` ("1" or "2") sets max_position_embeddings, which Meta's files do not
    record. ``out_dir`` must be new or empty. ``progress`` prints the bytes written so far on
    stderr; by default only when stderr is a terminal.
    """
    started = time.perf_counter()
    meta_dir, out_dir = Path(meta_dir), Path(out_dir)
    target = _output_dtype(dtype)
    if not is_integer(max_shard_bytes) or max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes must be a positive number of bytes (an int, e.g. 5 * 10**9), "
                         f"got {max_shard_bytes!r:.40}")
    if not is_meta_checkpoint(meta_dir):
        raise CheckpointError(f"{meta_dir} is not a Meta checkpoint directory: it needs params.json "
                              f"and consolidated.NN.pth files (and no {CONFIG_FILE})")
    config, checkpoint = open_meta_checkpoint(meta_dir, llama_version)
    _check_output_directory(out_dir)
    tensors = checkpoint.tensors
    out_dtypes = {name: target or tensor.dtype for name, tensor in tensors.items()}
    sizes = {name: CODECS[out_dtypes[name]].nbytes(tensor.shape)
             for name, tensor in tensors.items()}
    _check_disk_space(out_dir, sum(sizes.values()))
    shards = plan_shards(sizes, max_shard_bytes)
    result = ConversionResult(out_dir, tensors=len(tensors), bytes=sum(sizes.values()),
                              dtypes=set(out_dtypes.values()))
    show = _progress_printer(result.bytes, sys.stderr.isatty() if progress is None else progress)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result.files.extend(_write_tokenizer(meta_dir, out_dir))  # first: small, and fails fast
        done = 0
        for file_name, names in shards.items():
            path = out_dir / file_name
            write_safetensors_streaming(path, {name: tensors[name] for name in names}, out_dtypes,
                                        lambda nbytes: show(done + nbytes))
            done += sum(sizes[name] for name in names)
            result.files.append(path)
            result.weight_files.append(path)
        if len(shards) > 1:
            index = {"metadata": {"total_size": result.bytes},
                     "weight_map": {name: file for file, names in shards.items() for name in names}}
            result.files.append(out_dir / INDEX_FILE_NAME)
            atomic_write_text(result.files[-1], json.dumps(index, indent=2) + "\n")
        result.files.append(out_dir / "generation_config.json")
        atomic_write_text(result.files[-1], json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n")
        config.torch_dtype = CODECS[target].torch_name if target else config.torch_dtype
        result.files.append(out_dir / CONFIG_FILE)  # last: a directory with config.json is whole
        atomic_write_text(result.files[-1], json.dumps(hf_config_dict(config), indent=2) + "\n")
    except BaseException:
        for path in result.files:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        show(None)
    result.seconds = time.perf_counter() - started
    return result


def _output_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)} or None (keep the stored "
                         f"dtype), got {dtype!r}")
    return OUTPUT_DTYPES[dtype]


def _check_output_directory(out_dir: Path) -> None:
    """A new or empty directory: never overwrite or mix with another model's files."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise CheckpointError(f"{out_dir} is a symbolic link to {os.readlink(out_dir)}, which does not exist; "
                              "convert into a new or empty directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; the output of a conversion is a directory")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{parent} is a file, so {out_dir} cannot be made in it")
            break
    if out_dir.is_dir() and any(out_dir.iterdir()):
        present = sorted(entry.name for entry in out_dir.iterdir())
        shown = ", ".join(present[:6]) + (f" and {len(present) - 6} more" if len(present) > 6 else "")
        leftovers = [name for name in present if ".tmp" in name]
        why = (f"; {leftovers[0]} is the temporary file of a conversion that did not finish (it was "
               f"killed, or the disk filled): remove {out_dir} and convert again" if leftovers else "")
        raise CheckpointError(f"{out_dir} is not empty (it holds {shown}){why}; convert into a new or "
                              "empty directory, so that no file of another model is mixed in or overwritten")


def _check_disk_space(out_dir: Path, needed: int) -> None:
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CheckpointError(f"converting needs {needed / 1e9:.2f} GB for the weights, but the "
                              f"disk holding {existing} has {free / 1e9:.2f} GB free")


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names, in order, each file at most ``max_shard_bytes`` (unless one
    tensor alone is larger), as Transformers' save_pretrained fills its shards."""
    groups: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    if len(groups) == 1:
        return {SINGLE_FILE_NAME: groups[0]}
    count = len(groups)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": names for i, names in enumerate(groups)}


def write_safetensors_streaming(path: Path, tensors: dict, out_dtypes: dict[str, str],
                                progress=None) -> None:
    """Write one safetensors file whose tensors are made one at a time as they are written.

    ``tensors`` maps names to stored tensors (``.shape``, ``.dtype``, ``.stored()``). The
    header needs only names, dtypes and shapes; each tensor's bytes exist only while they are
    being written. Widest dtype first, then by name, as save_safetensors and the safetensors
    library order them, so each tensor is aligned to its item size.
    """
    order = sorted(tensors, key=lambda name: (-CODECS[out_dtypes[name]].stored_dtype.itemsize, name))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        nbytes = CODECS[out_dtypes[name]].nbytes(tensors[name].shape)
        header[name] = {"dtype": out_dtypes[name], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes

    def tensor_bytes():
        written = 0
        for name in order:
            for chunk in converted_chunks(tensors[name], out_dtypes[name]):
                yield chunk
                written += chunk.nbytes
                del chunk
                # The writer's loop variable still holds the chunk just written; an empty one
                # replaces it there, so it is freed before the next is made.
                yield b""
            if progress is not None:
                progress(written)

    atomic_write(path, itertools.chain([_encode_header(header)], tensor_bytes()))


def read_into_memory(tensor) -> np.ndarray:
    """``tensor.stored()``, but read from the file into a new array rather than from its mapping.

    A conversion reads every byte once. Read through the memory mapping, each page read stays
    mapped, and counted in the process's resident memory, until the end: the whole model. Read
    like this, the memory in use is the tensor being written, and a file that shrank since it
    was opened is an error rather than a crash.
    """
    if isinstance(tensor, MetaTensor):
        return tensor.combine([read_into_memory(part) for part in tensor.parts])
    codec = CODECS[tensor.dtype]
    count = codec.nbytes(tensor.shape)
    try:
        with open_regular(tensor.file) as f:
            f.seek(tensor._start)
            raw = np.fromfile(f, dtype=np.uint8, count=count)
    except OSError as error:
        raise CheckpointError(f"cannot read {tensor.name} from {tensor.file}: {error.strerror or error}") from None
    if raw.size != count:
        raise CheckpointError(f"{tensor.file} ends inside {tensor.name}: the file was truncated "
                              "since it was opened")
    return codec.view(raw, tensor.shape)


def converted_chunks(tensor, out_dtype: str):
    """A stored tensor's values in ``out_dtype`` (a codec name), as little-endian bytes:
    flat uint8 arrays, in order. The same dtype is the stored bits, one chunk; another dtype is
    converted via float32 CHUNK_ELEMENTS values at a time, so the temporaries stay small even
    for a 70B embedding."""
    stored = read_into_memory(tensor).reshape(-1)
    if tensor.dtype == out_dtype:
        yield stored.view(np.uint8)
        return
    for start in range(0, stored.size, CHUNK_ELEMENTS):
        yield convert_values(tensor.name, stored[start:start + CHUNK_ELEMENTS], tensor.dtype, out_dtype)


def convert_values(name: str, stored: np.ndarray, dtype: str, out_dtype: str) -> np.ndarray:
    """Flat stored values (BF16 as uint16 bits) -> the bytes of ``out_dtype``, via float32.

    A finite value that the narrower dtype cannot hold is a CheckpointError naming the tensor,
    never an infinity written to disk.
    """
    source, target = CODECS[dtype], CODECS[out_dtype]
    if source.streamed:  # a 16-bit float: exactly representable in float32
        values = source.decode(stored)
    else:
        with np.errstate(over="ignore"):  # F64 beyond float32: inf, refused below
            values = stored.astype(np.float32)
        _check_representable(name, stored, values, "float32")
    converted = target.encode(values)  # rounded to nearest even
    if converted.dtype.kind == "f":  # (bfloat16's bits are checked as float32 values were)
        _check_representable(name, values, converted, target.torch_name)
    return np.ascontiguousarray(converted).view(np.uint8)


def _check_representable(name: str, before: np.ndarray, after: np.ndarray, what: str) -> None:
    """CheckpointError if a finite value became infinite: it is too large for ``what``."""
    if not np.isinf(after).any():
        return
    overflowed = np.isinf(after) & np.isfinite(before)
    if overflowed.any():
        largest = float(np.abs(before[overflowed]).max())
        limit = FLOAT16_MAX if what == "float16" else float(np.finfo(np.float32).max)
        raise CheckpointError(
            f"{name} holds values too large for {what}: {largest:.6g}, beyond its largest "
            f"{limit:.6g}; keep the stored dtype or choose bfloat16 or float32")


def _write_tokenizer(meta_dir: Path, out_dir: Path) -> list[Path]:
    """tokenizer.model with tokenizer_config.json and special_tokens_map.json, if Meta's is there."""
    vocab_file = meta_dir / VOCAB_FILE_NAME
    if not is_file(vocab_file):
        return []
    from llama_np.text.tokenizer import LlamaTokenizer  # needs sentencepiece, which importing llama_np does not
    return [Path(p) for p in LlamaTokenizer(vocab_file).save_pretrained(out_dir)]


def hf_config_dict(config: LlamaConfig) -> dict:
    """config.json in Transformers' 4.x spelling (rope_theta, rope_scaling, torch_dtype).

    Transformers 5.x reads this spelling too, while 4.x would ignore a 5.x ``rope_parameters``
    and silently use rope_theta 10000 (Code Llama's is 1e6).
    """
    values = config.to_dict()
    rope = values.pop("rope_parameters")
    values["rope_theta"] = rope["rope_theta"]
    values["rope_scaling"] = config.rope_scaling
    values["torch_dtype"] = values.pop("dtype")
    for name in ("num_labels", "problem_type"):  # a causal LM's config has no labels
        values.pop(name, None)
    return dict(sorted(values.items()))


def _progress_printer(total: int, enabled: bool):
    """show(bytes done) rewrites one stderr line; show(None) ends it. Silent when disabled."""
    state = {"shown": False, "last": 0.0}

    def show(done):
        if not enabled:
            return
        if done is None:
            if state["shown"]:
                print(file=sys.stderr, flush=True)
            return
        now = time.monotonic()
        if now - state["last"] < 0.5 and done < total:
            return
        state.update(shown=True, last=now)
        print(f"\rconverting: {done / 1e9:.2f} of {total / 1e9:.2f} GB "
              f"({100 * done / max(total, 1):.0f}%)", end="", file=sys.stderr, flush=True)

    return show
