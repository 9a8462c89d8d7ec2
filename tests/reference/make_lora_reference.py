"""Write the LoRA references: PEFT adapters on fixture checkpoints and what PEFT computes with them.

Run from the repository root with the pinned reference environment (requirements.txt + peft):

    python tests/reference/make_lora_reference.py

For each case below, Transformers loads a fixture checkpoint of tests/data/fixtures/ (float32,
eager attention) and PEFT wraps it (``get_peft_model``) with the case's ``LoraConfig``. PEFT
initialises B to zero, which would make the adapter a no-op, so every lora_A and lora_B is then
overwritten with seeded N(0, 0.1²) values. A ``task_type="SEQ_CLS"`` case wraps a
LlamaForSequenceClassification: PEFT then trains its ``score`` head in full (modules_to_save), and
that copy of the head gets seeded N(0, 0.1²) added, so that it differs from the base model's. The
classifier's batch is the fixture's stored left-padded one (input_ids, attention_mask, labels).
The script writes, under tests/data/lora/<case>/:

- ``adapter/``: the adapter as PEFT saves it (``save_pretrained``: adapter_config.json,
  adapter_model.safetensors);
- ``reference.npz``: with the fixture's stored ``forward`` inputs and labels, the logits and
  loss with the adapter, the gradient of every lora_A / lora_B and of the score copy (named as in
  the file, without PEFT's ``.default`` / ``.modules_to_save.default``), the logits with the adapter disabled, and the logits after
  ``merge_and_unload()``.

Then the other direction: ``llama_np_adapter/`` is an adapter written by llama_np (the
repository's own package, imported from the working tree: ``add_adapter`` with seed 0 on
gqa_f32, then lora_B set to seeded values so it is not a no-op, then ``save_adapter``); PEFT
loads it with ``PeftModel.from_pretrained`` and ``llama_np_adapter.npz`` stores PEFT's logits.
tests/test_lora.py checks that llama_np still writes the same adapter and computes those logits.
"""

import datetime
import json
import os
import shutil
import sys

import numpy as np
import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, REPOSITORY)
import fixture_io  # noqa: E402
from make_training_reference import save  # noqa: E402  (the same deterministic .npz writer)

OUTPUT = os.path.join(REPOSITORY, "tests", "data", "lora")
CASES = {
    "gqa_f32_qv_down": ("gqa_f32", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "mqa_tied_f16_rslora_all": ("mqa_tied_f16", dict(r=2, lora_alpha=4, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "seqcls_single_label_qv_score": ("seqcls_single_label", dict(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                                 target_modules=["q_proj", "v_proj"])),
}
# What llama_np writes for the other direction (mirrored in tests/test_lora.py).
LLAMA_NP_ADAPTER = {"fixture": "gqa_f32", "r": 4, "lora_alpha": 16, "target_modules": ["k_proj", "o_proj", "up_proj"],
                    "seed": 0, "lora_B_seed": 1, "lora_B_std": 0.1}


def base_model(fixture, task_type="CAUSAL_LM"):
    directory = os.path.join(fixture_io.FIXTURES, fixture)
    model_class = LlamaForSequenceClassification if task_type == "SEQ_CLS" else LlamaForCausalLM
    model = model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    fixture_io.check_loaded_weights_equal_stored(model, directory)
    return model


def fixture_batch(fixture, task_type="CAUSAL_LM"):
    with np.load(os.path.join(fixture_io.FIXTURES, fixture, "reference.npz")) as stored:
        if task_type == "SEQ_CLS":  # the classifier fixtures' left-padded batch
            return {field: torch.from_numpy(stored[f"left.{field}"]) for field in ("input_ids", "attention_mask", "labels")}
        return {field: torch.from_numpy(stored[f"forward.{field}"]) for field in ("input_ids", "labels")}


def file_name(parameter_name):
    """PEFT's parameter name -> its name in adapter_model.safetensors (no adapter name):
    ….q_proj.lora_A.default.weight -> ….q_proj.lora_A.weight, score.modules_to_save.default.weight -> score.weight."""
    return parameter_name.replace(".modules_to_save.default", "").replace(".default", "")


def relative_base(adapter_directory, fixture):
    """Name the base model by its path in the repository, not on this machine, list the target
    modules in a fixed order, and drop PEFT's model-card template (README.md)."""
    os.remove(os.path.join(adapter_directory, "README.md"))
    path = os.path.join(adapter_directory, "adapter_config.json")
    with open(path) as handle:
        config = json.load(handle)
    config["base_model_name_or_path"] = f"tests/data/fixtures/{fixture}"
    config["target_modules"] = sorted(config["target_modules"])  # PEFT keeps a set: any order
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def case_arrays(case, fixture, settings):
    torch.manual_seed(0)
    task_type = settings.get("task_type", "CAUSAL_LM")
    model = get_peft_model(base_model(fixture, task_type), LoraConfig(lora_dropout=0.0, **settings))
    model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif ".modules_to_save." in name:  # the head PEFT trains in full: moved off the base's
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    directory = os.path.join(OUTPUT, case)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    model.save_pretrained(os.path.join(directory, "adapter"))
    relative_base(os.path.join(directory, "adapter"), fixture)

    batch = fixture_batch(fixture, task_type)
    inputs = {field: value for field, value in batch.items() if field != "labels"}
    out = model(**inputs, labels=batch["labels"], use_cache=False)
    out.loss.backward()
    arrays = {**{field: value.numpy() for field, value in batch.items()},
              "logits": out.logits.detach().numpy(), "loss": np.float32(out.loss.item())}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            arrays[f"grad.{file_name(name)}"] = parameter.grad.numpy()
    with torch.no_grad(), model.disable_adapter():
        arrays["disabled_logits"] = model(**inputs, use_cache=False).logits.numpy()
    merged = model.merge_and_unload()
    with torch.no_grad():
        arrays["merged_logits"] = merged(**inputs, use_cache=False).logits.numpy()
    save(os.path.join(directory, "reference.npz"), arrays)
    return {"fixture": fixture, "lora_config": settings, "gradients": sum(k.startswith("grad.") for k in arrays)}


def write_llama_np_adapter():
    """An adapter saved by llama_np, and the logits PEFT computes when it loads it."""
    import llama_np
    from llama_np.training.lora import LoraConfig as NumpyLoraConfig

    spec = LLAMA_NP_ADAPTER
    model = llama_np.LlamaForCausalLM.from_pretrained(os.path.join(fixture_io.FIXTURES, spec["fixture"]))
    model.add_adapter(NumpyLoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"],
                                      target_modules=tuple(spec["target_modules"])), seed=spec["seed"])
    rng = np.random.default_rng(spec["lora_B_seed"])
    for name, value in model.adapter.tensors.items():
        if ".lora_B." in name:
            value[...] = spec["lora_B_std"] * rng.normal(size=value.shape)
    directory = os.path.join(OUTPUT, "llama_np_adapter")
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    model.name_or_path = f"tests/data/fixtures/{spec['fixture']}"  # written into adapter_config.json
    model.save_adapter(directory)
    peft_model = PeftModel.from_pretrained(base_model(spec["fixture"]), directory)
    peft_model.eval()
    batch = fixture_batch(spec["fixture"])
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], use_cache=False).logits.numpy()
        base_logits = base_model(spec["fixture"])(input_ids=batch["input_ids"], use_cache=False).logits.numpy()
    if np.abs(logits - base_logits).max() < 1e-2:
        raise RuntimeError("PEFT's logits with llama_np's adapter equal the base model's: did it load?")
    save(os.path.join(OUTPUT, "llama_np_adapter.npz"), {"input_ids": batch["input_ids"].numpy(), "logits": logits})


def main():
    torch.set_num_threads(1)
    os.makedirs(OUTPUT, exist_ok=True)
    cases = {case: case_arrays(case, fixture, settings) for case, (fixture, settings) in CASES.items()}
    write_llama_np_adapter()
    manifest = {
        "about": "PEFT LoRA adapters on fixture checkpoints and what PEFT computes with them; written by "
                 "tests/reference/make_lora_reference.py (see tests/reference/README.md).",
        "versions": dict(fixture_io.library_versions(), peft=peft.__version__,
                         date=datetime.date.today().isoformat()),
        "cases": cases,
        "case_arrays": {
            "input_ids, labels": "the fixture's stored forward inputs and labels (a SEQ_CLS case: its "
                                 "left-padded batch, with attention_mask)",
            "logits, loss": "float32 logits and loss of the PEFT model with the adapter",
            "grad.<name>": "gradient of the loss with respect to each lora_A / lora_B (and a SEQ_CLS case's "
                           "score copy), named as in the file",
            "disabled_logits": "logits inside PeftModel.disable_adapter() (the base model)",
            "merged_logits": "logits after merge_and_unload()",
        },
        "llama_np_adapter": dict(LLAMA_NP_ADAPTER, holds="llama_np_adapter/ written by llama_np's save_adapter; "
                                 "llama_np_adapter.npz: input_ids and the logits PEFT computes with it"),
    }
    with open(os.path.join(OUTPUT, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
