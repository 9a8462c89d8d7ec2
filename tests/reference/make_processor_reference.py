"""Store what Transformers' logit processors do to seeded random logits, in ``tests/data/processors/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements.txt``::

    python tests/reference/make_processor_reference.py

Inputs: ``logits`` (B, V) float32, one row per kind of distribution (see ROWS), and ``input_ids``
(B, S), a history with repeated ids that covers positive, zero, negative, very negative and −inf
logits. Outputs, each (n, B, V) float32 with removed tokens as −inf:

* each processor alone over a grid of its parameter: ``RepetitionPenaltyLogitsProcessor``,
  ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``;
* ``chain``: the processor list that ``generate`` builds for sampling
  (``GenerationConfig(do_sample=True, ...)`` through the model's ``_get_logits_processor``);
* ``greedy``: the list it builds for greedy decoding (the repetition penalty only);
* ``padded``: the greedy list for a left-padded prompt (the attention mask goes in as
  ``generate`` passes it), where the penalty skips the padding.

Top-p sorts with ``torch.sort``, which is not stable: among tokens with the same logit that
straddle the cut, which ones are removed depends on torch's sort kernel (and the CPU it picks).
``<name>.order_dependent`` (n, B, V) bool marks them: the tokens of a logit value the output
both keeps and removes in the row (the script checks, by permuting the vocabulary, that nothing
else moves). The tests require the rest to match exactly and the number removed to match.

Writes ``reference.npz`` and ``manifest.json`` (versions, date, what each array holds).
"""

import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "processors"
SEED = 20240607
VOCAB, HISTORY = 200, 16
PERMUTATIONS = 8  # vocabulary orders tried to find top-p decisions that hinge on tie order

PENALTIES = [1.0, 1.3, 0.7]
TEMPERATURES = [0.5, 1.0, 1.7]
TOP_KS = [1, 5, 50, VOCAB + 10]
TOP_PS = [0.05, 0.5, 0.9, 0.999, 1.0]
# (top_k, top_p) pairs for the sampling chain; top_k 0 switches top-k off, top_p 1.0 top-p.
CHAIN_FILTERS = [(0, 1.0), (1, 1.0), (5, 0.5), (50, 0.9), (0, 0.999), (VOCAB + 10, 0.05)]
LLAMA2_CHAT = dict(temperature=0.6, top_k=50, top_p=0.9, repetition_penalty=1.0)  # its generation_config + default top_k
PADDED_PENALTIES = [1.3, 0.7]
LEADING_PADS = [0, 3, 0, 5, 1, 0, 2]
PAD_ID = 3

ROWS = [
    ("normal", "N(0, 2²) logits"),
    ("ties", "integers -4..4, about 22 tokens per value"),
    ("very_negative", "N(0, 1) with 40 tokens between -1e4 and -150 (float32 probability 0) and 5 at −inf"),
    ("one_dominant", "N(0, 1) with token 17 at 40"),
    ("uniform", "all logits 0"),
    ("large_scale", "N(0, 20²) logits"),
    ("tied_maximum", "N(0, 1) with tokens 5 and 9 tied at the maximum 5.0"),
]


def make_logits(rng):
    """(B, V) float32, one row per entry of ROWS."""
    logits = np.zeros((len(ROWS), VOCAB), dtype=np.float64)
    logits[0] = 2 * rng.standard_normal(VOCAB)
    logits[1] = rng.integers(-4, 5, VOCAB)
    logits[2] = rng.standard_normal(VOCAB)
    far = rng.choice(VOCAB, 45, replace=False)
    logits[2, far[:40]] = -rng.uniform(150, 1e4, 40)
    logits[2, far[40:]] = -np.inf
    logits[3] = rng.standard_normal(VOCAB)
    logits[3, 17] = 40.0
    logits[4] = 0.0
    logits[5] = 20 * rng.standard_normal(VOCAB)
    logits[6] = rng.standard_normal(VOCAB)
    logits[6, [5, 9]] = 5.0
    return logits.astype(np.float32)


def make_input_ids(rng, logits):
    """(B, S) int64 with repeats; every row also sees its most and least likely tokens."""
    ids = rng.integers(0, VOCAB, (len(ROWS), HISTORY))
    ids[:, HISTORY // 2:] = ids[:, :HISTORY // 2][:, rng.permutation(HISTORY // 2)]  # every id twice
    ids[:, 0] = logits.argmax(axis=-1)
    ids[:, 1] = logits.argmin(axis=-1)  # −inf in very_negative
    ids[2, 2] = np.flatnonzero(np.isfinite(logits[2]) & (logits[2] < -100))[0]
    ids[6, 3] = 9  # one of the two tied maxima
    return ids.astype(np.int64)


def run(processors, input_ids, logits):
    """Apply a processor or a list to copies of numpy inputs; returns (B, V) float32."""
    scores = torch.from_numpy(logits.copy())
    for processor in processors:
        scores = processor(torch.from_numpy(input_ids), scores)
    return scores.numpy().copy()


def order_dependent(processors, input_ids, logits, rng):
    """(B, V) bool: tokens of a value (as top-p sees it) that the output both keeps and removes in the row.

    Tied tokens have equal probabilities, so the cumulative sums, and with them the number
    removed, do not depend on how the sort orders them; only which of them go does. The check
    below confirms that permuting the vocabulary changes nothing outside these tokens.
    """
    removed = np.isneginf(run(processors, input_ids, logits))
    split = np.zeros_like(removed)
    if not processors or not isinstance(processors[-1], TopPLogitsWarper):
        return split  # top-k keeps every token tied with the k-th: no order involved
    before_top_p = run(processors[:-1], input_ids, logits)
    for row in range(len(logits)):
        for value in np.unique(before_top_p[row][removed[row]]):
            group = before_top_p[row] == value
            if (~removed[row] & group).any():
                split[row] |= group
    for _ in range(PERMUTATIONS):
        order = rng.permutation(VOCAB)
        inverse = np.argsort(order)
        permuted = np.isneginf(run(processors, inverse[input_ids], logits[:, order])[:, inverse])
        assert not ((permuted != removed) & ~split).any(), "a removal changed outside a split tie"
        assert (permuted.sum(axis=-1) == removed.sum(axis=-1)).all(), "permuting changed how many are removed"
    return split


def tiny_model():
    """Only ``_get_logits_processor`` is used; the weights do not matter."""
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


def generate_processors(model, input_ids, attention_mask=None, **settings):
    """The LogitsProcessorList ``model.generate`` builds for these settings."""
    generation_config, _ = model._prepare_generation_config(GenerationConfig(**settings))
    model_kwargs = {} if attention_mask is None else {"attention_mask": torch.from_numpy(attention_mask)}
    return model._get_logits_processor(generation_config=generation_config, input_ids_seq_length=input_ids.shape[1],
                                       encoder_input_ids=torch.from_numpy(input_ids), device="cpu",
                                       model_kwargs=model_kwargs)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    logits = make_logits(rng)
    input_ids = make_input_ids(rng, logits)
    model = tiny_model()
    arrays = dict(logits=logits, input_ids=input_ids)
    chain_lists = {}

    arrays["repetition_penalty.values"] = np.array(PENALTIES)
    arrays["repetition_penalty.out"] = np.stack(
        [run([RepetitionPenaltyLogitsProcessor(p)], input_ids, logits) for p in PENALTIES])
    arrays["temperature.values"] = np.array(TEMPERATURES)
    arrays["temperature.out"] = np.stack([run([TemperatureLogitsWarper(t)], input_ids, logits) for t in TEMPERATURES])
    arrays["top_k.values"] = np.array(TOP_KS)
    arrays["top_k.out"] = np.stack([run([TopKLogitsWarper(k)], input_ids, logits) for k in TOP_KS])
    arrays["top_p.values"] = np.array(TOP_PS)
    arrays["top_p.out"] = np.stack([run([TopPLogitsWarper(p)], input_ids, logits) for p in TOP_PS])
    arrays["top_p.order_dependent"] = np.stack(
        [order_dependent([TopPLogitsWarper(p)], input_ids, logits, rng) for p in TOP_PS])

    settings = [dict(temperature=t, top_k=k, top_p=p, repetition_penalty=r)
                for r in PENALTIES for t in TEMPERATURES for k, p in CHAIN_FILTERS] + [LLAMA2_CHAT]
    outputs, dependent = [], []
    for setting in settings:
        processors = generate_processors(model, input_ids, do_sample=True, **setting)
        chain_lists[json.dumps(setting)] = [type(p).__name__ for p in processors]
        outputs.append(run(processors, input_ids, logits))
        dependent.append(order_dependent(processors, input_ids, logits, rng))
    for name in ["temperature", "top_k", "top_p", "repetition_penalty"]:
        arrays[f"chain.{name}"] = np.array([s[name] for s in settings])
    arrays["chain.out"] = np.stack(outputs)
    arrays["chain.order_dependent"] = np.stack(dependent)

    greedy = []
    for penalty in PENALTIES:
        processors = generate_processors(model, input_ids, do_sample=False, repetition_penalty=penalty)
        chain_lists[json.dumps(dict(do_sample=False, repetition_penalty=penalty))] = [type(p).__name__ for p in processors]
        greedy.append(run(processors, input_ids, logits))
    arrays["greedy.repetition_penalty"] = np.array(PENALTIES)
    arrays["greedy.out"] = np.stack(greedy)

    attention_mask = (np.arange(HISTORY)[None, :] >= np.array(LEADING_PADS)[:, None]).astype(np.int64)
    padded_ids = np.where(attention_mask == 1, input_ids, PAD_ID)
    padded = []
    for penalty in PADDED_PENALTIES:
        processors = generate_processors(model, padded_ids, attention_mask, do_sample=False, repetition_penalty=penalty)
        padded.append(run(processors, padded_ids, logits))
    arrays["padded.input_ids"] = padded_ids
    arrays["padded.attention_mask"] = attention_mask
    arrays["padded.repetition_penalty"] = np.array(PADDED_PENALTIES)
    arrays["padded.out"] = np.stack(padded)

    # Each setting must have actually done something, or the comparison proves little.
    for name in ["repetition_penalty", "temperature", "top_k", "top_p"]:
        assert any(not np.array_equal(out, logits) for out in arrays[f"{name}.out"]), name
    assert not np.array_equal(arrays["padded.out"][0], arrays["greedy.out"][1]), "padding changed nothing"

    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "reference.npz", **arrays)
    write_manifest(arrays, chain_lists)


def write_manifest(arrays, chain_lists):
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    holds = {
        "logits": "(B, V) float32 input scores; row b is ROWS[b] in 'rows'",
        "input_ids": "(B, S) int64 token history the repetition penalty looks at",
        "repetition_penalty.values": "(n,) penalties", "repetition_penalty.out":
            "(n, B, V) RepetitionPenaltyLogitsProcessor(values[i]) applied to logits",
        "temperature.values": "(n,) temperatures", "temperature.out": "(n, B, V) TemperatureLogitsWarper(values[i])",
        "top_k.values": "(n,) k", "top_k.out": "(n, B, V) TopKLogitsWarper(values[i]), −inf where removed",
        "top_p.values": "(n,) p", "top_p.out": "(n, B, V) TopPLogitsWarper(values[i]), −inf where removed",
        "top_p.order_dependent": "(n, B, V) bool: tokens of a logit value that the output both keeps and "
                                 "removes in the row (a cut through a tie; torch.sort is not stable, so "
                                 "which of them go is not reproducible, only how many)",
        "chain.temperature / top_k / top_p / repetition_penalty": "(N,) settings of case i",
        "chain.out": "(N, B, V) the sampling LogitsProcessorList generate builds for case i "
                     "(GenerationConfig(do_sample=True, ...) through _get_logits_processor)",
        "chain.order_dependent": "(N, B, V) bool, as top_p.order_dependent",
        "greedy.repetition_penalty": "(n,) penalties", "greedy.out": "(n, B, V) the greedy LogitsProcessorList",
        "padded.input_ids": f"(B, S) input_ids with the first LEADING_PADS[b] ids replaced by pad id {PAD_ID}",
        "padded.attention_mask": "(B, S) 0 on the leading pads",
        "padded.repetition_penalty": "(n,) penalties",
        "padded.out": "(n, B, V) the greedy LogitsProcessorList built with this attention_mask "
                      "(RepetitionPenaltyLogitsProcessor with prompt_ignore_length = leading pads)",
    }
    manifest = {
        "generator": "tests/reference/make_processor_reference.py",
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "seed": SEED,
        "rows": [{"name": name, "logits": description} for name, description in ROWS],
        "leading_pads": LEADING_PADS,
        "processor_lists": chain_lists,
        "arrays": holds,
        "shapes": {name: list(value.shape) for name, value in arrays.items()},
    }
    with open(OUT / "manifest.json", "w") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


if __name__ == "__main__":
    main()
