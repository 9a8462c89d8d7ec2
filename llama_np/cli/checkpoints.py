"""``llama-np inspect``, ``llama-np convert`` and ``llama-np quantize``: the verbs about a
checkpoint itself rather than what it computes -- a summary of its config, storage and memory,
Meta's layout turned into Hugging Face's, and any checkpoint written as a (quantised) GGUF file.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from llama_np.cli.common import (EXIT_OK, UsageError, label_names, load_model, load_with_tokenizer, model_class_for,
                                 plural)
from llama_np.formats.convert import convert_meta_checkpoint
from llama_np.formats.gguf_writer import calibration_inputs, quantize_to_gguf
from llama_np.weights.codecs import CODECS
from llama_np.weights.gptq import TYPES as GPTQ_TYPES
from llama_np.weights.memory import human_bytes
from llama_np.inputs import attention_bytes
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification
from llama_np.perplexity import read_text_file
from llama_np.weights.memory import keep_widened_limit, streamed_widened_budget

# ============================================================================================
# inspect
# ============================================================================================


def activation_bytes(config, length: int, head_width: int, itemsize: int = 4) -> dict[str, int]:
    """A rough peak of what one forward pass over ``length`` tokens (batch 1) holds besides the
    weights: the key/value cache of every layer, one layer's attention scores and weights (from
    ``inputs.attention_bytes``), one layer's MLP intermediates, a few (T, D) residual-stream
    arrays, and the head's output (T, head_width): the logits over the vocabulary, or the
    per-position class scores."""
    T, D, I, V = length, config.hidden_size, config.intermediate_size, head_width
    KV, hd, L = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    attention = attention_bytes(config, 1, T, T, itemsize)
    return {
        "key/value cache": 2 * L * KV * hd * T * itemsize,
        "attention scores + weights (one layer)": attention["scores"] + attention["weights"],
        "MLP gate, up, product (one layer)": 3 * T * I * itemsize,
        "hidden states (a few T x D)": 4 * T * D * itemsize,
        ("logits (T x V)" if head_width == config.vocab_size else "class scores (T x labels)"): T * V * itemsize,
    }


def run_inspect(args) -> int:
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be at least 1, got {args.seq_len}")
    model_class = model_class_for(args.model)
    model = load_model(model_class, args.model)
    classifier = model_class is LlamaForSequenceClassification
    print(f"model            {args.model} ({model.checkpoint.directory})")
    print(f"class            {model_class.__name__}")
    print(f"layout           {model.checkpoint.layout}")
    print_architecture(model.config, classifier)
    parameters = model.num_parameters()
    print(f"parameters       {parameters:,}")
    print_storage(model.checkpoint)
    length = model.config.max_position_embeddings if args.seq_len is None else args.seq_len
    streamable = any(CODECS[dtype].streamed for dtype in model.checkpoint.storage_dtypes)
    print_memory(model.config, parameters, model.checkpoint.nbytes, length, classifier, streamable)
    return EXIT_OK


def print_architecture(config, classifier: bool) -> None:
    print(f"layers           {config.num_hidden_layers}")
    print(f"hidden size      {config.hidden_size} (MLP intermediate {config.intermediate_size}, SwiGLU)")
    print(f"heads            {config.num_attention_heads} query, {config.num_key_value_heads} key/value, "
          f"head_dim {config.head_dim}")
    gqa = config.num_key_value_groups
    kind = ("multi-head attention" if gqa == 1 else
            "multi-query attention" if config.num_key_value_heads == 1 else "grouped-query attention")
    print(f"GQA ratio        {gqa}:1 ({plural(gqa, 'query head')} per key/value head; {kind})")
    print(f"vocabulary       {config.vocab_size}")
    print(f"max positions    {config.max_position_embeddings}")
    rope = dict(config.rope_parameters)
    rope_type, theta = rope.pop("rope_type"), rope.pop("rope_theta")
    scaling = ", ".join(f"{k}={v}" for k, v in rope.items()) or "none"
    print(f"RoPE             type {rope_type}, theta {theta:g}, scaling: {scaling}")
    print(f"rms_norm_eps     {config.rms_norm_eps:g}")
    print(f"tied embeddings  {config.tie_word_embeddings}; attention bias {config.attention_bias}; "
          f"MLP bias {config.mlp_bias}")
    print(f"token ids        bos {config.bos_token_id}, eos {config.eos_token_id}, pad {config.pad_token_id}")
    if classifier:
        print(f"labels           {', '.join(label_names(config))} (problem type {config.problem_type or 'inferred'})")


def print_storage(checkpoint) -> None:
    """The storage dtypes, then per dtype its bits per weight (a quantised type's scales
    included), tensors, numbers and bytes; a GGUF file's version and metadata count."""
    counts: dict[str, int] = {}
    numbers: dict[str, int] = {}
    stored: dict[str, int] = {}
    for tensor in checkpoint.tensors.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
        numbers[tensor.dtype] = numbers.get(tensor.dtype, 0) + math.prod(tensor.shape)
        stored[tensor.dtype] = stored.get(tensor.dtype, 0) + tensor.nbytes
    dtypes = ", ".join(f"{name} ({plural(n, 'tensor')})" for name, n in sorted(counts.items()))
    print(f"storage dtype    {dtypes}")
    for name in sorted(counts):
        print(f"  {name:<6} {CODECS[name].bits:>7g} bits/weight  {plural(counts[name], 'tensor'):>11}  "
              f"{numbers[name]:>15,} weights  {stored[name]:>15,} bytes")
    if hasattr(checkpoint, "metadata"):  # a GGUF file
        print(f"GGUF             version {checkpoint.version}, {plural(len(checkpoint.metadata), 'metadata key')}, "
              f"name {checkpoint.metadata.get('general.name', '(none)')!r}")
    file_bytes = sum(Path(f).stat().st_size for f in checkpoint.files)
    files = len(checkpoint.files)
    print(f"bytes on disk    {human_bytes(file_bytes)} ({file_bytes:,} bytes in "
          f"{plural(files, 'file')}; tensor data {checkpoint.nbytes:,})")


def print_memory(config, parameters: int, stored_bytes: int, length: int, classifier: bool,
                 streamable: bool) -> None:
    """The float32 weights plus ``activation_bytes``; a rough guide, not a measurement."""
    weights = parameters * 4
    head_width = config.num_labels if classifier else config.vocab_size
    activations = activation_bytes(config, length, head_width)
    print(f"memory (float32) about {human_bytes(weights + sum(activations.values()))} for one sequence of "
          f"{plural(length, 'token')}, batch 1:")
    print(f"  {'weights widened to float32':<40} {human_bytes(weights)}")
    for name, size in activations.items():
        print(f"  {name:<40} {human_bytes(size)}")
    limit = keep_widened_limit()
    if weights > limit and streamable:
        budget = streamed_widened_budget(stored_bytes)
        print(f"  (above {human_bytes(limit)}, half the memory available now, so not all kept widened: up to "
              f"{human_bytes(budget)} of the float16/bfloat16 matrices are, the rest are streamed from the "
              f"{human_bytes(stored_bytes)} memory-mapped file and widened tile by tile where they are used; "
              "private memory is then about that budget plus the activations, see docs/checkpoints.md)")
    print("  rough estimate: NumPy temporaries and the Python process itself are not counted")


# ============================================================================================
# convert
# ============================================================================================


def run_convert(args) -> int:
    """Meta's layout -> Hugging Face's (``llama_np.formats.convert.convert_meta_checkpoint``)."""
    result = convert_meta_checkpoint(args.meta_dir, args.out_dir, dtype=args.dtype,
                                     llama_version=args.llama_version)
    files = len(result.weight_files)
    print(f"wrote {result.tensors} tensors ({human_bytes(result.bytes)}, "
          f"{', '.join(sorted(result.dtypes))}) in {files} safetensors file{'s' if files != 1 else ''}, "
          f"with config.json, generation_config.json and the tokenizer, to {result.directory} "
          f"in {result.seconds:.1f} s")
    return EXIT_OK


# ============================================================================================
# quantize
# ============================================================================================


def gptq_calibration(args) -> dict:
    """--gptq: every linear layer's inputs on the first --calibration-tokens tokens of the text,
    run as sequences no longer than the model's max_position_embeddings."""
    if args.type not in (codec.name for codec in GPTQ_TYPES):
        raise UsageError(f"--gptq writes {' or '.join(codec.name for codec in GPTQ_TYPES)} blocks; "
                         f"--type is {args.type}")
    if args.calibration_tokens < 2:
        raise UsageError(f"--calibration-tokens must be at least 2, not {args.calibration_tokens}")
    model, tokenizer = load_with_tokenizer(LlamaForCausalLM, args.model)
    ids = tokenizer.encode(read_text_file(args.gptq))[:args.calibration_tokens]
    if len(ids) < 2:
        raise UsageError(f"{args.gptq} gives {len(ids)} token(s); GPTQ needs text to calibrate on")
    length = min(len(ids), model.config.max_position_embeddings)
    sequences = np.array(ids[:len(ids) // length * length]).reshape(-1, length)  # (B, T)
    print(f"GPTQ calibration: {sequences.size} tokens of {args.gptq} in {len(sequences)} "
          f"sequence(s) of {length}", file=sys.stderr)
    return calibration_inputs(model, sequences)


def run_quantize(args) -> int:
    """Any checkpoint -> a GGUF file of --type (``llama_np.formats.gguf_writer.quantize_to_gguf``)."""
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the GGUF file to write, e.g. {out / 'model.gguf'}")
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\rwriting {out.name}: {human_bytes(done)} of {human_bytes(total)}", end=end, file=sys.stderr, flush=True)

    calibration = gptq_calibration(args) if args.gptq else None
    result = quantize_to_gguf(args.model, out, args.type, name=args.name, progress=progress if show else None,
                              calibration=calibration, act_order=args.act_order)
    types = ", ".join(f"{name} {count}" for name, count in result.types().items())
    print(f"wrote {result.path}: {plural(len(result.tensors), 'tensor')} ({types}), "
          f"{human_bytes(result.bytes)}, in {result.seconds:.1f} s")
    if result.fallbacks:
        codec = CODECS[args.type]
        count = len(result.fallbacks)
        print(f"kept in F16, as llama.cpp's converter does: {count} {'matrix' if count == 1 else 'matrices'} "
              f"whose rows are not a multiple of {codec.block_size} numbers ({', '.join(result.fallbacks)})")
    if not result.has_tokenizer:
        print("no tokenizer.ggml.* written: the checkpoint has no tokenizer.model; give a tokenizer "
              "of the same vocabulary when running it")
    return EXIT_OK
