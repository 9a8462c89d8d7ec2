"""A small training loop: value_and_grad, clipping, a schedule and an optimizer step, repeated.

    history = train(model, batches, AdamW(model.named_parameters(), lr=1e-3), steps=100,
                    eval_batches=held_out, eval_every=20, clip=1.0,
                    schedule=lambda step: cosine_with_warmup(step, 1e-3, 10, 100))
    history.losses          # the training loss of each step, before its update
    history.eval_losses     # [(steps done, mean loss over eval_batches), ...]

It is the loop of ``optim.py``'s docstring and no more: no gradient accumulation, no mixed
precision, no checkpoints on the way (``model.save_pretrained(directory)`` writes the result).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from llama_np.errors import InputError
from llama_np.model import LlamaForCausalLM
from llama_np.training.model_backward import value_and_grad
from llama_np.training.optim import clip_grad_norm


@dataclass
class TrainingHistory:
    """What ``train`` measured.

    losses           the loss of each step's batch, before that step's update (as Transformers'
                     Trainer logs it)
    learning_rates   the learning rate each step used
    grad_norms       each step's global gradient norm before clipping (only with ``clip``)
    eval_losses      (steps done, mean of model(...).loss over eval_batches): before the first
                     step, every ``eval_every`` steps and after the last
    """

    losses: list = field(default_factory=list)
    learning_rates: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    eval_losses: list = field(default_factory=list)


def batch_arguments(model, batch) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` of one batch, as value_and_grad takes them.

    A batch is a dict with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T) and
    ``labels``, or a bare (B, T) array of token ids. A causal LM without labels learns to predict
    its own input: labels = input_ids, with −100 (ignored) where the attention mask is 0, as
    Transformers' ``DataCollatorForLanguageModeling`` pads them. A classifier needs labels.
    """
    if not isinstance(batch, dict):
        batch = {"input_ids": batch}
    unknown = sorted(set(batch) - {"input_ids", "attention_mask", "labels"})
    if unknown or "input_ids" not in batch:
        raise InputError(f"a training batch is a dict with input_ids (and optionally attention_mask and labels) "
                         f"or an array of token ids; got keys {sorted(batch)}")
    input_ids = np.asarray(batch["input_ids"])
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        if not isinstance(model, LlamaForCausalLM):
            raise InputError(f"a batch for {type(model).__name__} needs labels (the classes to learn)")
        labels = input_ids if attention_mask is None else np.where(np.asarray(attention_mask) != 0, input_ids, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_stream(batches):
    """The batches again and again: a list (or any re-iterable) is cycled, epoch after epoch; a
    one-shot iterator is read once, and running out of it is an error rather than a short run."""
    while True:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0:
            raise InputError("train: batches is empty")
        if iter(batches) is batches:  # an iterator: exhausted, and it cannot start again
            return


def evaluate(model, eval_batches) -> float:
    """The mean of ``model(...).loss`` over ``eval_batches`` (each batch weighs the same)."""
    losses = [model(**batch_arguments(model, batch)).loss for batch in eval_batches]
    if not losses:
        raise InputError("train: eval_batches is empty")
    return float(np.mean(losses))


def train(model, batches, optimizer, steps: int, eval_batches=None, eval_every: int | None = None,
          schedule=None, clip: float | None = None, progress: bool | None = None) -> TrainingHistory:
    """Train ``model`` in place for ``steps`` optimizer steps and return what was measured.

    model        a LlamaForCausalLM or LlamaForSequenceClassification (with a LoRA adapter
                 enabled, the adapter's tensors are what changes)
    batches      batches as ``batch_arguments`` reads them; a list is cycled, an iterator read once
    optimizer    ``AdamW`` or ``SGD`` over ``model.named_parameters()`` (or the adapter's tensors)
    eval_batches batches for the eval loss, computed before the first step, every ``eval_every``
                 steps (default: only before and after) and after the last step
    schedule     step (from 0) -> learning rate, set on the optimizer before each step, e.g.
                 ``lambda step: cosine_with_warmup(step, 1e-3, 10, steps)``
    clip         the global gradient norm to clip to (``clip_grad_norm``), or None
    progress     a bar on stderr with the latest loss: None shows it when stderr is a terminal,
                 True always, False never. It is tqdm's when tqdm is installed (``llama-np[fast]``),
                 else a counter line.

    Each step: loss, grads = value_and_grad(model, **batch); clip; set the learning rate; step.
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise InputError(f"train: steps must be a non-negative integer, got {steps!r}")
    if eval_every is not None and not (isinstance(eval_every, int) and eval_every > 0):
        raise InputError(f"train: eval_every must be a positive integer or None, got {eval_every!r}")
    if isinstance(batches, (dict, np.ndarray)):
        raise InputError("train: batches is a list (or an iterator) of batches; wrap a single batch in a list")
    history = TrainingHistory()
    bar = step_progress(steps, sys.stderr.isatty() if progress is None else progress)
    if eval_batches is not None:
        history.eval_losses.append((0, evaluate(model, eval_batches)))
    stream = batch_stream(batches)
    for step in range(steps):
        batch = next(stream, None)
        if batch is None:
            bar.close()
            raise InputError(f"train: the batches ran out after {step} steps of {steps}; pass a list "
                             f"(cycled) or an iterator with at least {steps} batches")
        loss, grads = value_and_grad(model, **batch_arguments(model, batch))
        if clip is not None:
            history.grad_norms.append(clip_grad_norm(grads, clip))
        if schedule is not None:
            optimizer.lr = schedule(step)
        optimizer.step(grads)
        history.losses.append(float(loss))
        history.learning_rates.append(optimizer.lr)
        done = step + 1
        if eval_batches is not None and (done == steps or (eval_every is not None and done % eval_every == 0)):
            history.eval_losses.append((done, evaluate(model, eval_batches)))
        bar.update(done, history)
    bar.close()
    return history


def step_progress(steps: int, show: bool):
    """A bar over the steps with ``update(done, history)`` and ``close()``: tqdm's when tqdm is
    installed, else a counter line, or nothing when ``show`` is False."""
    if not show:
        return NoProgress()
    try:
        from tqdm.auto import tqdm  # optional: a bar (also in a notebook) when installed
    except ImportError:
        return CounterLine(steps)
    return TqdmSteps(tqdm(total=steps, unit="step", file=sys.stderr))


def latest(history: TrainingHistory) -> dict:
    """The figures a progress line shows: the last step's loss and the last eval loss."""
    figures = {"loss": f"{history.losses[-1]:.4f}"}
    if history.eval_losses:
        figures["eval"] = f"{history.eval_losses[-1][1]:.4f}"
    return figures


class NoProgress:
    def update(self, done: int, history: TrainingHistory) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmSteps:
    def __init__(self, bar):
        self.tqdm = bar

    def update(self, done: int, history: TrainingHistory) -> None:
        self.tqdm.set_postfix(latest(history), refresh=False)
        self.tqdm.update(done - self.tqdm.n)

    def close(self) -> None:
        self.tqdm.close()


class CounterLine:
    def __init__(self, steps: int):
        self.steps = steps

    def update(self, done: int, history: TrainingHistory) -> None:
        figures = "  ".join(f"{name} {value}" for name, value in latest(history).items())
        print(f"\rstep {done}/{self.steps}  {figures}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)  # the last line stays, ended
