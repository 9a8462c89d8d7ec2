"""Write the training references: torch autograd's losses and gradients on the fixture checkpoints.

Run from the repository root with the pinned reference environment (requirements.txt):

    python tests/reference/make_training_reference.py

For each case below, Transformers loads a fixture checkpoint of tests/data/fixtures/ (float32,
eager attention, as make_fixtures.py does) and, with that fixture's stored inputs and labels:

- runs one forward pass with labels and ``loss.backward()``: the loss and every parameter's
  gradient, under the names ``model.named_parameters()`` lists (tied embeddings once);
- from a freshly loaded copy, runs 5 steps of ``torch.optim.AdamW`` (ADAMW below) on the same
  batch: the loss before each step and after the last, 6 values.

``dpo.npz`` holds a DPO batch on gqa_f32 (2 preference pairs, right-padded: the chosen rows,
then the rejected rows, TRL's layout) with seeded reference log-probabilities, and TRL's sigmoid
loss written out in torch (TRL itself is not installed): the policy's summed completion
log-probabilities, the loss with beta 0.1 and every parameter's gradient.

Separately, ``optim.npz`` holds the optimizers on one small tensor: ``torch.optim.AdamW`` and
``torch.optim.SGD`` (momentum, weight decay) over 3 steps with given gradients,
``torch.nn.utils.clip_grad_norm_`` on a dict of gradients, and the learning rates of
Transformers' ``get_cosine_schedule_with_warmup``.

Output: tests/data/training/<case>.npz, optim.npz and manifest.json (versions, date, the
settings and what each array holds). tests/test_training.py reads them without torch.
"""

import datetime
import io
import json
import os
import sys
import zipfile

import numpy as np
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_io  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.normpath(os.path.join(HERE, "..", "data", "training"))
MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "LlamaForSequenceClassification": LlamaForSequenceClassification}
ADAMW = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
ADAMW_STEPS = 5

# case name -> (fixture directory, stored call whose inputs and labels are used, what it covers)
CASES = {
    "gqa_f32": ("gqa_f32", "forward", "GQA, 8 query heads on 2 key/value heads, float32"),
    "gqa_f32_left_padding": ("gqa_f32", "padded", "the GQA model on a left-padded batch (attention_mask)"),
    "mha_bf16_sharded_4x": ("mha_bf16_sharded_4x", "forward", "MHA, bfloat16 storage, linear RoPE"),
    "mqa_tied_f16": ("mqa_tied_f16", "forward", "MQA, tied embeddings, float16 storage"),
    "bias_head_dim": ("bias_head_dim", "forward", "attention and MLP biases, head_dim 16 != D / H"),
    "rope_llama3": ("rope_llama3", "forward", "llama3 RoPE"),
    "seqcls_regression_left": ("seqcls_regression", "left", "regression (MSE), left padding"),
    "seqcls_regression_right": ("seqcls_regression", "right", "regression (MSE), right padding"),
    "seqcls_single_label_left": ("seqcls_single_label", "left", "single-label cross-entropy, left padding"),
    "seqcls_single_label_right": ("seqcls_single_label", "right", "single-label cross-entropy, right padding"),
    "seqcls_multi_label_left": ("seqcls_multi_label", "left", "multi-label BCE, left padding"),
    "seqcls_multi_label_right": ("seqcls_multi_label", "right", "multi-label BCE, right padding"),
}


def load(fixture):
    """The fixture checkpoint as Transformers reads it: float32, eager attention."""
    with open(os.path.join(fixture_io.FIXTURES, "manifest.json")) as handle:
        model_class = json.load(handle)["cases"][fixture]["model_class"]
    directory = os.path.join(fixture_io.FIXTURES, fixture)
    model = MODEL_CLASSES[model_class].from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    fixture_io.check_loaded_weights_equal_stored(model, directory)
    model.train()  # attention_dropout is 0.0: the same numbers as eval(), with gradients on
    return model


def batch(fixture, call):
    with np.load(os.path.join(fixture_io.FIXTURES, fixture, "reference.npz")) as stored:
        return {field: stored[f"{call}.{field}"] for field in ("input_ids", "attention_mask", "labels")}


def loss_of(model, inputs):
    return model(input_ids=torch.from_numpy(inputs["input_ids"]),
                 attention_mask=torch.from_numpy(inputs["attention_mask"]),
                 labels=torch.from_numpy(inputs["labels"]), use_cache=False).loss


def case_arrays(fixture, call):
    inputs = batch(fixture, call)
    model = load(fixture)
    loss = loss_of(model, inputs)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    arrays = {f"inputs.{field}": value for field, value in inputs.items()}
    arrays["loss"] = np.float32(loss.item())
    arrays["parameter_names"] = np.array(names)
    arrays.update({f"grad.{name}": p.grad.numpy() for name, p in model.named_parameters()})

    model = load(fixture)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for _ in range(ADAMW_STEPS):
        optimizer.zero_grad()
        loss = loss_of(model, inputs)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(loss_of(model, inputs).item())
    arrays["adamw_losses"] = np.array(losses, dtype=np.float32)
    return arrays


def dpo_arrays():
    """TRL's sigmoid DPO loss on a batch of 2 pairs, differentiated by torch autograd."""
    rng = np.random.default_rng(11)
    prompt, chosen_lengths, rejected_lengths, length = 4, (5, 3), (4, 6), 10
    rows = 2 * len(chosen_lengths)
    input_ids = np.zeros((rows, length), dtype=np.int64)
    attention_mask = np.zeros((rows, length), dtype=np.int64)
    completion_mask = np.zeros((rows, length), dtype=np.int64)
    prompts = rng.integers(1, 256, size=(len(chosen_lengths), prompt))
    for row, completion in enumerate(chosen_lengths + rejected_lengths):
        pair = row % len(chosen_lengths)
        input_ids[row, :prompt] = prompts[pair]
        input_ids[row, prompt:prompt + completion] = rng.integers(1, 256, size=completion)
        attention_mask[row, :prompt + completion] = 1
        completion_mask[row, prompt:prompt + completion] = 1
    model = load("gqa_f32")
    logits = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                   use_cache=False).logits
    # TRL: the logits at t score the token at t + 1, on the completion's tokens only, summed.
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(log_probs, 2, torch.from_numpy(input_ids[:, 1:, None])).squeeze(2)
    policy = (picked * torch.from_numpy(completion_mask[:, 1:]).float()).sum(-1)
    reference = policy.detach().numpy().astype(np.float64) + rng.normal(0.0, 2.0, size=rows)
    reference_tensor = torch.from_numpy(reference).float()
    pairs = rows // 2
    beta = 0.1
    margins = (policy[:pairs] - policy[pairs:]) - (reference_tensor[:pairs] - reference_tensor[pairs:])
    loss = -torch.nn.functional.logsigmoid(beta * margins).mean()
    loss.backward()
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
              "reference_log_probs": reference.astype(np.float32), "policy_log_probs": policy.detach().numpy(),
              "beta": np.float32(beta), "loss": np.float32(loss.item()),
              "parameter_names": np.array([name for name, _ in model.named_parameters()])}
    arrays.update({f"grad.{name}": p.grad.numpy() for name, p in model.named_parameters()})
    return arrays


def optim_arrays():
    """torch's optimizers, clipping and Transformers' schedule on small seeded arrays."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, generator=generator)
    grads = torch.randn(3, 3, 4, generator=generator)  # one (3, 4) gradient per step
    arrays = {"start": start.numpy(), "grads": grads.numpy()}
    for name, make in (("adamw", lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)),
                       ("sgd", lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01))):
        parameter = torch.nn.Parameter(start.clone())
        optimizer = make(parameter)
        after = []
        for step in range(grads.shape[0]):
            parameter.grad = grads[step].clone()
            optimizer.step()
            after.append(parameter.detach().clone())
        arrays[f"{name}.after"] = torch.stack(after).numpy()
    clip = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    clip[0].grad = grads[0].clone()
    clip[1].grad = torch.randn(5, generator=generator)
    arrays["clip.grad_a"], arrays["clip.grad_b"] = clip[0].grad.numpy().copy(), clip[1].grad.numpy().copy()
    arrays["clip.norm"] = np.float32(torch.nn.utils.clip_grad_norm_(clip, max_norm=1.0).item())
    arrays["clip.clipped_a"], arrays["clip.clipped_b"] = clip[0].grad.numpy(), clip[1].grad.numpy()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=50)
    rates = []
    for _ in range(60):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    arrays["schedule.lr"] = np.array(rates, dtype=np.float64)
    return arrays


def save(path, arrays):
    """An .npz with fixed member timestamps, so an unchanged rerun writes identical bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        for key in sorted(arrays):
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[key]), allow_pickle=False)
            archive.writestr(member, buffer.getvalue())


def main():
    torch.set_num_threads(1)  # one summation order, whatever the machine
    os.makedirs(OUTPUT, exist_ok=True)
    cases = {}
    for case, (fixture, call, covers) in CASES.items():
        arrays = case_arrays(fixture, call)
        save(os.path.join(OUTPUT, f"{case}.npz"), arrays)
        cases[case] = {"fixture": fixture, "call": call, "covers": covers,
                       "parameters": len(arrays["parameter_names"])}
        print(f"{case}: loss {float(arrays['loss']):.6f}, AdamW losses {np.round(arrays['adamw_losses'], 5).tolist()}")
    save(os.path.join(OUTPUT, "optim.npz"), optim_arrays())
    save(os.path.join(OUTPUT, "dpo.npz"), dpo_arrays())
    manifest = {
        "about": "torch autograd's losses and gradients on the fixture checkpoints of tests/data/fixtures, "
                 "and torch's optimizers; written by tests/reference/make_training_reference.py "
                 "(see tests/reference/README.md).",
        "versions": dict(fixture_io.library_versions(), date=datetime.date.today().isoformat()),
        "adamw": dict(ADAMW, steps=ADAMW_STEPS),
        "case_arrays": {
            "inputs.input_ids, inputs.attention_mask, inputs.labels": "the fixture call's stored inputs",
            "loss": "float32 loss of model(input_ids, attention_mask, labels)",
            "parameter_names": "model.named_parameters() names, in torch's order",
            "grad.<name>": "float32 gradient of the loss with respect to that parameter",
            "adamw_losses": "loss before each of the AdamW steps and after the last (steps + 1 values), "
                            "the same batch every step, from a freshly loaded model",
        },
        "optim_arrays": {
            "start, grads": "a (3, 4) parameter and the gradient given at each of 3 steps",
            "adamw.after": "the parameter after each step of AdamW(lr=0.1, weight_decay=0.1)",
            "sgd.after": "the parameter after each step of SGD(lr=0.1, momentum=0.9, weight_decay=0.01)",
            "clip.*": "clip_grad_norm_(max_norm=1.0) of two gradients: the norm returned and the clipped gradients",
            "schedule.lr": "get_cosine_schedule_with_warmup(warmup 10, total 50) on lr 1e-3, steps 0..59",
        },
        "dpo_arrays": {
            "input_ids, attention_mask, completion_mask": "2 pairs on gqa_f32: rows 0-1 chosen, rows 2-3 "
                                                          "rejected; a shared 4-token prompt, right padding",
            "reference_log_probs": "the policy's own log-probabilities plus seeded N(0, 2²) offsets",
            "policy_log_probs": "summed log-probabilities of each row's completion tokens (TRL's rule)",
            "beta, loss": "TRL's sigmoid DPO loss with that beta",
            "parameter_names, grad.<name>": "as in the case files",
        },
        "cases": cases,
    }
    with open(os.path.join(OUTPUT, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
