"""The bundled models against Transformers' stored outputs in tests/data/bundled/.

``tiny-shakespeare`` (LlamaForCausalLM) and ``tiny-shakespeare-genre``
(LlamaForSequenceClassification) are loaded by name, the way users load them, and run on the
inputs stored by tests/reference/make_bundled_references.py (Transformers float32, eager
attention, from the same float16 files). manifest.json says what each array holds and records
the sha256 of the checkpoint files the references were made from.

Tolerances are those of tests/tolerance.py (docs/reference.md §10.3): float32 logits, hidden states
and attention weights within 1e-4 * max(1, |reference|), losses within 1e-5, greedy token ids
identical; padded query positions are not compared. Neither torch nor transformers is needed.
"""

import functools
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tolerance import (
    assert_close_to_reference,
    assert_loss_close_to_reference,
    assert_same_token_ids,
)

BUNDLED = Path(__file__).parent / "data" / "bundled"
MANIFEST = json.loads((BUNDLED / "manifest.json").read_text())
LM, GENRE = "tiny-shakespeare", "tiny-shakespeare-genre"
PROMPT_CALLS = sorted({k.split(".")[0] for k in np.load(BUNDLED / f"{LM}.npz").files if k.startswith("prompt")})
PADDING_SIDES = ["left", "right"]


def assets_dir(name):
    import llama_np

    return Path(llama_np.__file__).parent / "assets" / name


@functools.lru_cache(maxsize=None)
def reference(name):
    with np.load(BUNDLED / f"{name}.npz") as stored:
        return {key: stored[key] for key in stored.files}


@functools.lru_cache(maxsize=None)
def load(name):
    import llama_np

    model_class = {LM: llama_np.LlamaForCausalLM, GENRE: llama_np.LlamaForSequenceClassification}[name]
    return model_class.from_pretrained(name)


def safetensors_header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


# ---------------------------------------------------------------------------------------------
# The shipped files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LM, GENRE])
def test_references_were_made_from_the_shipped_checkpoint(name):
    for filename, digest in MANIFEST["checkpoints"][name].items():
        actual = hashlib.sha256((assets_dir(name) / filename).read_bytes()).hexdigest()
        assert actual == digest, (
            f"llama_np/assets/{name}/{filename} is not the file tests/data/bundled/ was made from; "
            "regenerate with tests/reference/make_bundled_references.py"
        )


@pytest.mark.parametrize("name", [LM, GENRE])
def test_bundled_model_ships_every_file_with_float16_weights(name):
    folder = assets_dir(name)
    for filename in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json", "MODEL_CARD.md"):
        assert (folder / filename).is_file(), f"{name}: {filename} missing"
    header = safetensors_header(folder / "model.safetensors")
    dtypes = {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    assert dtypes == {"F16"}, f"{name}: stored dtypes {dtypes}, expected float16 only"
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"


def test_both_bundled_models_together_stay_under_16_mb():
    total = sum(p.stat().st_size for name in (LM, GENRE) for p in assets_dir(name).iterdir() if p.is_file())
    assert total < 16 * 10**6, f"bundled models take {total:,} bytes"


def test_language_model_has_the_promised_shape():
    config = json.loads((assets_dir(LM) / "config.json").read_text())
    model = load(LM)
    assert 2_000_000 <= model.num_parameters() <= 8_000_000
    assert config["num_hidden_layers"] >= 4
    assert config["num_attention_heads"] // config["num_key_value_heads"] >= 2, "GQA with >= 2 query heads per kv head"
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] >= 256
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)


def test_classifier_config_names_the_three_folio_genres_and_a_real_pad_id():
    config = json.loads((assets_dir(GENRE) / "config.json").read_text())
    assert config["id2label"] == {"0": "comedy", "1": "history", "2": "tragedy"}
    assert 0 <= config["pad_token_id"] < config["vocab_size"]


# ---------------------------------------------------------------------------------------------
# tiny-shakespeare (LlamaForCausalLM)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", PROMPT_CALLS)
def test_bundled_tokenizer_encodes_the_prompts_as_stored(call):
    try:
        from llama_np.text.tokenizer import LlamaTokenizer
    except ImportError:
        pytest.skip("llama_np.text.tokenizer is not available")
    ref = reference(LM)
    ids = LlamaTokenizer.from_pretrained(LM).encode(str(ref[f"{call}.text"]))
    assert_same_token_ids(np.asarray([ids]), ref[f"{call}.input_ids"], f"{LM} {call} tokenization")


@pytest.mark.parametrize("call", PROMPT_CALLS)
def test_logits_hidden_states_and_attentions_match_transformers(call):
    ref = reference(LM)
    out = load(LM)(ref[f"{call}.input_ids"], output_hidden_states=True, output_attentions=True)
    assert_close_to_reference(out.logits, ref[f"{call}.logits"], f"{LM} {call} logits")
    expected = ref[f"{call}.hidden_states"]  # (L + 1, 1, T, D)
    assert len(out.hidden_states) == len(expected), "expected the embeddings plus one output per layer"
    for index, (ours, theirs) in enumerate(zip(out.hidden_states, expected)):
        assert_close_to_reference(ours, theirs, f"{LM} {call} hidden_states[{index}]")
    expected = ref[f"{call}.attentions"]  # (L, 1, H, T, T)
    assert len(out.attentions) == len(expected), "expected one attention tensor per layer"
    for layer, (ours, theirs) in enumerate(zip(out.attentions, expected)):
        assert_close_to_reference(ours, theirs, f"{LM} {call} attentions[{layer}]")


@pytest.mark.parametrize("call", PROMPT_CALLS)
def test_loss_matches_transformers(call):
    ref = reference(LM)
    ids = ref[f"{call}.input_ids"]
    out = load(LM)(ids, labels=ids)
    assert_loss_close_to_reference(out.loss, ref[f"{call}.loss"], f"{LM} {call} loss")


@pytest.mark.parametrize("call", PROMPT_CALLS + ["batch"])
def test_greedy_continuation_of_32_tokens_is_identical(call):
    ref = reference(LM)
    mask = ref[f"{call}.attention_mask"]
    sequences = load(LM).generate(
        ref[f"{call}.input_ids"],
        attention_mask=None if mask.all() else mask,
        max_new_tokens=int(ref[f"{call}.max_new_tokens"]),
        do_sample=False,
        eos_token_id=[int(t) for t in ref[f"{call}.eos_token_id"]],
        pad_token_id=int(ref[f"{call}.pad_token_id"]),
    )
    assert_same_token_ids(sequences, ref[f"{call}.sequences"], f"{LM} {call} greedy sequences")


def test_left_padded_batch_logits_match_transformers_on_real_tokens():
    ref = reference(LM)
    mask = ref["batch.attention_mask"]
    out = load(LM)(ref["batch.input_ids"], attention_mask=mask)
    assert_close_to_reference(out.logits, ref["batch.logits"], f"{LM} left-padded batch logits",
                              where=mask.astype(bool)[:, :, None])


# ---------------------------------------------------------------------------------------------
# tiny-shakespeare-genre (LlamaForSequenceClassification)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", PADDING_SIDES)
def test_padded_batch_classification_logits_and_loss_match_transformers(side):
    ref = reference(GENRE)
    model = load(GENRE)
    mask = ref[f"{side}.attention_mask"]
    assert not mask.all(), "the stored batch should contain padding"
    out = model(ref[f"{side}.input_ids"], attention_mask=mask, labels=ref[f"{side}.labels"])
    assert_close_to_reference(out.logits, ref[f"{side}.logits"], f"{GENRE} {side}-padded logits")
    assert_loss_close_to_reference(out.loss, ref[f"{side}.loss"], f"{GENRE} {side}-padded loss")


def test_each_passage_alone_gives_transformers_logits():
    ref = reference(GENRE)
    model = load(GENRE)
    singles = sorted({k.split(".")[0] for k in ref if k.startswith("single")})
    assert singles
    for call in singles:
        out = model(ref[f"{call}.input_ids"])
        assert_close_to_reference(out.logits, ref[f"{call}.logits"], f"{GENRE} {call} logits")
