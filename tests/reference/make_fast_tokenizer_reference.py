"""Write the fast-tokenizer and chat-template reference data in ``tests/data/tokenizer_fast/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements-4.45.txt``
(torch is not needed for this script)::

    python tests/reference/make_fast_tokenizer_reference.py

It uses the sentencepiece model of the slow-tokenizer reference (``tests/data/tokenizer/
tokenizer.model``, made by ``make_tokenizer_reference.py``) and Transformers 4.45.2's
``LlamaTokenizerFast``:

1. For ``legacy=True`` and ``legacy=False``, loads ``LlamaTokenizerFast`` from a directory that
   holds only ``tokenizer.model`` (Transformers converts it with its Llama converter) and saves
   it with ``save_pretrained``; the saved directory minus ``tokenizer.model`` is stored as
   ``json_legacy_<value>/``, a checkpoint that ships ``tokenizer.json`` only.
2. For each of the four (source, legacy) tokenizers stores tokens, ids, decodes and whether the
   slow ``LlamaTokenizer`` with the same ``legacy`` gives the same ids and text.
3. Stores the special-token methods and the post-processor for every add_bos/add_eos toggle,
   padding and truncation outputs, the effect of adding ``<pad>``, and byte-piece decoding.
4. Writes two chat checkpoints (``chat_llama2/``: Llama-2-chat's ``chat_template``;
   ``chat_zephyr/``: TinyLlama-1.1B-Chat-v1.0's Zephyr-style template) and what
   ``apply_chat_template`` gives for a few conversations, with the slow and the fast tokenizer.
"""

import datetime
import itertools
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import jinja2
import sentencepiece as spm
import tokenizers
import transformers
from transformers import LlamaTokenizer, LlamaTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_reference import (  # noqa: E402
    PAIR_TEXTS,
    SHORT_TEXTS,
    UNSEEN_TEXTS,
    added_pad_token,
    byte_decoding,
    plain,
    read_sample,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO / "tests" / "data" / "tokenizer" / "tokenizer.model"
OUT_DIR = REPO / "tests" / "data" / "tokenizer_fast"

# Beyond the sample: Korean, CJK, emoji sequences, characters the model spells as bytes, and
# special-token strings in odd places.
MULTILINGUAL_TEXTS = [
    "안녕하세요, 세계! 한국어 문장입니다.",
    "東京タワーは高い。北京欢迎你。漢字とかな",
    "👩‍👩‍👧 family, flags 🇰🇷🇯🇵, skin tone 👋🏽",
    "Ωmega ∑ ∂x — “quotes” and ½",
    "<s>[INST] hi [/INST] ok </s><unk> x</s>",
    "a<s>b</s>c<unk>",
    "<s> <s>  </s>",
    "  two leading spaces",
    "trailing spaces  ",
    "\ttab\nnew line\r\n",
    " ",
    "▁already▁marked",
]

# The chat template of meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json, as written there
# (a Jinja string literal '\\n' is a newline once rendered).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# The chat template of TinyLlama/TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json (Zephyr's
# format), with its real newlines: trim_blocks removes those after each tag.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Who is Juliet?"}],
    [
        {"role": "system", "content": "Answer in one line of verse."},
        {"role": "user", "content": "Who is Juliet?"},
    ],
    [
        {"role": "user", "content": "  Hello there  "},
        {"role": "assistant", "content": "Good morrow."},
        {"role": "user", "content": "What light through yonder window breaks?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "안녕하세요 🐪"},
        {"role": "assistant", "content": "Hi </s> there"},
    ],
]


def error_of(call):
    """The result of ``call()``, or {"error": exception class name} if it raised."""
    try:
        return call()
    except Exception as error:  # recorded, not hidden: the tests require an error there too
        return {"error": type(error).__name__}


def make_tokenizer_dirs(work):
    """model_only/ (tokenizer.model alone) and json_legacy_<value>/ (tokenizer.json, no .model)."""
    model_only = work / "model_only"
    model_only.mkdir()
    shutil.copyfile(MODEL_PATH, model_only / "tokenizer.model")
    for legacy in (True, False):
        saved = work / f"saved_{str(legacy).lower()}"
        LlamaTokenizerFast.from_pretrained(str(model_only), legacy=legacy).save_pretrained(str(saved))
        target = OUT_DIR / f"json_legacy_{str(legacy).lower()}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name in ("tokenizer.json", "special_tokens_map.json"):
            shutil.copyfile(saved / name, target / name)
        # As the hub's Llama 2 repositories write it: no add_prefix_space, which would make
        # Transformers rebuild tokenizer.json from the tokenizer.model this directory lacks.
        config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
        del config["add_prefix_space"]
        (target / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return model_only


def fast_tokenizers(model_only):
    """{(source, legacy): loader} for the four fast tokenizers under test."""
    loaders = {}
    for legacy in (True, False):
        key = str(legacy).lower()
        json_dir = str(OUT_DIR / f"json_legacy_{key}")
        loaders[("model", key)] = lambda legacy=legacy: LlamaTokenizerFast.from_pretrained(
            str(model_only), legacy=legacy)
        loaders[("json", key)] = lambda json_dir=json_dir: LlamaTokenizerFast.from_pretrained(
            json_dir)
    return loaders


def encodings(loaders, texts):
    out = {"texts": texts}
    for (source, legacy), load in loaders.items():
        tok = load()
        slow = LlamaTokenizer(str(MODEL_PATH), legacy=legacy == "true")
        rows = []
        for text in texts:
            ids = tok.encode(text)
            tokens = tok.tokenize(text)
            rows.append({
                "tokens": tokens,
                "ids": ids,
                "ids_without_special_tokens": tok.encode(text, add_special_tokens=False),
                "decoded": tok.decode(ids),
                "decoded_skip_special_tokens": tok.decode(ids, skip_special_tokens=True),
                "tokens_to_string": tok.convert_tokens_to_string(tokens),
                "per_token_decoded": [tok.decode([i]) for i in ids],
                "slow_ids_agree": slow.encode(text) == ids,
                "slow_decode_agrees": slow.decode(ids) == tok.decode(ids),
            })
        out[f"{source}_legacy_{legacy}"] = rows
    return out


def special_token_methods(loaders):
    """The documented methods and the post-processor for each add_bos/add_eos toggle."""
    load = loaders[("json", "true")]
    base = load()
    a = base.encode(SHORT_TEXTS[1], add_special_tokens=False)
    b = base.encode(SHORT_TEXTS[0], add_special_tokens=False)
    cases = []
    for add_bos, add_eos in itertools.product((True, False), repeat=2):
        tok = load()
        tok.add_bos_token, tok.add_eos_token = add_bos, add_eos  # the setters rebuild it
        built = LlamaTokenizerFast.from_pretrained(
            str(OUT_DIR / "json_legacy_true"), add_bos_token=add_bos, add_eos_token=add_eos)
        assert built.encode(SHORT_TEXTS[1], SHORT_TEXTS[0]) == tok.encode(SHORT_TEXTS[1], SHORT_TEXTS[0])
        cases.append({
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "post_processor": json.loads(tok.backend_tokenizer.to_str())["post_processor"],
            "build_single": tok.build_inputs_with_special_tokens(a),
            "build_pair": tok.build_inputs_with_special_tokens(a, b),
            "mask_single": error_of(lambda: tok.get_special_tokens_mask(a)),
            "mask_pair": error_of(lambda: tok.get_special_tokens_mask(a, b)),
            "mask_already_single": tok.get_special_tokens_mask(
                tok.build_inputs_with_special_tokens(a), already_has_special_tokens=True),
            "token_types_single": tok.create_token_type_ids_from_sequences(a),
            "token_types_pair": tok.create_token_type_ids_from_sequences(a, b),
            "num_special_single": tok.num_special_tokens_to_add(pair=False),
            "num_special_pair": tok.num_special_tokens_to_add(pair=True),
            "encode_single": tok.encode(SHORT_TEXTS[1]),
            "encode_pair": tok.encode(SHORT_TEXTS[1], SHORT_TEXTS[0]),
            "call_pair": plain(tok(SHORT_TEXTS[1], SHORT_TEXTS[0], return_token_type_ids=True,
                                   return_special_tokens_mask=True)),
        })
    with_unk = base.encode("a <unk> b </s>")
    return {
        "a": a,
        "b": b,
        "cases": cases,
        "mask_already_with_unk": {
            "ids": with_unk,
            "mask": base.get_special_tokens_mask(with_unk, already_has_special_tokens=True),
        },
        "default_padding_side": base.padding_side,
    }


def padding_and_truncation(loaders):
    """__call__ with padding and truncation after adding <pad>, as in the slow reference."""
    load = loaders[("json", "true")]
    cases = [
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, padding_side="right")),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="longest", padding_side="left")),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="max_length", max_length=12)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding="max_length", max_length=6, truncation=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(truncation=True, max_length=5)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_special_tokens_mask=True)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, add_special_tokens=False)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_attention_mask=False)),
        dict(text=SHORT_TEXTS, kwargs=dict(padding=True, return_tensors="np")),
        dict(text=SHORT_TEXTS[1], kwargs=dict(padding="max_length", max_length=15,
                                              return_tensors="np")),
        dict(text=SHORT_TEXTS[1], kwargs=dict(truncation=True, max_length=4)),
        dict(text=SHORT_TEXTS[1], kwargs=dict(truncation=True, max_length=4),
             truncation_side="left"),
    ]
    firsts, seconds = [p[0] for p in PAIR_TEXTS], [p[1] for p in PAIR_TEXTS]
    for strategy in ("longest_first", "only_first", "only_second"):
        for max_length in (9, 10):
            cases.append(dict(text=firsts[:2], text_pair=seconds[:2],
                              kwargs=dict(truncation=strategy, max_length=max_length,
                                          padding=True, return_token_type_ids=True)))
    cases.append(dict(text=firsts, text_pair=seconds,
                      kwargs=dict(padding=True, return_token_type_ids=True)))
    cases.append(dict(text=firsts, text_pair=seconds,
                      kwargs=dict(padding=True, return_special_tokens_mask=True,
                                  padding_side="left")))
    cases.append(dict(text=SHORT_TEXTS[1], kwargs=dict(truncation="only_second", max_length=4)))
    cases.append(dict(text=firsts[:1], text_pair=seconds[:1],
                      kwargs=dict(truncation="only_first", max_length=6)))
    for case in cases:
        tok = load()
        tok.add_special_tokens({"pad_token": "<pad>"})
        tok.truncation_side = case.get("truncation_side", "right")

        def call(case=case, tok=tok):
            encoding = tok(case["text"], case.get("text_pair"), **case["kwargs"])
            return {"output": plain(encoding),
                    "output_is_array": {k: hasattr(v, "tolist") for k, v in encoding.items()}}

        case.update(error_of(call))

    tok = load()
    unpadded = tok(SHORT_TEXTS)["input_ids"]
    tok.add_special_tokens({"pad_token": "<pad>"})
    padded = tok(SHORT_TEXTS, padding=True, padding_side="right")["input_ids"]
    batch_decode = {
        "ids": padded,
        "decoded": tok.batch_decode(padded),
        "decoded_skip_special_tokens": tok.batch_decode(padded, skip_special_tokens=True),
        "unpadded_ids": unpadded,
    }
    return {"cases": cases, "batch_decode": batch_decode}


def make_chat_dirs():
    """chat_llama2/ and chat_zephyr/: tokenizer files plus a tokenizer_config.json with a template."""
    configs = {
        "chat_llama2": {
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": None, "legacy": True, "padding_side": "right",
            "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "LlamaTokenizer", "chat_template": LLAMA2_CHAT_TEMPLATE,
        },
        "chat_zephyr": {
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "</s>", "legacy": False, "padding_side": "right",
            "clean_up_tokenization_spaces": False, "model_max_length": 2048,
            "tokenizer_class": "LlamaTokenizer", "chat_template": ZEPHYR_CHAT_TEMPLATE,
        },
    }
    for name, config in configs.items():
        directory = OUT_DIR / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir()
        legacy = str(config["legacy"]).lower()
        shutil.copyfile(MODEL_PATH, directory / "tokenizer.model")
        shutil.copyfile(OUT_DIR / f"json_legacy_{legacy}" / "tokenizer.json",
                        directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def chat_references():
    out = {"conversations": CONVERSATIONS}
    for name in ("chat_llama2", "chat_zephyr"):
        directory = str(OUT_DIR / name)
        for kind, cls in (("slow", LlamaTokenizer), ("fast", LlamaTokenizerFast)):
            tok = cls.from_pretrained(directory)
            rows = []
            for messages in CONVERSATIONS:
                row = {}
                for add_generation_prompt in (True, False):
                    key = f"generation_prompt_{str(add_generation_prompt).lower()}"
                    row[key] = {
                        "text": error_of(lambda: tok.apply_chat_template(
                            messages, add_generation_prompt=add_generation_prompt, tokenize=False)),
                        "ids": error_of(lambda: tok.apply_chat_template(
                            messages, add_generation_prompt=add_generation_prompt, tokenize=True)),
                    }
                rows.append(row)
            bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
            out[f"{name}_{kind}"] = rows
            out[f"{name}_{kind}_not_alternating"] = [
                error_of(lambda: tok.apply_chat_template(bad, tokenize=False))]
    return out


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        model_only = make_tokenizer_dirs(Path(work))
        loaders = fast_tokenizers(model_only)
        texts = read_sample() + UNSEEN_TEXTS + MULTILINGUAL_TEXTS
        fast = lambda legacy: loaders[("json", str(legacy).lower())]()  # noqa: E731
        write_json(OUT_DIR / "encodings.json", encodings(loaders, texts))
        write_json(OUT_DIR / "special_tokens.json", special_token_methods(loaders))
        write_json(OUT_DIR / "padding.json", padding_and_truncation(loaders))
        write_json(OUT_DIR / "added_pad.json", added_pad_token(fast))
        write_json(OUT_DIR / "byte_decoding.json", byte_decoding(fast, MODEL_PATH))
    make_chat_dirs()
    write_json(OUT_DIR / "chat.json", chat_references())

    import google.protobuf

    manifest = {
        "created": datetime.date.today().isoformat(),
        "script": "tests/reference/make_fast_tokenizer_reference.py",
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sentencepiece": spm.__version__,
            "protobuf": google.protobuf.__version__,
            "jinja2": jinja2.__version__,
        },
        "tokenizer_model": "tests/data/tokenizer/tokenizer.model (make_tokenizer_reference.py)",
        "files": {
            "json_legacy_true/, json_legacy_false/": "LlamaTokenizerFast.from_pretrained(a "
            "directory with only tokenizer.model, legacy=...).save_pretrained(...), without "
            "tokenizer.model: tokenizer.json as Transformers' Llama converter builds it",
            "encodings.json": "the sample records, UNSEEN_TEXTS and MULTILINGUAL_TEXTS through "
            "the four fast tokenizers (source model|json, legacy true|false): tokens, ids with "
            "and without special tokens, decodes, convert_tokens_to_string, each id decoded "
            "alone, and whether the slow LlamaTokenizer of the same legacy gives the same ids "
            "(slow_ids_agree) and the same decoded text (slow_decode_agrees)",
            "special_tokens.json": "per add_bos_token/add_eos_token (set after loading, so the "
            "setters rebuild the post-processor): the post-processor as serialized, "
            "build_inputs_with_special_tokens, get_special_tokens_mask ({'error': ...} where "
            "Transformers raises), create_token_type_ids_from_sequences, "
            "num_special_tokens_to_add, encode and a pair __call__",
            "padding.json": "__call__ with padding, truncation, pairs, padding side and "
            "return_tensors='np' after adding <pad> ({'error': ...} where Transformers raises); "
            "batch_decode of a padded batch",
            "added_pad.json": "the effect of add_special_tokens({'pad_token': '<pad>'})",
            "byte_decoding.json": "decoding byte-fallback pieces and cut-off UTF-8 sequences",
            "chat_llama2/, chat_zephyr/": "tokenizer.model, tokenizer.json and a "
            "tokenizer_config.json carrying Llama-2-chat's and TinyLlama-1.1B-Chat-v1.0's "
            "chat_template",
            "chat.json": "apply_chat_template text and ids for each conversation and "
            "add_generation_prompt, with the slow and the fast tokenizer of each chat directory",
        },
    }
    write_json(OUT_DIR / "manifest.json", manifest)
    print(f"wrote {OUT_DIR}")


if __name__ == "__main__":
    main()
