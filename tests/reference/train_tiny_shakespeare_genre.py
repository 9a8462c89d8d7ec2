"""Fine-tune the bundled genre classifier ``tiny-shakespeare-genre`` from ``tiny-shakespeare``
and write it to ``llama_np/assets/tiny-shakespeare-genre/``.

Run from the repository root after ``train_tiny_shakespeare.py`` (it starts from the shipped
float16 language model)::

    python tests/reference/train_tiny_shakespeare_genre.py 2>&1 | tee tests/reference/_work/train_genre.log

The task: tell the First Folio genre (comedy / history / tragedy) of a passage of 128 tokens
(bos + 127 text tokens, consecutive non-overlapping windows of each play). Training passages
come from the 30 First Folio plays that are not held out; test passages come from the six
held-out plays (two per genre) that neither the tokenizer, the language model nor the
classifier saw during training (``shakespeare_data.py``). Batches are class-balanced.

Padding: the tokenizer has no pad piece, so ``<unk>`` (id 0) doubles as the pad token
(``config.pad_token_id = 0``), as is common for Llama 2 fine-tuning. With byte fallback the
tokenizer never emits ``<unk>`` for real text, so pooling at the last non-pad token is exact.

Writes the measured numbers to ``_work/genre_results.json`` for the model card
(``write_model_cards.py``). Takes about 10 minutes on 2 CPU cores.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shakespeare_data import (  # noqa: E402
    CLASSIFIER_TRAIN_PLAYS, FOLIO_GENRE, GENRES, HELD_OUT_PLAYS, WORK_DIR, fetch_corpus, read_work,
)
from train_tiny_shakespeare import save_float16, write_tokenizer_files  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LM_DIR = REPO / "llama_np" / "assets" / "tiny-shakespeare"
OUT_DIR = REPO / "llama_np" / "assets" / "tiny-shakespeare-genre"

SEED = 4321
PASSAGE = 128  # tokens per passage, bos included
PAD_TOKEN_ID = 0  # <unk>
TRAIN = dict(
    steps=300,
    batch_size=32,
    peak_lr=3e-4,
    min_lr=3e-5,
    warmup_steps=30,
    weight_decay=0.01,
    grad_clip=1.0,
)


def log(msg):
    print(msg, flush=True)


def passages(sp, texts, plays):
    """(ids [N, PASSAGE], labels [N], play index [N]) from consecutive windows of each play."""
    rows, labels, where = [], [], []
    n = PASSAGE - 1
    for k, play in enumerate(plays):
        ids = sp.encode(read_work(texts, play))
        for i in range(0, len(ids) - n + 1, n):
            rows.append([sp.bos_id()] + ids[i : i + n])
            labels.append(GENRES.index(FOLIO_GENRE[play]))
            where.append(k)
    return np.array(rows, dtype=np.int64), np.array(labels, dtype=np.int64), np.array(where)


@torch.no_grad()
def predict(model, ids, batch_size=64):
    model.eval()
    preds = []
    for i in range(0, len(ids), batch_size):
        logits = model(input_ids=torch.tensor(ids[i : i + batch_size])).logits
        preds.append(logits.argmax(-1).numpy())
    model.train()
    return np.concatenate(preds)


def confusion(labels, preds):
    m = np.zeros((len(GENRES), len(GENRES)), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def lr_at(step):
    t = TRAIN
    if step < t["warmup_steps"]:
        return t["peak_lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["peak_lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="override for a quick trial")
    parser.add_argument("--lm", type=Path, default=LM_DIR)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--max-test-passages", type=int, default=None, help="for a quick trial only")
    args = parser.parse_args()
    TRAIN["steps"] = args.steps

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)

    texts = fetch_corpus()
    sp = spm.SentencePieceProcessor(model_file=str(args.lm / "tokenizer.model"))
    train_ids, train_labels, _ = passages(sp, texts, CLASSIFIER_TRAIN_PLAYS)
    test_ids, test_labels, test_play = passages(sp, texts, HELD_OUT_PLAYS)
    if args.max_test_passages:
        keep = np.random.default_rng(SEED).choice(len(test_ids), size=args.max_test_passages, replace=False)
        test_ids, test_labels, test_play = test_ids[keep], test_labels[keep], test_play[keep]
    assert not (train_ids == PAD_TOKEN_ID).any() and not (test_ids == PAD_TOKEN_ID).any()
    train_counts = np.bincount(train_labels, minlength=3)
    test_counts = np.bincount(test_labels, minlength=3)
    log(f"train passages {len(train_ids)} {dict(zip(GENRES, train_counts.tolist()))} from {len(CLASSIFIER_TRAIN_PLAYS)} plays; "
        f"test passages {len(test_ids)} {dict(zip(GENRES, test_counts.tolist()))} from {HELD_OUT_PLAYS}")

    model = transformers.LlamaForSequenceClassification.from_pretrained(
        args.lm, dtype=torch.float32, num_labels=len(GENRES),
        id2label=dict(enumerate(GENRES)), label2id={g: i for i, g in enumerate(GENRES)},
        pad_token_id=PAD_TOKEN_ID,
    )
    model.config.problem_type = "single_label_classification"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters {n_params:,}; training {TRAIN}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["peak_lr"],
    )
    by_class = [np.flatnonzero(train_labels == c) for c in range(len(GENRES))]

    start = time.time()
    model.train()
    running = []
    for step in range(TRAIN["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        classes = rng.integers(0, len(GENRES), size=TRAIN["batch_size"])
        index = np.array([rng.choice(by_class[c]) for c in classes])
        out = model(input_ids=torch.tensor(train_ids[index]), labels=torch.tensor(train_labels[index]))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        optimizer.step()
        running.append(out.loss.item())
        if step % 10 == 0 or step == TRAIN["steps"] - 1:
            elapsed = time.time() - start
            tokens = (step + 1) * TRAIN["batch_size"] * PASSAGE
            log(f"step {step:4d}  loss {np.mean(running[-10:]):.4f}  lr {lr_at(step):.2e}  "
                f"tokens/s {tokens / elapsed:,.0f}  elapsed {elapsed / 60:.1f} min")
    train_minutes = (time.time() - start) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    save_float16(model, args.out, dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID))
    write_tokenizer_files(args.out, args.lm / "tokenizer.model")
    # The classifier pads with <unk>; say so in its tokenizer files.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((args.out / name).read_text())
        data["pad_token"] = "<unk>" if name == "tokenizer_config.json" else data["unk_token"]
        (args.out / name).write_text(json.dumps(data, indent=2) + "\n")

    shipped = transformers.LlamaForSequenceClassification.from_pretrained(args.out, dtype=torch.float32)
    preds = predict(shipped, test_ids)
    accuracy = float((preds == test_labels).mean())
    matrix = confusion(test_labels, preds)
    majority = int(np.argmax(train_counts))
    majority_accuracy = float((test_labels == majority).mean())
    per_play = {p: float((preds[test_play == k] == test_labels[test_play == k]).mean())
                for k, p in enumerate(HELD_OUT_PLAYS)}
    subset = np.random.default_rng(SEED).choice(len(train_ids), size=min(2000 if not args.max_test_passages else 100, len(train_ids)), replace=False)
    train_accuracy = float((predict(shipped, train_ids[subset]) == train_labels[subset]).mean())
    log(f"held-out accuracy {accuracy:.4f}  (majority class '{GENRES[majority]}': {majority_accuracy:.4f}); "
        f"accuracy on {len(subset)} training passages {train_accuracy:.4f}")
    log(f"confusion matrix (rows true {GENRES}, columns predicted):\n{matrix}")
    log(f"per held-out play: {per_play}")

    results = dict(
        parameters=n_params,
        training=dict(TRAIN, passage=PASSAGE, seed=SEED, pad_token_id=PAD_TOKEN_ID),
        train_plays=CLASSIFIER_TRAIN_PLAYS,
        test_plays=HELD_OUT_PLAYS,
        train_counts=dict(zip(GENRES, train_counts.tolist())),
        test_counts=dict(zip(GENRES, test_counts.tolist())),
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        confusion=matrix.tolist(),
        majority_class=GENRES[majority],
        majority_accuracy=majority_accuracy,
        per_play_accuracy=per_play,
        train_minutes=train_minutes,
        hardware=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      sentencepiece=spm.__version__, numpy=np.__version__, python=platform.python_version()),
    )
    # A trial run into another folder must not overwrite the numbers of the shipped model.
    results_path = WORK_DIR / "genre_results.json" if args.out == OUT_DIR else args.out / "genre_results.json"
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    log("done")


if __name__ == "__main__":
    main()
