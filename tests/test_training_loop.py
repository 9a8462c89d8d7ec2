"""The training loop, llama_np.train: the same steps as the loop written out by hand, the eval
loss at the steps it promises, the labels it derives, its progress line, its refusals, and a
trained model that save_pretrained writes and from_pretrained reads back with the same logits.

The reference for each step is value_and_grad + clip_grad_norm + AdamW.step as docs/training.md
writes the loop out, run on a second copy of the same bundled model.
"""

import sys

import numpy as np
import pytest

import llama_np
from llama_np import LlamaForCausalLM, LlamaForSequenceClassification
from llama_np.errors import InputError
from llama_np.training import loop
from llama_np.training.optim import AdamW, clip_grad_norm, cosine_with_warmup

rng = np.random.default_rng(7)


def bundled():
    return LlamaForCausalLM.from_pretrained("tiny-shakespeare")


def random_batches(count, batch=2, length=12, vocab=2000):
    return [rng.integers(3, vocab, size=(batch, length)) for _ in range(count)]


def test_train_takes_the_same_steps_as_the_loop_written_out():
    batches = random_batches(2)
    schedule = lambda step: cosine_with_warmup(step, 1e-3, warmup_steps=1, total_steps=4)  # noqa: E731
    model = bundled()
    history = llama_np.train(model, batches, AdamW(model.named_parameters(), lr=1e-3), steps=4,
                             schedule=schedule, clip=1.0, progress=False)

    by_hand = bundled()
    optimizer = AdamW(by_hand.named_parameters(), lr=1e-3)
    losses, norms = [], []
    for step in range(4):
        ids = batches[step % 2]  # a list is cycled
        loss, grads = llama_np.value_and_grad(by_hand, ids, labels=ids)
        norms.append(clip_grad_norm(grads, 1.0))
        optimizer.lr = schedule(step)
        optimizer.step(grads)
        losses.append(loss)

    np.testing.assert_allclose(history.losses, losses, rtol=1e-12, atol=0)
    np.testing.assert_allclose(history.grad_norms, norms, rtol=1e-12, atol=0)
    assert history.learning_rates == [schedule(step) for step in range(4)]
    for (name, trained), (_, expected) in zip(model.named_parameters(), by_hand.named_parameters()):
        np.testing.assert_allclose(trained, expected, rtol=0, atol=0, err_msg=name)


def test_eval_loss_is_taken_before_every_eval_every_steps_and_after_the_last():
    model = bundled()
    held_out = random_batches(2)
    history = llama_np.train(model, random_batches(3), AdamW(model.named_parameters(), lr=1e-3), steps=5,
                             eval_batches=held_out, eval_every=2, progress=False)
    assert [done for done, _ in history.eval_losses] == [0, 2, 4, 5]
    final = np.mean([model(ids, labels=ids).loss for ids in held_out])
    np.testing.assert_allclose(history.eval_losses[-1][1], final, rtol=1e-12, atol=0)
    assert history.eval_losses[-1][1] < history.eval_losses[0][1]  # five steps at 1e-3 learn something
    assert len(history.losses) == 5 and history.grad_norms == []


def test_a_causal_lm_batch_without_labels_ignores_the_padded_positions():
    model = bundled()
    ids = rng.integers(3, 2000, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    arguments = loop.batch_arguments(model, {"input_ids": ids, "attention_mask": mask})
    expected = np.where(mask == 1, ids, -100)
    np.testing.assert_array_equal(arguments["labels"], expected)
    np.testing.assert_array_equal(loop.batch_arguments(model, ids)["labels"], ids)


def test_a_trained_model_saved_and_loaded_back_gives_the_same_logits(tmp_path):
    model = bundled()
    llama_np.train(model, random_batches(2), AdamW(model.named_parameters(), lr=1e-2), steps=2, progress=False)
    ids = rng.integers(3, 2000, size=(1, 16))
    untrained = bundled()(ids).logits
    model.save_pretrained(tmp_path / "trained")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "trained")
    logits = model(ids).logits
    assert np.max(np.abs(logits - untrained)) > 1e-3  # the training did change the model
    np.testing.assert_allclose(loaded(ids).logits, logits, rtol=0, atol=0)


def test_the_progress_line_counts_the_steps_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the counter line is used
    model = bundled()
    llama_np.train(model, random_batches(1), AdamW(model.named_parameters(), lr=1e-4), steps=2, progress=True)
    err = capsys.readouterr().err
    assert "step 1/2  loss " in err and "step 2/2  loss " in err and err.endswith("\n")


def test_no_progress_is_printed_off_a_terminal(capsys):
    model = bundled()
    llama_np.train(model, random_batches(1), AdamW(model.named_parameters(), lr=1e-4), steps=1)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal


def test_train_refuses_an_iterator_that_runs_out_and_a_classifier_batch_without_labels():
    model = bundled()
    optimizer = AdamW(model.named_parameters(), lr=1e-4)
    with pytest.raises(InputError, match="ran out after 1 steps of 3"):
        llama_np.train(model, iter(random_batches(1)), optimizer, steps=3, progress=False)
    classifier = LlamaForSequenceClassification.from_pretrained("tiny-shakespeare-genre")
    with pytest.raises(InputError, match="needs labels"):
        loop.batch_arguments(classifier, random_batches(1)[0])
    with pytest.raises(InputError, match="wrap a single batch in a list"):
        llama_np.train(model, {"input_ids": random_batches(1)[0]}, optimizer, steps=1, progress=False)
    with pytest.raises(InputError, match="eval_every"):
        llama_np.train(model, random_batches(1), optimizer, steps=1, eval_every=0, progress=False)
