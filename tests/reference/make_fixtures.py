"""Write the stored reference fixtures: tiny random-weight Llama checkpoints + Transformers outputs.

Run from the repository root with the pinned reference environment (requirements.txt):

    python tests/reference/make_fixtures.py            # every case
    python tests/reference/make_fixtures.py gqa_f32    # only the named cases

Each case builds a tiny Llama with Transformers 5.x (seeded random weights, float32, eager
attention), saves it with save_pretrained, rewrites the weights for the storage dtype / sharding
and the config for the spelling the case is about, then loads the checkpoint *back from disk*
as float32 and records what Transformers computes. Reloading is the point: an f16 or bf16
checkpoint is rounded once when stored, and the reference must be computed with those rounded
weights, exactly what llama_np will read. The pretraining_tp case needs Transformers 4.45 and
lives in make_fixtures_tp.py.

Output: tests/data/fixtures/<case>/{config.json, *.safetensors, reference.npz} and
tests/data/fixtures/manifest.json. The tests in tests/test_fixtures.py read them without torch.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_io  # noqa: E402

SCRIPT = "tests/reference/make_fixtures.py"
MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "LlamaForSequenceClassification": LlamaForSequenceClassification}

# What each stored field holds; a case may override a key ("<call>.<field>") with its own text.
FIELD_DESCRIPTIONS = {
    "input_ids": "token ids given to the model, (B, T)",
    "attention_mask": "1 for a real token, 0 for padding, (B, T); only rows with 1 are compared",
    "labels": "causal-LM labels, (B, T): the input ids with some positions set to -100 (ignored)",
    "logits": "float32 logits, (B, T, V)",
    "loss": "causal-LM loss for `labels` (mean over the targets that are not -100), scalar",
    "hidden_states": "output_hidden_states: embeddings then every layer's output, the last after the "
    "final norm, stacked as (L + 1, B, T, D)",
    "attentions": "output_attentions: softmax weights of every layer, stacked as (L, B, H, T, S)",
    "logits_to_keep": "the logits_to_keep argument, scalar",
    "prefix_length": "number of tokens in the first (use_cache=True) call, scalar",
    "prefix_logits": "logits of the first call on input_ids[:, :prefix_length] with use_cache=True",
    "continuation_logits": "logits of the second call on input_ids[:, prefix_length:] with the first "
    "call's past_key_values",
    "full_logits": "logits of one uncached call on the whole input_ids; its last positions must "
    "equal continuation_logits",
    "max_new_tokens": "max_new_tokens given to generate, scalar",
    "eos_token_id": "eos_token_id given to generate (a list of ids)",
    "pad_token_id": "pad_token_id given to generate, scalar",
    "sequences": "generate(do_sample=False) output: prompt + new tokens, rows that hit eos padded "
    "with pad_token_id, (B, T + new)",
}


# ---------------------------------------------------------------------------------------------
# Building a checkpoint
# ---------------------------------------------------------------------------------------------


def tiny_config(**fields):
    """A tiny Llama config (5.x spelling); fields override the small defaults below."""
    defaults = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,  # Llama 2's value, not the class default 1e-6
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    defaults.update(fields)
    return LlamaConfig(**defaults)


def to_4x_spelling(config):
    """Rewrite a 5.x config.json dict in the spelling of Llama 2 checkpoints on the hub (4.x).

    rope_parameters {rope_theta, rope_type, ...} becomes a top-level rope_theta plus
    rope_scaling {"type": ..., ...} (or null for default RoPE); dtype becomes torch_dtype; head_dim
    is dropped because 4.x-era Llama 2 configs derive it from hidden_size / num_attention_heads.
    """
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    config["torch_dtype"] = config.pop("dtype")
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        raise ValueError("the 4.x spelling cannot express an explicit head_dim here")
    del config["head_dim"]
    del config["transformers_version"]
    return config


def write_checkpoint(case, model_class, config, seed, storage_dtype="float32", shards=1, spelling="5.x"):
    """Build, randomise, save and post-process one checkpoint; return (directory, files)."""
    fixture_io.seed_everything(seed)
    config._attn_implementation = "eager"
    model = MODEL_CLASSES[model_class](config)
    fixture_io.randomize_weights(model, seed)
    directory = fixture_io.fresh_case_directory(case)
    model.save_pretrained(directory, safe_serialization=True)
    fixture_io.remove_generation_config(directory)
    if config.tie_word_embeddings and "lm_head.weight" in fixture_io.read_stored_weights(directory):
        raise RuntimeError(f"{case}: tied embeddings but lm_head.weight was saved")
    fixture_io.rewrite_weights(directory, storage_dtype=storage_dtype, shards=shards)

    def edit(saved):
        saved["dtype"] = storage_dtype  # the config names the storage dtype, like hub checkpoints
        return to_4x_spelling(saved) if spelling == "4.x" else saved

    fixture_io.edit_config(directory, edit)
    return directory


def load_reference_model(directory, model_class):
    """The checkpoint as stored, read back by Transformers in float32 with eager attention."""
    model = MODEL_CLASSES[model_class].from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    fixture_io.check_loaded_weights_equal_stored(model, directory)
    return model


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def random_ids(rng, batch, length, vocab_size, low=0):
    """Uniform random token ids in [low, vocab_size), (batch, length) int64."""
    return rng.integers(low, vocab_size, size=(batch, length), dtype=np.int64)


def padding_mask(lengths, total, side):
    """(B, total) attention mask with `lengths[b]` ones, padding on the `side` ("left"/"right")."""
    mask = np.zeros((len(lengths), total), dtype=np.int64)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


def lm_labels(rng, input_ids, attention_mask, ignored_share=0.3):
    """Labels = input ids, with padding and a random share of positions set to -100."""
    labels = input_ids.copy()
    labels[rng.random(labels.shape) < ignored_share] = -100
    labels[attention_mask == 0] = -100
    labels[0, :3] = -100  # always some ignored targets at the start of row 0
    return labels


def tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------
# Calls whose results are stored
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def call_forward(model, name, input_ids, attention_mask, labels=None, with_states=False):
    """One forward pass; returns {"<name>.<field>": value}."""
    out = model(
        input_ids=tensor(input_ids),
        attention_mask=tensor(attention_mask),
        labels=None if labels is None else tensor(labels),
        output_hidden_states=with_states,
        output_attentions=with_states,
        use_cache=False,
    )
    arrays = {f"{name}.input_ids": input_ids, f"{name}.attention_mask": attention_mask, f"{name}.logits": out.logits}
    if labels is not None:
        arrays[f"{name}.labels"] = labels
        arrays[f"{name}.loss"] = out.loss
    if with_states:
        arrays[f"{name}.hidden_states"] = torch.stack(out.hidden_states)
        arrays[f"{name}.attentions"] = torch.stack(out.attentions)
    return arrays


@torch.no_grad()
def call_logits_to_keep(model, input_ids, keep):
    """Forward with logits_to_keep=keep: logits for the last `keep` positions only."""
    out = model(input_ids=tensor(input_ids), logits_to_keep=keep, use_cache=False)
    if out.logits.shape[1] != keep:
        raise RuntimeError(f"logits_to_keep={keep} returned {out.logits.shape[1]} positions")
    return {"keep.input_ids": input_ids, "keep.logits_to_keep": keep, "keep.logits": out.logits}


@torch.no_grad()
def call_cache(model, input_ids, prefix_length):
    """A cached prefix call, a continuation with its past_key_values, and the full uncached call."""
    prefix = model(input_ids=tensor(input_ids[:, :prefix_length]), use_cache=True)
    continuation = model(
        input_ids=tensor(input_ids[:, prefix_length:]), past_key_values=prefix.past_key_values, use_cache=True
    )
    full = model(input_ids=tensor(input_ids), use_cache=False)
    gap = (continuation.logits - full.logits[:, prefix_length:]).abs().max().item()
    arrays = {
        "cache.input_ids": input_ids,
        "cache.prefix_length": prefix_length,
        "cache.prefix_logits": prefix.logits,
        "cache.continuation_logits": continuation.logits,
        "cache.full_logits": full.logits,
    }
    return arrays, {"cache": f"Transformers' own cached vs uncached logits differ by at most {gap:.2e}"}


@torch.no_grad()
def greedy_generate(model, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens):
    """model.generate(do_sample=False); returns (sequences, smallest top-1 minus top-2 logit gap).

    The gap is taken over every step of every row still generating: a tiny gap would make the
    stored argmax fragile against float32 rounding differences, so callers check it.
    """
    out = model.generate(
        input_ids=tensor(input_ids),
        attention_mask=tensor(attention_mask),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    sequences = out.sequences.numpy()
    new_tokens = sequences[:, input_ids.shape[1] :]
    margins = []
    for step, scores in enumerate(out.scores):
        top2 = torch.topk(scores, 2, dim=-1).values
        for row in range(scores.shape[0]):
            already_done = any(token in eos_token_id for token in new_tokens[row, :step])
            if not already_done:
                margins.append((top2[row, 0] - top2[row, 1]).item())
    return sequences, min(margins)


def call_generate(model, name, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens=8):
    sequences, margin = greedy_generate(model, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens)
    if margin < 1e-3:
        raise RuntimeError(f"{name}: greedy choice margin {margin:.1e} is too small to store; change the seed")
    arrays = {
        f"{name}.input_ids": input_ids,
        f"{name}.attention_mask": attention_mask,
        f"{name}.max_new_tokens": max_new_tokens,
        f"{name}.eos_token_id": np.asarray(eos_token_id, dtype=np.int64),
        f"{name}.pad_token_id": pad_token_id,
        f"{name}.sequences": sequences,
    }
    new_tokens = sequences[:, input_ids.shape[1] :]
    stopped = [
        int(np.argmax(np.isin(row, eos_token_id))) + 1 if np.isin(row, eos_token_id).any() else None
        for row in new_tokens
    ]
    note = (
        f"eos {eos_token_id}; new tokens per row until eos (None = ran to max_new_tokens): {stopped}; "
        f"smallest top-1/top-2 logit gap {margin:.3f}"
    )
    return arrays, {name: note}


def eos_that_stops_one_row(model, input_ids, attention_mask, pad_token_id, max_new_tokens, default_eos):
    """Pick eos ids so that exactly one row of a greedy batch stops early and the others run on.

    Greedy rows are independent, so a dry run without the extra eos shows every row's tokens;
    a token that one row produces at step 3 and no other row produces becomes the extra eos.
    """
    sequences, _ = greedy_generate(model, input_ids, attention_mask, [default_eos], pad_token_id, max_new_tokens)
    new_tokens = sequences[:, input_ids.shape[1] :]
    for row in range(len(new_tokens)):
        candidate = int(new_tokens[row, 2])
        others = np.delete(new_tokens, row, axis=0)
        if candidate not in new_tokens[row, :2] and candidate not in others and candidate != pad_token_id:
            return [default_eos, candidate]
    raise RuntimeError("no token stops exactly one row; change the seed")


@torch.no_grad()
def call_classify(model, name, input_ids, attention_mask, labels):
    out = model(input_ids=tensor(input_ids), attention_mask=tensor(attention_mask), labels=tensor(labels))
    return {
        f"{name}.input_ids": input_ids,
        f"{name}.attention_mask": attention_mask,
        f"{name}.labels": labels,
        f"{name}.logits": out.logits,
        f"{name}.loss": out.loss,
    }


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------


def case_gqa_f32():
    """The main causal-LM case: every kind of call on one GQA model."""
    config = tiny_config(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2
    )
    directory = write_checkpoint("gqa_f32", "LlamaForCausalLM", config, seed=1)
    model = load_reference_model(directory, "LlamaForCausalLM")
    rng = np.random.default_rng(1)
    arrays, notes = {}, {}

    ids = random_ids(rng, 2, 12, config.vocab_size)
    mask = np.ones_like(ids)
    arrays.update(call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask), with_states=True))

    ids = random_ids(rng, 3, 10, config.vocab_size)
    mask = padding_mask([10, 6, 3], 10, "left")
    ids[mask == 0] = 0
    arrays.update(call_forward(model, "padded", ids, mask, lm_labels(rng, ids, mask), with_states=True))

    arrays.update(call_logits_to_keep(model, arrays["forward.input_ids"], keep=3))

    cache_arrays, cache_notes = call_cache(model, random_ids(rng, 2, 10, config.vocab_size), prefix_length=7)
    arrays.update(cache_arrays)
    notes.update(cache_notes)

    prompt = random_ids(rng, 1, 6, config.vocab_size)
    single, note = call_generate(model, "generate", prompt, np.ones_like(prompt), [config.eos_token_id], 0)
    arrays.update(single)
    notes.update(note)

    prompts = random_ids(rng, 3, 6, config.vocab_size, low=3)
    prompt_mask = padding_mask([6, 4, 2], 6, "left")
    prompts[prompt_mask == 0] = 0
    eos = eos_that_stops_one_row(model, prompts, prompt_mask, 0, 8, config.eos_token_id)
    batch, note = call_generate(model, "generate_batch", prompts, prompt_mask, eos, 0)
    arrays.update(batch)
    notes.update(note)

    description = (
        "GQA (8 query heads, 2 key/value heads: 4 query heads per kv head), float32 storage, single "
        "model.safetensors, 5.x config spelling, default RoPE. Calls: a full batch with -100 labels, "
        "hidden states and attention weights; a left-padded batch with attention_mask (default "
        "positions arange(T)); logits_to_keep=3; cached prefix + continuation vs uncached; greedy "
        "generate for one prompt and for a left-padded batch whose eos list stops one row early."
    )
    return "gqa_f32", directory, "LlamaForCausalLM", arrays, description, notes, {
        "padded.labels": "causal-LM labels with -100 at padding and at random positions, (B, T)",
        "generate_batch.input_ids": "left-padded prompts (pad id 0), (B, T)",
    }


def case_mqa_tied_f16():
    config = tiny_config(num_key_value_heads=1, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    directory = write_checkpoint("mqa_tied_f16", "LlamaForCausalLM", config, seed=2, storage_dtype="float16")
    model = load_reference_model(directory, "LlamaForCausalLM")
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 2, 11, config.vocab_size)
    mask = np.ones_like(ids)
    arrays = call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask), with_states=True)
    description = (
        "MQA (4 query heads, 1 key/value head), tied embeddings (no lm_head.weight stored: the head "
        "is embed_tokens), float16 storage, rope_theta 500000, 5.x spelling. Reference computed with "
        "the float16 weights widened to float32."
    )
    return "mqa_tied_f16", directory, "LlamaForCausalLM", arrays, description, {}, {}


def case_mha_bf16_sharded_4x():
    config = tiny_config(num_key_value_heads=4,
                         rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0})
    directory = write_checkpoint(
        "mha_bf16_sharded_4x", "LlamaForCausalLM", config, seed=3, storage_dtype="bfloat16", shards=3, spelling="4.x"
    )
    model = load_reference_model(directory, "LlamaForCausalLM")
    rope = model.config.rope_parameters
    if (rope["rope_type"], rope["rope_theta"], rope["factor"]) != ("linear", 20000.0, 2.0):
        raise RuntimeError(f"Transformers read the 4.x config as {rope}")
    rng = np.random.default_rng(3)
    ids = random_ids(rng, 2, 12, config.vocab_size)
    mask = np.ones_like(ids)
    arrays = call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask))
    prompt = random_ids(rng, 1, 5, config.vocab_size)
    single, notes = call_generate(model, "generate", prompt, np.ones_like(prompt), [config.eos_token_id], 0)
    arrays.update(single)
    description = (
        "MHA (4 query heads, 4 key/value heads), bfloat16 storage split over 3 shards with "
        "model.safetensors.index.json, config.json in the 4.x spelling (top-level rope_theta 20000, "
        "rope_scaling {type: linear, factor: 2}, torch_dtype, no head_dim), written from the 5.x one. "
        "Calls: a batch with -100 labels; greedy generate for one prompt."
    )
    return "mha_bf16_sharded_4x", directory, "LlamaForCausalLM", arrays, description, notes, {}


def case_rope_dynamic():
    config = tiny_config(max_position_embeddings=16,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    directory = write_checkpoint("rope_dynamic", "LlamaForCausalLM", config, seed=4)
    rng = np.random.default_rng(4)
    arrays = {}
    # Transformers' dynamic RoPE keeps state between calls (the longest length seen), so each
    # call gets a freshly loaded model: the reference is what a new model computes for that input.
    for name, length in (("forward", 24), ("forward_short", 10)):
        model = load_reference_model(directory, "LlamaForCausalLM")
        ids = random_ids(rng, 2, length, config.vocab_size)
        mask = np.ones_like(ids)
        arrays.update(call_forward(model, name, ids, mask, lm_labels(rng, ids, mask)))
    description = (
        "Dynamic NTK RoPE (factor 2) with max_position_embeddings 16: `forward` has 24 tokens, so "
        "the base is rescaled for T = 24; `forward_short` has 10 tokens and uses the plain "
        "frequencies. Each call on a freshly loaded model."
    )
    return "rope_dynamic", directory, "LlamaForCausalLM", arrays, description, {}, {
        "forward.input_ids": "24 token ids per row (longer than max_position_embeddings 16), (B, T)",
        "forward_short.input_ids": "10 token ids per row (shorter than max_position_embeddings), (B, T)",
    }


def case_rope_llama3():
    # head_dim 16 gives 8 frequencies whose wavelengths (6 to 20000 positions) fall on both
    # sides of, and between, the llama3 cut-offs 64/4 = 16 and 64/1 = 64: all three branches run.
    config = tiny_config(
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    directory = write_checkpoint("rope_llama3", "LlamaForCausalLM", config, seed=5)
    model = load_reference_model(directory, "LlamaForCausalLM")
    rng = np.random.default_rng(5)
    ids = random_ids(rng, 2, 20, config.vocab_size)
    mask = np.ones_like(ids)
    arrays = call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask))
    description = (
        "llama3 RoPE (factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings "
        "64), head_dim 16 so frequencies fall in all three bands; 2 query heads, 1 kv head."
    )
    return "rope_llama3", directory, "LlamaForCausalLM", arrays, description, {}, {}


def case_rope_yarn():
    config = tiny_config(
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 256},
    )
    directory = write_checkpoint("rope_yarn", "LlamaForCausalLM", config, seed=6)
    model = load_reference_model(directory, "LlamaForCausalLM")
    rng = np.random.default_rng(6)
    ids = random_ids(rng, 2, 20, config.vocab_size)
    mask = np.ones_like(ids)
    arrays = call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask))
    prefix_arrays, notes = call_cache(model, random_ids(rng, 1, 9, config.vocab_size), prefix_length=6)
    arrays.update(prefix_arrays)
    scaling = model.model.rotary_emb.attention_scaling
    description = (
        f"YaRN RoPE as Transformers {transformers.__version__} computes it (factor 4, "
        "original_max_position_embeddings 256, default beta_fast 32 / beta_slow 1, truncate, "
        f"attention_factor 0.1 ln(4) + 1 = {scaling:.6f} multiplying cos and sin), head_dim 16, "
        "2 heads. Calls: a batch with -100 labels; cached prefix + continuation vs uncached."
    )
    return "rope_yarn", directory, "LlamaForCausalLM", arrays, description, notes, {}


def case_bias_head_dim():
    config = tiny_config(head_dim=16, attention_bias=True, mlp_bias=True)
    directory = write_checkpoint("bias_head_dim", "LlamaForCausalLM", config, seed=7)
    model = load_reference_model(directory, "LlamaForCausalLM")
    rng = np.random.default_rng(7)
    ids = random_ids(rng, 2, 9, config.vocab_size)
    mask = np.ones_like(ids)
    arrays = call_forward(model, "forward", ids, mask, lm_labels(rng, ids, mask), with_states=True)
    cache_arrays, notes = call_cache(model, random_ids(rng, 2, 8, config.vocab_size), prefix_length=5)
    arrays.update(cache_arrays)
    description = (
        "attention_bias and mlp_bias true (random, non-zero biases on q, k, v, o, gate, up, down) "
        "with an explicit head_dim 16 != hidden_size / num_attention_heads = 8, so H*hd = 64 != D = 32; "
        "4 query heads, 2 kv heads. Calls: a batch with hidden states and attentions; cached vs uncached."
    )
    return "bias_head_dim", directory, "LlamaForCausalLM", arrays, description, notes, {}


def classification_case(case, problem_type, num_labels, seed):
    """A LlamaForSequenceClassification checkpoint and one left- and one right-padded batch."""
    pad = 0
    config = tiny_config(num_labels=num_labels, pad_token_id=pad)
    directory = write_checkpoint(case, "LlamaForSequenceClassification", config, seed=seed)
    model = load_reference_model(directory, "LlamaForSequenceClassification")
    rng = np.random.default_rng(seed)
    arrays = {}
    for side in ("left", "right"):
        # Real tokens are drawn from [1, V) so the pad id 0 only ever marks padding: pooling
        # takes the rightmost token that is not the pad id.
        ids = random_ids(rng, 3, 8, config.vocab_size, low=1)
        mask = padding_mask([8, 5, 3], 8, side)
        ids[mask == 0] = pad
        if problem_type == "regression":
            labels = rng.normal(size=3).astype(np.float32)
        elif problem_type == "single_label_classification":
            labels = rng.integers(0, num_labels, size=3, dtype=np.int64)
        else:
            labels = (rng.random((3, num_labels)) < 0.5).astype(np.float32)
        arrays.update(call_classify(model, side, ids, mask, labels))
        if model.config.problem_type != problem_type:
            raise RuntimeError(f"{case}: Transformers inferred {model.config.problem_type}, expected {problem_type}")
    label_text = {
        "regression": "float32 targets, (B,)",
        "single_label_classification": "int64 class ids, (B,)",
        "multi_label_classification": "float32 multi-hot targets, (B, num_labels)",
    }[problem_type]
    loss_text = {
        "regression": "mean squared error",
        "single_label_classification": "cross-entropy",
        "multi_label_classification": "binary cross-entropy with logits, mean",
    }[problem_type]
    overrides = {}
    for side in ("left", "right"):
        overrides[f"{side}.input_ids"] = f"{side}-padded token ids, pad id {pad}, real tokens in [1, V), (B, T)"
        overrides[f"{side}.labels"] = label_text
        overrides[f"{side}.logits"] = "pooled logits at the rightmost non-pad token, (B, num_labels)"
        overrides[f"{side}.loss"] = f"{loss_text}, scalar"
    description = (
        f"LlamaForSequenceClassification, num_labels {num_labels}, pad_token_id {pad}; problem_type "
        f"{problem_type} (not in config.json: inferred from num_labels and the label dtype). One "
        "left-padded and one right-padded batch, each with labels."
    )
    return case, directory, "LlamaForSequenceClassification", arrays, description, {}, overrides


CASES = {
    "gqa_f32": case_gqa_f32,
    "mqa_tied_f16": case_mqa_tied_f16,
    "mha_bf16_sharded_4x": case_mha_bf16_sharded_4x,
    "rope_dynamic": case_rope_dynamic,
    "rope_llama3": case_rope_llama3,
    "rope_yarn": case_rope_yarn,
    "bias_head_dim": case_bias_head_dim,
    "seqcls_regression": lambda: classification_case("seqcls_regression", "regression", 1, seed=8),
    "seqcls_single_label": lambda: classification_case("seqcls_single_label", "single_label_classification", 3, seed=9),
    "seqcls_multi_label": lambda: classification_case("seqcls_multi_label", "multi_label_classification", 4, seed=10),
}


def store_case(case, directory, model_class, arrays, description, notes, overrides):
    """Write reference.npz and return the manifest entry for the case."""
    stored = fixture_io.save_reference(directory, arrays)
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    return {
        "description": description,
        "model_class": model_class,
        "config_spelling": "4.x" if "rope_parameters" not in config else "5.x",
        "storage_dtype": config.get("dtype", config.get("torch_dtype")),
        "files": fixture_io.directory_files(directory),
        "notes": notes,
        "reference_npz": fixture_io.describe_arrays(stored, {**FIELD_DESCRIPTIONS, **overrides}),
    }


def main(selected):
    torch.set_num_threads(1)  # deterministic summation order, independent of the machine
    unknown = [name for name in selected if name not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(CASES)}")
    entries = {}
    for name in selected or CASES:
        case, directory, model_class, arrays, description, notes, overrides = CASES[name]()
        entries[case] = store_case(case, directory, model_class, arrays, description, notes, overrides)
        print(f"{case}: {len(arrays)} arrays, files {entries[case]['files']}")
    fixture_io.update_manifest(SCRIPT, fixture_io.library_versions(), entries)


if __name__ == "__main__":
    main(sys.argv[1:])
