"""Write the tokenizer reference data in ``tests/data/tokenizer/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements-4.45.txt``::

    python tests/reference/make_tokenizer_reference.py

What it does:

1. reads the shipped sample ``tests/reference/tokenizer_sample.txt`` (records separated by lines
   holding only ``%%``; see ``read_sample``) and trains a small sentencepiece BPE model on it with
   Llama 2's trainer settings (``llama2_sentencepiece.py``), 1,000 pieces;
2. encodes and decodes every sample record, plus a few texts whose characters the sample never
   shows (they exercise byte fallback), with raw sentencepiece and with Transformers 4.45.2's slow
   ``LlamaTokenizer`` for ``legacy=True`` and ``legacy=False``;
3. stores the special-token methods, padding / truncation outputs, ``batch_decode``, byte-piece
   decoding and the effect of adding a ``<pad>`` token, as JSON, with a manifest.

The stored files are what ``tests/test_tokenizer.py`` compares against; the tests need neither
torch nor transformers. Transformers 4.45.2 is the reference because 5.x dropped the slow,
sentencepiece-based ``LlamaTokenizer``.
"""

import datetime
import itertools
import json
import platform
import shutil
import sys
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import LlamaTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama2_sentencepiece import LLAMA2_TRAINER_SETTINGS, train_llama2_style_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PATH = REPO / "tests" / "reference" / "tokenizer_sample.txt"
WORK_DIR = REPO / "tests" / "reference" / "_work" / "tokenizer"
OUT_DIR = REPO / "tests" / "data" / "tokenizer"
VOCAB_SIZE = 1000
RECORD_SEPARATOR = "\n%%\n"

# Characters the sample never shows, so the trained model has no piece for them: sentencepiece
# spells them out as <0xNN> byte pieces.
UNSEEN_TEXTS = [
    "Snowman ☃, integral ∮ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters",
    "ภาษาไทย 🐪🚀",
    "ü but also ǖ and ḉ",
]

# Texts used for the special-token methods, padding and truncation.
SHORT_TEXTS = ["Hello world", "A llama is not a camel, but close.", "我们", ""]
PAIR_TEXTS = [
    ("How are you?", "Fine, thanks."),
    ("One", "A much longer second sentence here."),
    ("", "x"),
]


def read_sample(path=SAMPLE_PATH):
    """The sample's records, exactly as written (tabs, newlines and edge spaces kept)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path} must end with a newline"
    return text[:-1].split(RECORD_SEPARATOR)


def train_model():
    """Train the test tokenizer on the sample; returns the path of the .model file."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    train_path = WORK_DIR / "train.txt"
    # sentencepiece reads one sentence per line; records holding only whitespace carry nothing.
    lines = [line for record in read_sample() for line in record.split("\n") if line.strip()]
    train_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = WORK_DIR / "tokenizer"
    train_llama2_style_tokenizer(train_path, prefix, VOCAB_SIZE, minloglevel=2)
    return prefix.with_suffix(".model")


def load(model_path, legacy, **kwargs):
    return LlamaTokenizer(str(model_path), legacy=legacy, **kwargs)


def encodings(model_path, texts):
    """Per text: sentencepiece ids/pieces/decode and the slow tokenizer's output for each legacy."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    result = {"texts": texts, "sentencepiece": [], "legacy_true": [], "legacy_false": []}
    for text in texts:
        ids = sp.encode(text)
        result["sentencepiece"].append(
            {"ids": ids, "pieces": sp.encode(text, out_type=str), "decoded": sp.decode(ids)}
        )
    for legacy in (True, False):
        tok = load(model_path, legacy)
        rows = result[f"legacy_{str(legacy).lower()}"]
        for text in texts:
            ids = tok.encode(text)
            tokens = tok.tokenize(text)
            rows.append(
                {
                    "tokens": tokens,
                    "ids": ids,
                    "ids_without_special_tokens": tok.encode(text, add_special_tokens=False),
                    "decoded": tok.decode(ids),
                    "decoded_skip_special_tokens": tok.decode(ids, skip_special_tokens=True),
                    "tokens_to_string": (
                        tok.convert_tokens_to_string(list(tokens)) if tokens else None
                    ),
                    "per_token_decoded": [tok.decode([i]) for i in ids],
                }
            )
    return result


def special_token_methods(model_path):
    """The four methods for every add_bos/add_eos combination, on singles and pairs."""
    base = load(model_path, legacy=True)
    a = base.encode(SHORT_TEXTS[1], add_special_tokens=False)
    b = base.encode(SHORT_TEXTS[0], add_special_tokens=False)
    cases = []
    for add_bos, add_eos in itertools.product((True, False), repeat=2):
        tok = load(model_path, legacy=True, add_bos_token=add_bos, add_eos_token=add_eos)
        # Setting the flags after construction must give the same as passing them in.
        later = load(model_path, legacy=True)
        later.add_bos_token, later.add_eos_token = add_bos, add_eos
        outputs = {}
        for name, t in (("constructed", tok), ("set_after", later)):
            outputs[name] = {
                "build_single": t.build_inputs_with_special_tokens(a),
                "build_pair": t.build_inputs_with_special_tokens(a, b),
                "mask_single": t.get_special_tokens_mask(a),
                "mask_pair": t.get_special_tokens_mask(a, b),
                "mask_already_single": t.get_special_tokens_mask(
                    t.build_inputs_with_special_tokens(a), already_has_special_tokens=True
                ),
                "mask_already_pair": t.get_special_tokens_mask(
                    t.build_inputs_with_special_tokens(a, b), already_has_special_tokens=True
                ),
                "token_types_single": t.create_token_type_ids_from_sequences(a),
                "token_types_pair": t.create_token_type_ids_from_sequences(a, b),
                "encode_single": t.encode(SHORT_TEXTS[1]),
                "call_pair": dict(
                    t(
                        SHORT_TEXTS[1],
                        SHORT_TEXTS[0],
                        return_token_type_ids=True,
                        return_special_tokens_mask=True,
                    )
                ),
            }
        assert outputs["constructed"] == outputs["set_after"], (add_bos, add_eos)
        cases.append({"add_bos_token": add_bos, "add_eos_token": add_eos, **outputs["constructed"]})
    # unk, bos and eos written in the text: already_has_special_tokens marks all three.
    with_unk = base.encode("a <unk> b </s>")
    return {
        "a": a,
        "b": b,
        "cases": cases,
        "mask_already_with_unk": {
            "ids": with_unk,
            "mask": base.get_special_tokens_mask(with_unk, already_has_special_tokens=True),
        },
    }


def plain(encoding):
    """A BatchEncoding as plain JSON: lists, with NumPy arrays turned into nested lists."""
    return {
        key: (value.tolist() if hasattr(value, "tolist") else value)
        for key, value in encoding.items()
    }


def padding_and_truncation(model_path):
    """__call__ outputs for padding / truncation settings, after adding a <pad> token."""
    cases = [
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="longest", padding_side="left")),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="max_length", max_length=12)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="max_length", max_length=6, truncation=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(truncation=True, max_length=5)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_special_tokens_mask=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, add_special_tokens=False)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_attention_mask=False)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_tensors="np")),
        dict(
            text=SHORT_TEXTS[1],
            kwargs=dict(padding="max_length", max_length=15, return_tensors="np"),
        ),
        dict(text=SHORT_TEXTS[1], kwargs=dict(truncation=True, max_length=4)),
        dict(
            text=SHORT_TEXTS[1], kwargs=dict(truncation=True, max_length=4), truncation_side="left"
        ),
    ]
    firsts = [p[0] for p in PAIR_TEXTS]
    seconds = [p[1] for p in PAIR_TEXTS]
    for strategy in ("longest_first", "only_first", "only_second"):
        cases.append(
            dict(
                text=firsts[:2],
                text_pair=seconds[:2],
                kwargs=dict(
                    truncation=strategy, max_length=9, padding=True, return_token_type_ids=True
                ),
            )
        )
    cases.append(
        dict(text=firsts, text_pair=seconds, kwargs=dict(padding=True, return_token_type_ids=True))
    )
    cases.append(
        dict(
            text=firsts,
            text_pair=seconds,
            kwargs=dict(padding=True, return_special_tokens_mask=True, padding_side="left"),
        )
    )

    for case in cases:
        tok = load(model_path, legacy=True)
        tok.add_special_tokens({"pad_token": "<pad>"})
        tok.truncation_side = case.get("truncation_side", "right")
        encoding = tok(case["text"], case.get("text_pair"), **case["kwargs"])
        case["output"] = plain(encoding)
        case["output_is_array"] = {key: hasattr(v, "tolist") for key, v in encoding.items()}

    tok = load(model_path, legacy=True)
    batch = tok(SHORT_TEXTS)["input_ids"]
    tok.add_special_tokens({"pad_token": "<pad>"})
    padded = tok(SHORT_TEXTS, padding=True)["input_ids"]
    batch_decode = {
        "ids": padded,
        "decoded": tok.batch_decode(padded),
        "decoded_skip_special_tokens": tok.batch_decode(padded, skip_special_tokens=True),
        "unpadded_ids": batch,
    }
    return {"cases": cases, "batch_decode": batch_decode}


def added_pad_token(load_legacy):
    """What add_special_tokens({"pad_token": "<pad>"}) changes, for both legacy values.

    ``load_legacy(legacy)`` makes the tokenizer: the slow one here, the fast one in
    make_fast_tokenizer_reference.py.
    """
    out = {}
    for legacy in (True, False):
        tok = load_legacy(legacy)
        before = len(tok)
        added = tok.add_special_tokens({"pad_token": "<pad>"})
        ids = tok.encode("a <pad> b<pad>")
        out[f"legacy_{str(legacy).lower()}"] = {
            "len_before": before,
            "added": added,
            "len_after": len(tok),
            "vocab_size": tok.vocab_size,
            "pad_token_id": tok.pad_token_id,
            "vocab_entry": tok.get_vocab()["<pad>"],
            "vocab_len": len(tok.get_vocab()),
            "all_special_ids": tok.all_special_ids,
            "tokens": tok.tokenize("a <pad> b<pad>"),
            "ids": ids,
            "decoded": tok.decode(ids),
            "decoded_skip_special_tokens": tok.decode(ids, skip_special_tokens=True),
            "added_again": tok.add_special_tokens({"pad_token": "<pad>"}),
        }
    return out


def byte_decoding(load_legacy, model_path):
    """Decoding byte-fallback pieces, including cut-off UTF-8 sequences, for both legacy values.

    ``load_legacy`` as for added_pad_token; model_path is the sentencepiece model, for the ids
    of lone byte pieces.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = {}
    for legacy in (True, False):
        tok = load_legacy(legacy)
        cases = []
        for text in ["🐪", "x🚀y", "ǖ", "☃☃"]:
            ids = tok.encode(text, add_special_tokens=False)
            cases.append(
                {
                    "text": text,
                    "ids": ids,
                    "tokens": tok.convert_ids_to_tokens(ids),
                    "prefix_decoded": [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)],
                    "with_bos_decoded": tok.decode([tok.bos_token_id] + ids),
                }
            )
        lone = [sp.piece_to_id(f"<0x{b:02X}>") for b in (0xF0, 0x9F, 0x41, 0x80, 0xE4, 0xB8)]
        cases.append(
            {
                "text": None,
                "ids": lone,
                "tokens": tok.convert_ids_to_tokens(lone),
                "prefix_decoded": [tok.decode(lone[:n]) for n in range(1, len(lone) + 1)],
                "with_bos_decoded": tok.decode([tok.bos_token_id] + lone),
            }
        )
        out[f"legacy_{str(legacy).lower()}"] = cases
    return out


def write_json(path, data):
    """Write a dict of lists with one list item per line: small files, readable diffs."""

    def dump(value):
        return json.dumps(value, ensure_ascii=False)

    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            items = ",\n".join(f"  {dump(item)}" for item in value)
            lines.append(f" {dump(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {dump(key)}: {dump(value)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    return path


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model_path = train_model()
    shutil.copyfile(model_path, OUT_DIR / "tokenizer.model")
    model_path = OUT_DIR / "tokenizer.model"

    texts = read_sample() + UNSEEN_TEXTS
    slow = lambda legacy: load(model_path, legacy=legacy)  # noqa: E731
    write_json(OUT_DIR / "encodings.json", encodings(model_path, texts))
    write_json(OUT_DIR / "special_tokens.json", special_token_methods(model_path))
    write_json(OUT_DIR / "padding.json", padding_and_truncation(model_path))
    write_json(OUT_DIR / "added_pad.json", added_pad_token(slow))
    write_json(OUT_DIR / "byte_decoding.json", byte_decoding(slow, model_path))

    import google.protobuf
    import torch

    manifest = {
        "created": datetime.date.today().isoformat(),
        "script": "tests/reference/make_tokenizer_reference.py",
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "sentencepiece": spm.__version__,
            "protobuf": google.protobuf.__version__,
            "torch": torch.__version__,
        },
        "tokenizer_model": {
            "trained_on": "tests/reference/tokenizer_sample.txt",
            "vocab_size": VOCAB_SIZE,
            "trainer_settings": LLAMA2_TRAINER_SETTINGS,
        },
        "files": {
            "tokenizer.model": "the sentencepiece BPE model trained on the sample",
            "encodings.json": "every sample record plus UNSEEN_TEXTS: raw sentencepiece ids, "
            "pieces and decode; slow LlamaTokenizer (legacy True and False) tokens, ids with and "
            "without special tokens, decode with and without skip_special_tokens, "
            "convert_tokens_to_string, decode of each id alone",
            "special_tokens.json": "build_inputs_with_special_tokens, get_special_tokens_mask "
            "(also already_has_special_tokens=True), create_token_type_ids_from_sequences, "
            "encode and a pair __call__ for each add_bos_token/add_eos_token combination",
            "padding.json": "__call__ outputs for padding, truncation, pairs, padding side and "
            "return_tensors='np' after adding <pad>; batch_decode of a padded batch",
            "added_pad.json": "the effect of add_special_tokens({'pad_token': '<pad>'})",
            "byte_decoding.json": "decoding byte-fallback pieces and cut-off UTF-8 sequences",
        },
    }
    write_json(OUT_DIR / "manifest.json", manifest)
    print(f"wrote {OUT_DIR}")


if __name__ == "__main__":
    main()
