"""LoRA adapters against PEFT: loading, logits, gradients, merging, and files PEFT loads back.

tests/data/lora/ is written by tests/reference/make_lora_reference.py (PEFT 0.21.2 on
Transformers 5.23.0): PEFT adapters on fixture checkpoints with PEFT's logits, loss, gradients,
disabled and merged logits; and an adapter written by llama_np with the logits PEFT computes
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
    model = LlamaForCausalLM.from_pretrained(str(DATA / "fixtures" / MANIFEST["cases"][case]["fixture"]), dtype=dtype)
    model.load_adapter(LORA / case / "adapter")
    return model


@pytest.mark.parametrize("case", CASES)
def test_a_peft_adapter_loads_with_peft_logits_and_loss(case):
    expected = reference(case)
    model = adapted(case)
    out = model(expected["input_ids"], labels=expected["labels"])
    assert_close(out.logits, expected["logits"], f"{case}: logits with the adapter")
    assert_loss_close_to_reference(out.loss, expected["loss"], f"{case}: loss with the adapter")


@pytest.mark.parametrize("case", CASES)
def test_value_and_grad_gives_the_adapters_gradients_as_peft_names_them(case):
    expected = reference(case)
    model = adapted(case)
    loss, grads = value_and_grad(model, expected["input_ids"], labels=expected["labels"])
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
    assert_close(model(expected["input_ids"]).logits, expected["disabled_logits"], f"{case}: adapter disabled")
    model.enable_adapters()
    model.merge_adapter()
    assert model.adapter is None
    assert_close(model(expected["input_ids"]).logits, expected["merged_logits"], f"{case}: merged adapter")


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
    with pytest.raises(InputError, match="LlamaForCausalLM"):
        classifier.add_adapter(LoraConfig())
