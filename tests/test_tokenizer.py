"""LlamaTokenizer against Transformers 4.45.2's slow LlamaTokenizer, token for token.

The expected values were stored by ``tests/reference/make_tokenizer_reference.py`` (see
``tests/reference/README.md``) for a small sentencepiece model trained with Llama 2's settings;
these tests need neither torch nor transformers. Token ids, tokens and strings are compared
exactly.
"""

import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from llama_np.text.bpe import read_model
from llama_np.errors import TokenizerError
from llama_np.text.streaming import IncrementalDecoder, TextStreamer
from llama_np.text.tokenizer import LlamaTokenizer

DATA = Path(__file__).parent / "data" / "tokenizer"
MODEL = DATA / "tokenizer.model"
SAMPLE = Path(__file__).parent / "reference" / "tokenizer_sample.txt"
LEGACY = [True, False]


def load_json(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


ENCODINGS = load_json("encodings.json")
TEXTS = ENCODINGS["texts"]
TEXT_IDS = [f"{i}:{text[:24]!r}" for i, text in enumerate(TEXTS)]


def key(legacy):
    return f"legacy_{str(legacy).lower()}"


@pytest.fixture(scope="module", params=LEGACY, ids=["legacy", "nonlegacy"])
def tokenizer_and_expected(request):
    return LlamaTokenizer(MODEL, legacy=request.param), ENCODINGS[key(request.param)]


# ------------------------------------------------------------------------------------------------
# the sample and the stored model


def test_sample_records_are_the_stored_texts():
    records = SAMPLE.read_text(encoding="utf-8")[:-1].split("\n%%\n")
    assert TEXTS[: len(records)] == records


def test_sample_covers_what_the_issue_lists():
    joined = "".join(TEXTS)
    assert "" in TEXTS, "the empty string"
    assert max(map(len, TEXTS)) > 1000, "a text longer than 1,000 characters"
    assert any(text.startswith("   ") for text in TEXTS) and any(
        text.endswith("   ") for text in TEXTS
    )
    assert "\t" in joined and "    " in joined, "tabs and indentation"
    assert "🦙" in joined and "我们" in joined and "안녕" in joined and "\u0301" in joined
    assert "Hello <s>." in TEXTS


def test_stored_model_gives_the_stored_sentencepiece_ids():
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    for text, expected in zip(TEXTS, ENCODINGS["sentencepiece"]):
        assert sp.encode(text) == expected["ids"], text
        assert sp.encode(text, out_type=str) == expected["pieces"], text


# ------------------------------------------------------------------------------------------------
# encoding and decoding every text, both legacy values


@pytest.mark.parametrize("index", range(len(TEXTS)), ids=TEXT_IDS)
def test_tokenize_and_encode_match_transformers(tokenizer_and_expected, index):
    tokenizer, expected = tokenizer_and_expected
    text, row = TEXTS[index], expected[index]
    assert tokenizer.tokenize(text) == row["tokens"]
    assert tokenizer.encode(text) == row["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == row["ids_without_special_tokens"]
    assert tokenizer.convert_tokens_to_ids(row["tokens"]) == row["ids_without_special_tokens"]


@pytest.mark.parametrize("index", range(len(TEXTS)), ids=TEXT_IDS)
def test_decode_matches_transformers(tokenizer_and_expected, index):
    tokenizer, expected = tokenizer_and_expected
    row = expected[index]
    assert tokenizer.decode(row["ids"]) == row["decoded"]
    assert (
        tokenizer.decode(row["ids"], skip_special_tokens=True) == row["decoded_skip_special_tokens"]
    )
    assert [tokenizer.decode([i]) for i in row["ids"]] == row["per_token_decoded"]
    if row["tokens"]:
        assert tokenizer.convert_tokens_to_string(row["tokens"]) == row["tokens_to_string"]


def test_legacy_none_behaves_as_legacy_true():
    tokenizer = LlamaTokenizer(MODEL)
    assert tokenizer.legacy is True
    assert [tokenizer.encode(text) for text in TEXTS] == [
        row["ids"] for row in ENCODINGS["legacy_true"]
    ]


def test_legacy_true_adds_a_space_after_a_special_token_and_false_does_not():
    # docs/reference.md §5.2: "Hello <s>." gets an extra "▁" before "." only with legacy=True.
    assert LlamaTokenizer(MODEL, legacy=True).tokenize("Hello <s>.") == [
        "▁Hello",
        "▁",
        "<s>",
        "▁",
        ".",
    ]
    assert LlamaTokenizer(MODEL, legacy=False).tokenize("Hello <s>.") == ["▁Hello", "▁", "<s>", "."]


def test_bpe_in_pure_python_gives_sentencepiece_ids_on_every_text():
    model = read_model(MODEL)
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    assert len(model.pieces) == sp.get_piece_size() == 1000
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    np.testing.assert_array_equal(model.scores, [sp.get_score(i) for i in range(1000)])
    mismatched = [
        text
        for text, row in zip(TEXTS, ENCODINGS["sentencepiece"])
        if model.encode(text) != row["ids"]
    ]
    assert mismatched == []


def test_bpe_uses_byte_pieces_for_characters_the_model_lacks():
    model = read_model(MODEL)
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    ids = model.encode("🐪")
    assert [sp.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x90>", "<0xAA>"]


# ------------------------------------------------------------------------------------------------
# the four methods and the add_bos / add_eos flags

SPECIAL = load_json("special_tokens.json")
METHOD_CASES = SPECIAL["cases"]
METHOD_IDS = [f"bos={c['add_bos_token']}-eos={c['add_eos_token']}" for c in METHOD_CASES]


def check_methods(tokenizer, case):
    a, b = SPECIAL["a"], SPECIAL["b"]
    assert tokenizer.build_inputs_with_special_tokens(a) == case["build_single"]
    assert tokenizer.build_inputs_with_special_tokens(a, b) == case["build_pair"]
    assert tokenizer.get_special_tokens_mask(a) == case["mask_single"]
    assert tokenizer.get_special_tokens_mask(a, b) == case["mask_pair"]
    assert (
        tokenizer.get_special_tokens_mask(case["build_single"], already_has_special_tokens=True)
        == case["mask_already_single"]
    )
    assert (
        tokenizer.get_special_tokens_mask(case["build_pair"], already_has_special_tokens=True)
        == case["mask_already_pair"]
    )
    assert tokenizer.create_token_type_ids_from_sequences(a) == case["token_types_single"]
    assert tokenizer.create_token_type_ids_from_sequences(a, b) == case["token_types_pair"]
    assert tokenizer.encode("A llama is not a camel, but close.") == case["encode_single"]
    call = tokenizer(
        "A llama is not a camel, but close.",
        "Hello world",
        return_token_type_ids=True,
        return_special_tokens_mask=True,
    )
    assert call == case["call_pair"]


@pytest.mark.parametrize("case", METHOD_CASES, ids=METHOD_IDS)
def test_special_token_methods_match_transformers(case):
    tokenizer = LlamaTokenizer(
        MODEL, add_bos_token=case["add_bos_token"], add_eos_token=case["add_eos_token"]
    )
    check_methods(tokenizer, case)


@pytest.mark.parametrize("case", METHOD_CASES, ids=METHOD_IDS)
def test_setting_add_bos_and_add_eos_later_changes_what_encoding_adds(case):
    tokenizer = LlamaTokenizer(MODEL)
    tokenizer.encode("warm up")  # set after use, not just after construction
    tokenizer.add_bos_token, tokenizer.add_eos_token = case["add_bos_token"], case["add_eos_token"]
    check_methods(tokenizer, case)


def test_already_has_special_tokens_marks_unk_too():
    expected = SPECIAL["mask_already_with_unk"]
    tokenizer = LlamaTokenizer(MODEL)
    assert tokenizer.encode("a <unk> b </s>") == expected["ids"]
    assert (
        tokenizer.get_special_tokens_mask(expected["ids"], already_has_special_tokens=True)
        == expected["mask"]
    )


def test_already_has_special_tokens_with_a_pair_is_an_error():
    with pytest.raises(TokenizerError, match="not a pair"):
        LlamaTokenizer(MODEL).get_special_tokens_mask([5, 6], [7], already_has_special_tokens=True)


# ------------------------------------------------------------------------------------------------
# padding, truncation, batches

PADDING = load_json("padding.json")
PADDING_IDS = [
    f"{i}:{'pair' if c.get('text_pair') else 'single' if isinstance(c['text'], str) else 'batch'}-"
    + ",".join(f"{k}={v}" for k, v in c["kwargs"].items())
    for i, c in enumerate(PADDING["cases"])
]


def padded_tokenizer(**kwargs):
    tokenizer = LlamaTokenizer(MODEL, **kwargs)
    assert tokenizer.add_special_tokens({"pad_token": "<pad>"}) == 1
    return tokenizer


@pytest.mark.filterwarnings("ignore:truncation='only_first' must remove")
@pytest.mark.parametrize("case", PADDING["cases"], ids=PADDING_IDS)
def test_padding_and_truncation_match_transformers(case):
    tokenizer = padded_tokenizer(truncation_side=case.get("truncation_side", "right"))
    output = tokenizer(case["text"], case.get("text_pair"), **case["kwargs"])
    assert sorted(output) == sorted(case["output"])
    for name, expected in case["output"].items():
        if case["output_is_array"][name]:
            assert isinstance(output[name], np.ndarray) and output[name].dtype == np.int64, name
            np.testing.assert_array_equal(output[name], np.array(expected), err_msg=name)
        else:
            assert output[name] == expected, name


def test_only_first_truncation_that_cannot_remove_enough_warns_and_keeps_the_sequence():
    tokenizer = padded_tokenizer()
    with pytest.warns(UserWarning, match="only_first"):
        output = tokenizer(
            "One", "A much longer second sentence here.", truncation="only_first", max_length=9
        )
    assert len(output["input_ids"]) > 9


def test_batch_decode_matches_transformers():
    expected = PADDING["batch_decode"]
    tokenizer = padded_tokenizer()
    assert (
        tokenizer(["Hello world", "A llama is not a camel, but close.", "我们", ""])["input_ids"]
        == expected["unpadded_ids"]
    )
    assert tokenizer.batch_decode(expected["ids"]) == expected["decoded"]
    assert (
        tokenizer.batch_decode(expected["ids"], skip_special_tokens=True)
        == expected["decoded_skip_special_tokens"]
    )
    assert tokenizer.batch_decode(np.array(expected["ids"])) == expected["decoded"]


def test_left_padding_puts_pads_and_zero_mask_before_the_text():
    tokenizer = padded_tokenizer(padding_side="left")
    long, short = tokenizer.encode("Hello world"), tokenizer.encode("Hello")
    batch = tokenizer(["Hello world", "Hello"], padding=True, return_tensors="np")
    n_pad = len(long) - len(short)
    assert n_pad > 0
    np.testing.assert_array_equal(batch["input_ids"], [long, [1000] * n_pad + short])
    np.testing.assert_array_equal(
        batch["attention_mask"], [[1] * len(long), [0] * n_pad + [1] * len(short)]
    )


# ------------------------------------------------------------------------------------------------
# adding a pad token

ADDED_PAD = load_json("added_pad.json")


@pytest.mark.parametrize("legacy", LEGACY)
def test_adding_pad_gives_the_next_id_and_grows_len(legacy):
    expected = ADDED_PAD[key(legacy)]
    tokenizer = LlamaTokenizer(MODEL, legacy=legacy)
    assert len(tokenizer) == expected["len_before"]
    assert tokenizer.pad_token_id is None
    assert tokenizer.add_special_tokens({"pad_token": "<pad>"}) == expected["added"]
    assert len(tokenizer) == expected["len_after"] == tokenizer.vocab_size + 1
    assert tokenizer.vocab_size == expected["vocab_size"]
    assert tokenizer.pad_token_id == expected["pad_token_id"] == tokenizer.vocab_size
    vocab = tokenizer.get_vocab()
    assert vocab["<pad>"] == expected["vocab_entry"] and len(vocab) == expected["vocab_len"]
    assert tokenizer.all_special_ids == expected["all_special_ids"]
    assert tokenizer.tokenize("a <pad> b<pad>") == expected["tokens"]
    assert tokenizer.encode("a <pad> b<pad>") == expected["ids"]
    assert tokenizer.decode(expected["ids"]) == expected["decoded"]
    assert (
        tokenizer.decode(expected["ids"], skip_special_tokens=True)
        == expected["decoded_skip_special_tokens"]
    )
    assert tokenizer.add_special_tokens({"pad_token": "<pad>"}) == expected["added_again"]


def test_pad_token_can_reuse_eos():
    tokenizer = LlamaTokenizer(MODEL)
    assert tokenizer.add_special_tokens({"pad_token": "</s>"}) == 0
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer(["Hello world", "Hello"], padding=True)["input_ids"][1][-1] == 2


# ------------------------------------------------------------------------------------------------
# byte pieces and streaming

BYTES = load_json("byte_decoding.json")


@pytest.mark.parametrize("legacy", LEGACY)
def test_byte_pieces_decode_like_transformers_even_when_cut_off(legacy):
    tokenizer = LlamaTokenizer(MODEL, legacy=legacy)
    for case in BYTES[key(legacy)]:
        if case["text"] is not None:
            assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"]
        assert tokenizer.convert_ids_to_tokens(case["ids"]) == case["tokens"]
        assert [tokenizer.decode(case["ids"][:n]) for n in range(1, len(case["ids"]) + 1)] == case[
            "prefix_decoded"
        ]
        assert tokenizer.decode([tokenizer.bos_token_id] + case["ids"]) == case["with_bos_decoded"]


def stream(tokenizer, ids, skip_special_tokens):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    return "".join(decoder.put(i) for i in ids) + decoder.end()


@pytest.mark.parametrize(
    "legacy, skip_special_tokens", [(True, True), (False, True), (False, False)]
)
def test_incremental_decoder_reproduces_the_full_decode_of_every_text(legacy, skip_special_tokens):
    tokenizer = LlamaTokenizer(MODEL, legacy=legacy)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=True) + [tokenizer.eos_token_id]
        assert stream(tokenizer, ids, skip_special_tokens) == tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens
        ), text


def test_incremental_decoder_with_legacy_special_tokens_moves_only_the_space_transformers_adds():
    # With legacy=True, Transformers' decode writes a space in front of the text that precedes a
    # special token: "<s>Hello" becomes "<s> Hello</s>" once "</s>" arrives. Text already streamed
    # cannot move, so the stream puts that space just before the special token instead.
    tokenizer = LlamaTokenizer(MODEL, legacy=True)
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == "<s> Hello</s>"
    assert stream(tokenizer, ids, skip_special_tokens=False) == "<s>Hello </s>"
    for text in TEXTS:
        ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
        streamed, decoded = stream(tokenizer, ids, False), tokenizer.decode(ids)
        assert sorted(streamed) == sorted(decoded) and streamed.replace(" ", "") == decoded.replace(
            " ", ""
        ), text


def test_decoding_token_by_token_loses_spaces_but_the_incremental_decoder_does_not():
    # docs/reference.md §5.3, the "Banana" note.
    tokenizer = LlamaTokenizer(MODEL)
    ids = tokenizer.encode("Banana bread is the best bread.", add_special_tokens=False)
    assert "".join(tokenizer.decode([i]) for i in ids) == "Bananabreadisthebestbread."
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.put(i) for i in ids) == "Banana bread is the best bread."


def test_incremental_decoder_holds_back_an_incomplete_character():
    tokenizer = LlamaTokenizer(MODEL)
    ids = tokenizer.encode("x🚀", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.put(i) for i in ids]
    assert "".join(pieces) == "x🚀" and pieces[-4:] == ["", "", "", "🚀"]
    decoder.put(ids[-4:-1])  # a cut-off character is held back, then flushed by end() as U+FFFD
    assert decoder.end() == tokenizer.decode(ids + ids[-4:-1])[len("x🚀") :] == "\ufffd" * 3


def test_incremental_decoder_accepts_arrays_of_shape_n_and_1_n():
    tokenizer = LlamaTokenizer(MODEL)
    ids = np.array(tokenizer.encode("hello Hello"))
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    assert decoder.put(ids[None, :2]) + decoder.put(ids[2:]) + decoder.end() == "hello Hello"


def test_text_streamer_prints_new_text_and_can_skip_the_prompt():
    tokenizer = LlamaTokenizer(MODEL)
    prompt = np.array([tokenizer.encode("Hello")])
    new_ids = tokenizer.encode("world, hello", add_special_tokens=False)  # "▁world" ...
    out = io.StringIO()
    streamer = TextStreamer(tokenizer, skip_prompt=True, file=out)
    streamer.put(prompt)
    for token_id in new_ids:
        streamer.put(np.array([token_id]))
    streamer.end()
    assert out.getvalue() == " world, hello\n"


# ------------------------------------------------------------------------------------------------
# the Llama 2 chat format, against ids built by hand from Meta's chat_completion code


def meta_chat_ids(dialog):
    """Meta's llama/generation.py chat_completion, written out with raw sentencepiece."""
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    bos, eos = sp.bos_id(), sp.eos_id()
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": "<<SYS>>\n"
                + dialog[0]["content"]
                + "\n<</SYS>>\n\n"
                + dialog[1]["content"],
            }
        ] + dialog[2:]
    ids = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += (
            [bos]
            + sp.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ")
            + [eos]
        )
    ids += [bos] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return ids


DIALOGS = {
    "one_user_turn": [{"role": "user", "content": "What is a llama?"}],
    "system_prompt": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
    ],
    "three_turns_with_spaces_to_strip": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "  Capital of France?  "},
        {"role": "assistant", "content": " Paris\n"},
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
        {"role": "user", "content": "\tAnd Korea? 안녕 🦙"},
    ],
}


@pytest.mark.parametrize("name", DIALOGS)
def test_chat_template_gives_metas_ids_with_legacy_true(name):
    dialog = DIALOGS[name]
    assert LlamaTokenizer(MODEL, legacy=True).apply_chat_template(dialog) == meta_chat_ids(dialog)


def test_chat_template_text_form():
    # Meta strips the user text after the system block is put in front of it, so the first
    # user turn keeps its leading spaces there.
    text = LlamaTokenizer(MODEL).apply_chat_template(
        DIALOGS["three_turns_with_spaces_to_strip"], tokenize=False
    )
    assert text == (
        "<s>[INST] <<SYS>>\nAnswer in one word.\n<</SYS>>\n\n  Capital of France? [/INST] Paris </s>"
        "<s>[INST] And of Japan? [/INST] Tokyo. </s>"
        "<s>[INST] And Korea? 안녕 🦙 [/INST]"
    )


def test_chat_template_with_legacy_false_differs_from_meta_after_each_bos():
    # The text after "<s>" gets no "▁" with legacy=False: "[" instead of "▁[" (docs/reference.md §5.2).
    dialog = DIALOGS["one_user_turn"]
    tokenizer = LlamaTokenizer(MODEL, legacy=False)
    ids = tokenizer.apply_chat_template(dialog)
    assert ids != meta_chat_ids(dialog)
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<s>", "["]


def test_chat_template_without_generation_prompt_may_end_with_an_answer():
    dialog = DIALOGS["one_user_turn"] + [{"role": "assistant", "content": "An animal."}]
    tokenizer = LlamaTokenizer(MODEL)
    ids = tokenizer.apply_chat_template(dialog, add_generation_prompt=False)
    sp = spm.SentencePieceProcessor(model_file=str(MODEL))
    assert ids == [1] + sp.encode("[INST] What is a llama? [/INST] An animal. ") + [2]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 1 is 'user'"),
        ([{"role": "assistant", "content": "a"}], "turn 0 is 'assistant'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "ends with a 'assistant' turn",
        ),
        ([{"role": "system", "content": "a"}], "followed by a user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "turn 1 is 'system'",
        ),
        ([{"role": "bot", "content": "a"}], "role 'bot'"),
        ([{"role": "user", "content": 5}], "string 'content'"),
        ([], "non-empty list"),
    ],
)
def test_chat_template_rejects_bad_dialogs(messages, match):
    with pytest.raises(TokenizerError, match=match):
        LlamaTokenizer(MODEL).apply_chat_template(messages)


# ------------------------------------------------------------------------------------------------
# files


def test_save_and_load_round_trip_keeps_settings_and_the_pad_id(tmp_path):
    tokenizer = LlamaTokenizer(MODEL, legacy=False, add_eos_token=True, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    written = tokenizer.save_pretrained(tmp_path / "saved")
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == MODEL.read_bytes()
    loaded = LlamaTokenizer.from_pretrained(tmp_path / "saved")
    assert (loaded.legacy, loaded.add_bos_token, loaded.add_eos_token, loaded.padding_side) == (
        False,
        True,
        True,
        "left",
    )
    assert loaded.pad_token_id == tokenizer.pad_token_id == 1000 and len(loaded) == 1001
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_from_pretrained_reads_a_transformers_style_config(tmp_path):
    # The layout of Llama 2's tokenizer_config.json on the hub: special tokens as AddedToken dicts.
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    added = lambda content: {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,  # noqa: E731
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
    assert tokenizer.legacy is False and tokenizer.pad_token is None
    assert (
        tokenizer.encode("Hello <s>.")
        == ENCODINGS["legacy_false"][TEXTS.index("Hello <s>.")]["ids"]
    )
    assert (
        LlamaTokenizer.from_pretrained(tmp_path, legacy=True).legacy is True
    )  # keyword arguments win


def test_model_max_length_from_the_config_limits_truncation(tmp_path):
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 5}))
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer(TEXTS[0], truncation=True)["input_ids"]) == 5


def test_save_vocabulary_uses_the_prefix(tmp_path):
    (path,) = LlamaTokenizer(MODEL).save_vocabulary(tmp_path, filename_prefix="mine")
    assert (
        Path(path) == tmp_path / "mine-tokenizer.model"
        and Path(path).read_bytes() == MODEL.read_bytes()
    )


def test_from_pretrained_by_bundled_name():
    from llama_np.formats.locate import bundled_model_names, resolve_model_path

    names = [
        n for n in bundled_model_names() if (resolve_model_path(n) / "tokenizer.model").is_file()
    ]
    if not names:
        pytest.skip("no bundled model with a tokenizer.model is installed")
    tokenizer = LlamaTokenizer.from_pretrained(names[0])
    ids = tokenizer.encode("To be, or not to be")
    assert (
        ids[0] == tokenizer.bos_token_id == 1
        and tokenizer.decode(ids, skip_special_tokens=True) == "To be, or not to be"
    )


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "text", [5, None, b"bytes", ["ok", 3]], ids=["int", "None", "bytes", "list_with_int"]
)
def test_non_string_text_is_a_tokenizer_error_naming_the_value(text):
    tokenizer = LlamaTokenizer(MODEL)
    with pytest.raises(TokenizerError, match="text must be a string"):
        tokenizer(text)
    if not isinstance(text, list):
        with pytest.raises(TokenizerError, match="text must be a string"):
            tokenizer.encode(text)
        with pytest.raises(TokenizerError, match="text must be a string"):
            tokenizer.tokenize(text)


@pytest.mark.parametrize("bad_id", [1000, -1, 10**9])
def test_decode_rejects_ids_outside_the_vocabulary(bad_id):
    tokenizer = LlamaTokenizer(MODEL)
    with pytest.raises(
        TokenizerError,
        match=rf"token id {bad_id} at position 1 is outside the vocabulary \(ids 0..999\)",
    ):
        tokenizer.decode([1, bad_id])
    with pytest.raises(TokenizerError, match=f"token id {bad_id}"):
        tokenizer.decode(bad_id)


def test_decode_accepts_the_pad_id_once_it_exists():
    tokenizer = padded_tokenizer()
    assert tokenizer.decode([1000]) == "<pad>"
    with pytest.raises(TokenizerError, match="ids 0..1000"):
        tokenizer.decode([1001])


@pytest.mark.parametrize(
    "ids, match",
    [
        ([1, 2.5], "position 1 is float"),
        (["a"], "position 0 is str"),
        ("hello", "list of ints"),
        (np.zeros((2, 3), dtype=np.int64), "batch_decode"),
        (np.array([1.0]), "integer array"),
    ],
)
def test_decode_rejects_ids_that_are_not_integers(ids, match):
    with pytest.raises(TokenizerError, match=match):
        LlamaTokenizer(MODEL).decode(ids)


def test_decode_accepts_numpy_integers():
    tokenizer = LlamaTokenizer(MODEL)
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == tokenizer.decode(ids)
    assert tokenizer.decode(np.int64(ids[1])) == tokenizer.decode([ids[1]])


def test_missing_tokenizer_model_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'nope.model'} does not exist"):
        LlamaTokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=rf"{tmp_path} has no tokenizer.model"):
        LlamaTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="neither a directory nor a bundled model name"):
        LlamaTokenizer.from_pretrained(tmp_path / "not-there")
    with pytest.raises(TokenizerError, match="does not exist"):
        read_model(tmp_path / "nope.model")


@pytest.mark.parametrize("legacy", LEGACY)
@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"\xff" * 64, "half"],
    ids=["empty", "text", "garbage", "truncated"],
)
def test_corrupt_tokenizer_model_is_a_tokenizer_error_naming_the_file(tmp_path, content, legacy):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(MODEL.read_bytes()[:7000] if content == "half" else content)
    with pytest.raises(TokenizerError, match=f"{path} is not a valid sentencepiece model"):
        LlamaTokenizer(path, legacy=legacy)


def test_corrupt_tokenizer_model_in_pure_python_reader(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(MODEL.read_bytes()[:7000])
    with pytest.raises(TokenizerError, match=str(path)):
        read_model(path)


def test_corrupt_tokenizer_config_is_named(tmp_path):
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_padding_without_a_pad_token_says_how_to_add_one():
    with pytest.raises(
        TokenizerError, match=r"no pad token .*add_special_tokens\(\{'pad_token': '<pad>'\}\)"
    ):
        LlamaTokenizer(MODEL)(["a", "bb"], padding=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(return_tensors="pt"), "return_tensors='pt'"),
        (dict(return_tensors="np"), "lengths"),
        (dict(padding="sideways"), "padding='sideways'"),
        (dict(truncation="middle"), "truncation='middle'"),
        (dict(padding="max_length"), "need max_length"),
        (dict(padding_side="up"), "padding_side='up'"),
    ],
)
def test_bad_call_arguments_are_tokenizer_errors(kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        padded_tokenizer()(["Hello world", "Hello"], **kwargs)


def test_unknown_special_token_name_is_an_error():
    with pytest.raises(TokenizerError, match="unknown special token name 'cls_token'"):
        LlamaTokenizer(MODEL).add_special_tokens({"cls_token": "<cls>"})


def test_a_piece_that_is_not_utf8_is_refused_when_the_model_loads(tmp_path):
    # sentencepiece itself loads such a file and fails on every later use of the piece.
    path = tmp_path / "tokenizer.model"
    path.write_bytes(MODEL.read_bytes().replace("▁".encode(), b"\xe2\x96\xff", 1))
    with pytest.raises(TokenizerError, match=f"{path} holds a piece that is not valid UTF-8"):
        LlamaTokenizer(path)
    with pytest.raises(TokenizerError, match=f"{path} is not a valid sentencepiece model"):
        read_model(path)


def test_a_byte_piece_not_spelled_0xNN_is_refused_by_the_pure_python_reader(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(MODEL.read_bytes().replace(b"<0x41>", b"<0xZZ>", 1))
    with pytest.raises(TokenizerError, match=f"{path} is not a valid sentencepiece model.*'ZZ'"):
        read_model(path)


@pytest.mark.parametrize("text", ["\udcff", "caf\udce9"])
def test_text_with_a_lone_surrogate_is_a_tokenizer_error(text):
    # Python turns undecodable bytes of a command-line argument into lone surrogates.
    with pytest.raises(TokenizerError, match="lone surrogate"):
        LlamaTokenizer(MODEL).encode(text)


@pytest.mark.parametrize("settings, match", [
    ({"add_bos_token": "false"}, "add_bos_token must be true or false, got 'false'"),
    ({"legacy": 0}, "legacy must be true or false"),
    ({"add_prefix_space": "no"}, "add_prefix_space must be true or false"),
    ({"model_max_length": "2048"}, "model_max_length must be a positive integer"),
    ({"model_max_length": -1}, "model_max_length must be a positive integer"),
    # A string would become one special token per letter.
    ({"additional_special_tokens": "<tool>"}, "additional_special_tokens must be a list"),
    ({"bos_token": {"content": ""}}, "bos_token is .*expected a non-empty string"),
    ({"added_tokens_decoder": ["<pad>"]}, "added_tokens_decoder must map token ids to tokens"),
    ({"added_tokens_decoder": {"x": {"content": "<pad>"}}}, "added_tokens_decoder has the key 'x'"),
])
def test_bad_tokenizer_config_values_are_errors_naming_the_file(tmp_path, settings, match):
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(TokenizerError, match=f"tokenizer_config.json: {match}"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_bad_settings_passed_in_python_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="add_eos_token must be true or false, got 'yes'"):
        LlamaTokenizer(MODEL, add_eos_token="yes")


def test_add_bos_token_with_a_null_bos_token_is_an_error_naming_both_fields(tmp_path):
    # Transformers' slow tokenizer puts None among the ids here ([self.bos_token_id]).
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": None}))
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)

    with pytest.raises(TokenizerError, match="add_bos_token is true but bos_token is null"):
        tokenizer.encode("Hello")
    with pytest.raises(TokenizerError, match="add_bos_token is true but bos_token is null"):
        tokenizer(["Hello", "world"])
    with pytest.raises(TokenizerError, match="chat format needs a bos_token"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert None not in tokenizer.encode("Hello", add_special_tokens=False)
    tokenizer.add_bos_token = False
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)


def test_add_eos_token_with_a_null_eos_token_is_an_error():
    tokenizer = LlamaTokenizer(MODEL, eos_token=None, add_eos_token=True)
    with pytest.raises(TokenizerError, match="add_eos_token is true but eos_token is null"):
        tokenizer.encode("Hello")


@pytest.mark.parametrize("max_length", [0, -1, 2.5, "8", True])
def test_max_length_that_is_not_a_positive_integer_is_refused_not_ignored(max_length):
    # Transformers leaves the text untruncated for 0 and -1; that is never what was meant.
    tokenizer = padded_tokenizer()
    with pytest.raises(TokenizerError, match="max_length must be a positive integer or None"):
        tokenizer("Hello world, hello world", truncation=True, max_length=max_length)
    with pytest.raises(TokenizerError, match="max_length must be a positive integer or None"):
        tokenizer.encode("Hello world", max_length=max_length)


def test_one_hundred_thousand_additional_special_tokens_load_and_encode_in_linear_time(tmp_path):
    # Loading was quadratic: 6,000 tokens took 3.3 s and 100,000 never finished.
    extra = [f"<extra_{i}>" for i in range(100_000)]
    shutil.copyfile(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"additional_special_tokens": extra}))

    start = time.perf_counter()
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode("a<extra_7><extra_99999>b", add_special_tokens=False)
    elapsed = time.perf_counter() - start

    assert elapsed < 30  # about 0.4 s; the quadratic version needs hours
    assert len(tokenizer) == 1000 + 100_000
    assert tokenizer.convert_tokens_to_ids(["<extra_0>", "<extra_99999>"]) == [1000, 100_999]
    assert ids[-3:-1] == [1007, 100_999]
    assert tokenizer.convert_ids_to_tokens(ids[-3:-1]) == ["<extra_7>", "<extra_99999>"]


def test_the_longest_special_token_starting_at_a_place_wins():
    tokenizer = LlamaTokenizer(MODEL, additional_special_tokens=["<x>", "<x>>", "x>"])
    assert tokenizer.tokenize("<x>>x>") == ["<x>>", "x>"]
    assert tokenizer.tokenize("a<x>")[-1] == "<x>"


def test_importing_the_tokenizer_without_sentencepiece_names_the_missing_package():
    code = textwrap.dedent("""
        import sys
        sys.modules["sentencepiece"] = None  # what an environment without it looks like
        import llama_np
        assert llama_np.LlamaForCausalLM  # the model does not need sentencepiece
        try:
            from llama_np import LlamaTokenizer
        except ImportError as error:
            print(error)
        try:
            from llama_np import NoSuchName
        except ImportError as error:
            print(error)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stderr
    tokenizer_line, other_line = result.stdout.splitlines()
    assert "LlamaTokenizer needs the 'sentencepiece' package" in tokenizer_line
    assert "pip install sentencepiece" in tokenizer_line
    assert "cannot import name 'NoSuchName'" in other_line


@pytest.mark.parametrize("denied", ["tokenizer.model", "tokenizer_config.json",
                                    "special_tokens_map.json", "."])
def test_an_unreadable_tokenizer_file_is_a_tokenizer_error_naming_it(tmp_path, deny_access,
                                                                    denied):
    LlamaTokenizer(MODEL).save_pretrained(tmp_path)
    deny_access(tmp_path / denied)
    with pytest.raises(TokenizerError, match="Permission denied") as error:
        LlamaTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / ("tokenizer.model" if denied == "." else denied)) in str(error.value)


def test_an_unreadable_tokenizer_model_is_named_by_both_readers(tmp_path, deny_access):
    path = tmp_path / "tokenizer.model"
    shutil.copyfile(MODEL, path)
    deny_access(path)
    with pytest.raises(TokenizerError, match=f"cannot read {path}: Permission denied"):
        LlamaTokenizer(path)
    with pytest.raises(TokenizerError, match=f"cannot read {path}: Permission denied"):
        read_model(path)


def test_a_tokenizer_model_without_its_unknown_piece_is_a_tokenizer_error(tmp_path):
    # One flipped byte (found by tests/test_fuzz.py) turns the first piece, <unk>, into another
    # field: sentencepiece loads the rest and fails on the first lookup of an unknown text.
    data = bytearray((Path(__file__).parent / "data" / "tokenizer" / "tokenizer.model").read_bytes())
    data[0] = 17
    (tmp_path / "tokenizer.model").write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="no unknown piece"):
        LlamaTokenizer.from_pretrained(tmp_path)
