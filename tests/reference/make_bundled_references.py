"""Store Transformers' outputs for the two bundled models in ``tests/data/bundled/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements.txt``, after the
bundled models exist in ``llama_np/assets/``::

    python tests/reference/make_bundled_references.py

The shipped float16 checkpoints are loaded in Transformers as float32 with eager attention (the
reference of docs/reference.md §10.3). Prompts are tokenized with sentencepiece from the shipped
``tokenizer.model``, bos prepended (what ``LlamaTokenizer`` does with ``add_bos_token``).

Writes, with arrays named ``<call>.<field>`` as in ``tests/data/fixtures/``:

* ``tiny-shakespeare.npz``: for each prompt ``prompt<i>``: ``input_ids`` (1, T),
  ``attention_mask``, ``logits`` (1, T, V), ``hidden_states`` (L + 1, 1, T, D; the last one after
  the final norm), ``attentions`` (L, 1, H, T, T), ``loss`` (labels = input_ids), ``sequences``
  (greedy continuation of ``max_new_tokens`` = 32, prompt included), ``eos_token_id``,
  ``pad_token_id``, ``max_new_tokens``, ``text``. Plus ``batch``: the same prompts left-padded
  (pad id 2 = eos, attention_mask 0 on pads) with their ``logits`` and greedy ``sequences``.
* ``tiny-shakespeare-genre.npz``: three passages (one per genre, different lengths) as a
  ``left``-padded and a ``right``-padded batch (pad id = config.pad_token_id):
  ``input_ids``, ``attention_mask``, ``labels``, ``logits`` (3, 3), ``loss``; and each passage
  alone, unpadded, as ``single<i>``.
* ``manifest.json``: library versions, date, sha256 of the checkpoint files the references were
  made from, the prompts, and what each array holds.
"""

import argparse
import datetime
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "llama_np" / "assets"
OUT = REPO / "tests" / "data" / "bundled"
LM_NAME, GENRE_NAME = "tiny-shakespeare", "tiny-shakespeare-genre"
MAX_NEW_TOKENS = 32

# Chosen so that no greedy step is close to a tie (the smallest top-1/top-2 logit gap is stored
# in the manifest; the script refuses gaps below MIN_GREEDY_GAP).
PROMPTS = [
    "HAMLET.\nTo be, or not to be, that is the question:",
    "KING LEAR.\nBlow, winds, and crack your cheeks!",
    "PROSPERO.\nWe are such stuff as dreams are made on,",
    "ANTONY.\nFriends, Romans, countrymen, lend me your ears;",
]
MIN_GREEDY_GAP = 1e-3
# One passage per genre from the held-out plays, of different lengths so padding matters.
PASSAGES = [
    ("Twelfth Night", "comedy",
     "DUKE.\nIf music be the food of love, play on,\nGive me excess of it; that, surfeiting,\n"
     "The appetite may sicken and so die.\nThat strain again;--it had a dying fall:"),
    ("Henry V", "history",
     "KING HENRY.\nOnce more unto the breach, dear friends, once more;\n"
     "Or close the wall up with our English dead!"),
    ("Macbeth", "tragedy", "MACBETH.\nIs this a dagger which I see before me,"),
]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encode(sp, text):
    return [sp.bos_id()] + sp.encode(text)


def pad(rows, pad_id, side):
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def greedy(model, ids, mask, eos, pad_id):
    """Greedy continuation and the smallest top-1/top-2 logit gap met on the way (tie check)."""
    out = model.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False, eos_token_id=eos, pad_token_id=pad_id, output_scores=True,
        return_dict_in_generate=True,
    )
    gaps = [float((s.topk(2).values[:, 0] - s.topk(2).values[:, 1]).min()) for s in out.scores]
    return out.sequences.numpy(), min(gaps)


@torch.no_grad()
def lm_references(model_dir, sp):
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    eos, pad_id = 2, 2
    arrays, margins = {}, {}
    for i, text in enumerate(PROMPTS):
        ids = np.array([encode(sp, text)], dtype=np.int64)
        assert ids.shape[1] <= 24, (text, ids.shape)
        mask = np.ones_like(ids)
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(ids),
                    output_hidden_states=True, output_attentions=True)
        sequences, margins[f"prompt{i}"] = greedy(model, ids, mask, eos, pad_id)
        arrays.update({
            f"prompt{i}.input_ids": ids,
            f"prompt{i}.attention_mask": mask,
            f"prompt{i}.logits": out.logits.numpy(),
            f"prompt{i}.hidden_states": torch.stack(out.hidden_states).numpy(),
            f"prompt{i}.attentions": torch.stack(out.attentions).numpy(),
            f"prompt{i}.loss": np.float32(out.loss.item()),
            f"prompt{i}.sequences": sequences,
            f"prompt{i}.max_new_tokens": np.int64(MAX_NEW_TOKENS),
            f"prompt{i}.eos_token_id": np.array([eos], dtype=np.int64),
            f"prompt{i}.pad_token_id": np.int64(pad_id),
            f"prompt{i}.text": np.array(text),
        })
    ids, mask = pad([encode(sp, t) for t in PROMPTS], pad_id, "left")
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    sequences, margins["batch"] = greedy(model, ids, mask, eos, pad_id)
    arrays.update({
        "batch.input_ids": ids,
        "batch.attention_mask": mask,
        "batch.logits": out.logits.numpy(),
        "batch.sequences": sequences,
        "batch.max_new_tokens": np.int64(MAX_NEW_TOKENS),
        "batch.eos_token_id": np.array([eos], dtype=np.int64),
        "batch.pad_token_id": np.int64(pad_id),
    })
    for i in range(len(PROMPTS)):  # a left-padded row continues exactly like the prompt alone
        alone = arrays[f"prompt{i}.sequences"][0]
        row = sequences[i][ids.shape[1] - len(encode(sp, PROMPTS[i])):]
        if not np.array_equal(row[: len(alone)], alone):
            print(f"note: batch row {i} greedy continuation differs from prompt{i} alone")
    return arrays, margins


@torch.no_grad()
def genre_references(model_dir, sp):
    model = transformers.LlamaForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    pad_id = model.config.pad_token_id
    label2id = model.config.label2id
    rows = [encode(sp, text) for _, _, text in PASSAGES]
    labels = np.array([label2id[genre] for _, genre, _ in PASSAGES], dtype=np.int64)
    arrays = {}
    for side in ("left", "right"):
        ids, mask = pad(rows, pad_id, side)
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        arrays.update({
            f"{side}.input_ids": ids,
            f"{side}.attention_mask": mask,
            f"{side}.labels": labels,
            f"{side}.logits": out.logits.numpy(),
            f"{side}.loss": np.float32(out.loss.item()),
        })
    for i, row in enumerate(rows):
        ids = np.array([row], dtype=np.int64)
        out = model(torch.tensor(ids))
        arrays.update({f"single{i}.input_ids": ids, f"single{i}.attention_mask": np.ones_like(ids),
                       f"single{i}.logits": out.logits.numpy()})
    predicted = [model.config.id2label[int(k)] for k in arrays["left.logits"].argmax(-1)]
    return arrays, predicted


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)  # nothing here is random; set anyway
    args.out.mkdir(parents=True, exist_ok=True)

    sp = spm.SentencePieceProcessor(model_file=str(args.assets / LM_NAME / "tokenizer.model"))
    lm_arrays, margins = lm_references(args.assets / LM_NAME, sp)
    genre_arrays, predicted = genre_references(args.assets / GENRE_NAME, sp)
    for call, gap in margins.items():
        print(f"{call}: smallest greedy top-1/top-2 logit gap {gap:.4f}")
        if gap < MIN_GREEDY_GAP:
            raise SystemExit(f"{call}: greedy continuation is close to a tie (gap {gap:.2e}); choose another prompt")

    np.savez_compressed(args.out / f"{LM_NAME}.npz", **lm_arrays)
    np.savez_compressed(args.out / f"{GENRE_NAME}.npz", **genre_arrays)

    manifest = {
        "generator": "tests/reference/make_bundled_references.py",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentencepiece": spm.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "reference": "Transformers, shipped float16 weights loaded as float32, attn_implementation='eager', CPU",
        "checkpoints": {
            name: {f: sha256(args.assets / name / f)
                   for f in ("model.safetensors", "config.json", "tokenizer.model")}
            for name in (LM_NAME, GENRE_NAME)
        },
        "files": {
            f"{LM_NAME}.npz": {
                "model": LM_NAME,
                "model_class": "LlamaForCausalLM",
                "prompts": PROMPTS,
                "greedy_min_logit_gap": margins,
                "arrays": {
                    "prompt<i>.input_ids": "(1, T) int64: bos + sentencepiece ids of prompts[i]",
                    "prompt<i>.attention_mask": "(1, T) int64, all ones",
                    "prompt<i>.logits": "(1, T, V) float32",
                    "prompt<i>.hidden_states": "(L + 1, 1, T, D) float32: embeddings, then each layer's output; the last after the final norm",
                    "prompt<i>.attentions": "(L, 1, H, T, T) float32 softmax weights",
                    "prompt<i>.loss": "() float32 causal LM loss with labels = input_ids",
                    "prompt<i>.sequences": "(1, T + new) int64: greedy (do_sample=False) continuation, prompt included",
                    "prompt<i>.max_new_tokens": "() int64",
                    "prompt<i>.eos_token_id": "(1,) int64",
                    "prompt<i>.pad_token_id": "() int64",
                    "prompt<i>.text": "() str: the prompt",
                    "batch.input_ids": "(4, T) int64: the four prompts left-padded with pad_token_id",
                    "batch.attention_mask": "(4, T) int64: 0 on pads",
                    "batch.logits": "(4, T, V) float32 (meaningful only where attention_mask is 1)",
                    "batch.sequences": "(4, T + new) int64: greedy continuation of the left-padded batch",
                    "batch.max_new_tokens / eos_token_id / pad_token_id": "generation settings used",
                },
            },
            f"{GENRE_NAME}.npz": {
                "model": GENRE_NAME,
                "model_class": "LlamaForSequenceClassification",
                "passages": [{"play": p, "genre": g, "text": t} for p, g, t in PASSAGES],
                "predicted_genres": predicted,
                "arrays": {
                    "left.* / right.*": "the three passages as one batch, padded on that side with config.pad_token_id",
                    "<side>.input_ids": "(3, T) int64",
                    "<side>.attention_mask": "(3, T) int64: 0 on pads",
                    "<side>.labels": "(3,) int64 genre ids (id2label in the model's config)",
                    "<side>.logits": "(3, 3) float32 pooled at the last non-pad token",
                    "<side>.loss": "() float32 cross-entropy",
                    "single<i>.input_ids / attention_mask / logits": "passage i alone, unpadded: (1, T_i), (1, T_i), (1, 3)",
                },
            },
        },
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"wrote {args.out}: {sizes}; classifier predicts {predicted}")


if __name__ == "__main__":
    main()
