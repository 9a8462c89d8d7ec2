"""LoRA adapters against PEFT: loading, logits, gradients, merging, and files PEFT loads back.

tests/data/lora/ is written by tests/reference/make_lora_reference.py (PEFT 0.21.2 on
Transformers 5.23.0): PEFT adapters on fixture checkpoints with PEFT's logits, loss, gradients,
disabled and merged logits (one of them a SEQ_CLS adapter on a classifier, whose score head PEFT
trains in full); and an adapter written by llama_np with the logits PEFT computes
when it loads it. Tolerances are those of tests/tolerance.py. Neither torch nor peft is needed.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaForCausalLM, LlamaForSequenceClassification, value_and_grad
from llama_np.errors import CheckpointError, InputError
from llama_np.training.lora import LoraConfig
from llama_np.training.optim import AdamW
from tolerance import (
    assert_close,
    assert_directional_derivative,
    assert_gradient_close,
    assert_loss_close_to_reference,
)

DATA = Path(__file__).parent / "data"
LORA = DATA / "lora"
MANIFEST = json.loads((LORA / "manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])


def reference(case):
    with np.load(LORA / case / "reference.npz") as stored:
        return {key: stored[key] for key in stored.files}


def adapted(case, dtype=np.float32):
    spec = MANIFEST["cases"][case]
    model_class = LlamaForSequenceClassification if spec["lora_config"].get("task_type") == "SEQ_CLS" else LlamaForCausalLM
    model = model_class.from_pretrained(str(DATA / "fixtures" / spec["fixture"]), dtype=dtype)
    model.load_adapter(LORA / case / "adapter")
    return model


def model_inputs(expected):
    """input_ids, and the attention mask of a batch that has one (the classifier's, left-padded)."""
    return {name: expected[name] for name in ("input_ids", "attention_mask") if name in expected}


@pytest.mark.parametrize("case", CASES)
def test_a_peft_adapter_loads_with_peft_logits_and_loss(case):
    expected = reference(case)
    model = adapted(case)
    out = model(**model_inputs(expected), labels=expected["labels"])
    assert_close(out.logits, expected["logits"], f"{case}: logits with the adapter")
    assert_loss_close_to_reference(out.loss, expected["loss"], f"{case}: loss with the adapter")


@pytest.mark.parametrize("case", CASES)
def test_value_and_grad_gives_the_adapters_gradients_as_peft_names_them(case):
    expected = reference(case)
    model = adapted(case)
    loss, grads = value_and_grad(model, **model_inputs(expected), labels=expected["labels"])
    assert_loss_close_to_reference(loss, expected["loss"], f"{case}: loss")
    assert sorted(grads) == sorted(key[len("grad."):] for key in expected if key.startswith("grad."))
    assert list(grads) == [name for name, _ in model.named_parameters()]
    for name, grad in grads.items():
        assert_gradient_close(grad, expected[f"grad.{name}"], f"{case}: gradient of {name}")


@pytest.mark.parametrize("case", CASES)
def test_disabled_and_merged_adapters_give_peft_logits(case):
    expected = reference(case)
    model = adapted(case)
    model.disable_adapters()
    assert_close(model(**model_inputs(expected)).logits, expected["disabled_logits"], f"{case}: adapter disabled")
    model.enable_adapters()
    model.merge_adapter()
    assert model.adapter is None
    assert_close(model(**model_inputs(expected)).logits, expected["merged_logits"], f"{case}: merged adapter")


def test_adapter_gradients_match_finite_differences_in_float64():
    expected = reference("mqa_tied_f16_rslora_all")
    model = adapted("mqa_tied_f16_rslora_all", np.float64)
    ids, labels = expected["input_ids"], expected["labels"]
    _, grads = value_and_grad(model, ids, labels=labels)
    rng, eps = np.random.default_rng(0), 1e-6
    for name, parameter in model.named_parameters():
        direction = rng.normal(size=parameter.shape)
        parameter += eps * direction
        plus = model(ids, labels=labels).loss
        parameter -= 2 * eps * direction
        minus = model(ids, labels=labels).loss
        parameter += eps * direction
        assert_directional_derivative(np.sum(grads[name] * direction), (plus - minus) / (2 * eps), name)


def llama_np_adapter_model():
    """The adapter make_lora_reference.py had llama_np write, built again the same way."""
    spec = MANIFEST["llama_np_adapter"]
    model = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / spec["fixture"]))
    model.add_adapter(LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"],
                                 target_modules=tuple(spec["target_modules"])), seed=spec["seed"])
    rng = np.random.default_rng(spec["lora_B_seed"])
    for name, value in model.adapter.tensors.items():
        if ".lora_B." in name:
            value[...] = spec["lora_B_std"] * rng.normal(size=value.shape)
    model.name_or_path = f"tests/data/fixtures/{spec['fixture']}"
    return model


def test_an_adapter_llama_np_saves_is_the_one_peft_loaded_with_the_same_logits(tmp_path):
    model = llama_np_adapter_model()
    model.save_adapter(tmp_path)
    stored = LORA / "llama_np_adapter"
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == json.loads(
        (stored / "adapter_config.json").read_text())
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == (stored / "adapter_model.safetensors").read_bytes()
    with np.load(LORA / "llama_np_adapter.npz") as peft_run:
        assert_close(model(peft_run["input_ids"]).logits, peft_run["logits"], "logits PEFT computed with our adapter")


def test_a_new_adapter_starts_as_peft_does_and_changes_nothing():
    model = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / "gqa_f32"))
    ids = np.arange(1, 9)[None]
    before = model(ids).logits
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")), seed=3)
    names = [name for name, _ in model.named_parameters()]
    assert names[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert len(names) == 2 * 2 * model.config.num_hidden_layers
    a = model.adapter.tensors[names[0]]
    bound = 1 / np.sqrt(model.config.hidden_size)  # kaiming_uniform_(a=sqrt(5)) on fan_in = D
    assert a.shape == (8, model.config.hidden_size) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not model.adapter.tensors[names[1]].any()  # B = 0: the adapter starts as a no-op
    np.testing.assert_array_equal(model(ids).logits, before)
    assert model.adapter.config.scaling == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)


def test_adamw_on_an_adapter_trains_the_adapter_and_leaves_the_base_weights_alone():
    model = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / "gqa_f32"))
    ids = np.arange(1, 13)[None]
    base = {name: value.copy() for name, value in model.weights.items()}
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")))
    optimizer = AdamW(model.named_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss, grads = value_and_grad(model, ids, labels=ids)
        optimizer.step(grads)
        losses.append(loss)
    assert losses[-1] < losses[0]
    assert all(np.array_equal(model.weights[name], value) for name, value in base.items())


def test_bad_adapters_are_refused_with_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="linear layers are"):
        LoraConfig(target_modules=("q_proj", "lm_head"))
    model = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / "mqa_tied_f16"))
    with pytest.raises(CheckpointError, match="another base model"):
        model.load_adapter(LORA / "gqa_f32_qv_down" / "adapter")
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        model.load_adapter(tmp_path)
    streamed = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / "mqa_tied_f16"), keep_widened=False)
    with pytest.raises(InputError, match="keep_widened=True"):
        streamed.add_adapter(LoraConfig())
    classifier = LlamaForSequenceClassification.from_pretrained(str(DATA / "fixtures" / "seqcls_regression"))
    with pytest.raises(InputError, match="does not fit LlamaForSequenceClassification"):
        classifier.add_adapter(LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(CheckpointError, match="another base model"):  # 3 labels' score head on a 1-label model
        classifier.load_adapter(LORA / "seqcls_single_label_qv_score" / "adapter")


def test_a_classifier_adapter_trains_the_score_head_in_full_and_saves_it_under_peft_name(tmp_path):
    classifier = LlamaForSequenceClassification.from_pretrained(str(DATA / "fixtures" / "seqcls_single_label"))
    base_score = classifier.weights["score.weight"].copy()
    classifier.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj")))
    names = [name for name, _ in classifier.named_parameters()]
    assert names[-1] == "base_model.model.score.weight" and len(names) == 2 * 2 * classifier.config.num_hidden_layers + 1
    expected = reference("seqcls_single_label_qv_score")
    optimizer = AdamW(classifier.named_parameters(), lr=1e-2)
    for _ in range(2):
        _, grads = value_and_grad(classifier, **model_inputs(expected), labels=expected["labels"])
        optimizer.step(grads)
    np.testing.assert_array_equal(classifier.weights["score.weight"], base_score)  # the base head is left alone
    trained = classifier.adapter.tensors["base_model.model.score.weight"]
    assert np.abs(trained - base_score).max() > 1e-3  # its copy was trained
    logits = classifier(**model_inputs(expected)).logits

    classifier.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "score"]
    again = LlamaForSequenceClassification.from_pretrained(str(DATA / "fixtures" / "seqcls_single_label"))
    again.load_adapter(tmp_path)
    np.testing.assert_allclose(again(**model_inputs(expected)).logits, logits, rtol=0, atol=0)
