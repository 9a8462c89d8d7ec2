"""Every hook point against TransformerLens itself, on the bundled model.

tests/data/transformerlens/ holds what TransformerLens 3.9.0's HookedTransformer (weights
converted by its own Llama converter, no weight processing) cached on tiny-shakespeare for one
prompt: the default run's hooks, and what set_use_attn_result, set_use_split_qkv_input and
set_use_hook_mlp_in add (tests/reference/make_transformerlens_reference.py). Each of our hook
names must exist there and hold the same values within the project's tolerance: TransformerLens
is an independent implementation (its own RoPE, its own attention), so the float32 rule of
tests/tolerance.py applies, as against Transformers.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaForCausalLM
from llama_np.interp.hooks import HookOptions, hook_names
from tolerance import assert_close_to_reference

DATA = Path(__file__).resolve().parent / "data" / "transformerlens"
MANIFEST = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
STORED = dict(np.load(DATA / "tiny-shakespeare.npz"))
INPUT_IDS = STORED["input_ids"]
EXTENDED = HookOptions(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_pretrained("tiny-shakespeare")


@pytest.fixture(scope="module")
def default_cache(model):
    return model.run_with_cache(INPUT_IDS)[1]


@pytest.fixture(scope="module")
def extended_cache():
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    for name, value in vars(EXTENDED).items():
        getattr(model, f"set_{name}")(value)
    return model.run_with_cache(INPUT_IDS)[1]


def stored_names(run: str) -> list[str]:
    return [key.split("/", 1)[1] for key in STORED if key.startswith(f"{run}/")]


def compare(ours, theirs, name):
    if name.endswith("attn.hook_attn_scores"):  # masked scores: −inf there, finfo.min here
        where = np.isfinite(theirs)
        assert (ours[~where] == np.finfo(np.float32).min).all(), name
        return assert_close_to_reference(ours, theirs, name, where=where)
    return assert_close_to_reference(ours, theirs, name)


def test_the_default_run_has_exactly_transformerlens_hook_names_in_its_order(model, default_cache):
    assert list(default_cache.keys()) == stored_names("default") == MANIFEST["cache_order"]["default"]
    assert hook_names(model.config) == stored_names("default")


@pytest.mark.parametrize("name", stored_names("default"))
def test_default_hook_equals_transformerlens(default_cache, name):
    compare(default_cache[name], STORED[f"default/{name}"], name)


def test_the_extended_run_has_transformerlens_hook_names_in_its_order(model, extended_cache):
    assert list(extended_cache.keys()) == MANIFEST["cache_order"]["extended"]
    assert hook_names(model.config, EXTENDED) == MANIFEST["cache_order"]["extended"]


@pytest.mark.parametrize("name", stored_names("extended"))
def test_optional_hook_equals_transformerlens(extended_cache, name):
    compare(extended_cache[name], STORED[f"extended/{name}"], name)


@pytest.mark.parametrize("name", [n for n in MANIFEST["cache_order"]["extended"] if n not in stored_names("extended")])
def test_the_options_leave_the_other_hooks_as_in_the_default_run(extended_cache, name):
    compare(extended_cache[name], STORED[f"default/{name}"], name)


def test_logits_equal_transformerlens(model):
    assert_close_to_reference(model(INPUT_IDS).logits, STORED["logits"], "logits")


def test_attribution_tools_agree_with_the_stored_hooks(model, default_cache):
    # The components of decompose_resid sum to the final residual stream TransformerLens stored,
    # and after the final norm's scale and weight their logit attributions sum to its logits.
    parts = default_cache.decompose_resid()
    assert_close_to_reference(parts.sum(0), STORED[f"default/blocks.{model.config.num_hidden_layers - 1}.hook_resid_post"],
                              "sum of decompose_resid")
    token = STORED["logits"][:, -1].argmax(-1)
    last = default_cache.decompose_resid(pos_slice=-1) * model.weights["model.norm.weight"]
    attributions = default_cache.logit_attrs(last, token, pos_slice=-1)  # (components, B)
    assert_close_to_reference(attributions.sum(0), STORED["logits"][np.arange(1), -1, token], "logit attributions")
    heads = default_cache.stack_head_results(incl_remainder=True)  # hook_result recomputed from hook_z
    per_head = heads[:-1].reshape(model.config.num_hidden_layers, model.config.num_attention_heads, *heads.shape[1:])
    for layer in range(model.config.num_hidden_layers):
        stored = STORED[f"extended/blocks.{layer}.attn.hook_result"]  # (B, T, H, D)
        assert_close_to_reference(per_head[layer].transpose(1, 2, 0, 3), stored, f"layer {layer} head results")
