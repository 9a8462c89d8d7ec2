"""LlamaTokenizerFast against Transformers 4.45.2's LlamaTokenizerFast, token for token.

The expected values were stored by ``tests/reference/make_fast_tokenizer_reference.py`` (see
``tests/reference/README.md``) for the sentencepiece model of the slow reference
(``tests/data/tokenizer/tokenizer.model``): from a directory with only ``tokenizer.json`` and from
one with only ``tokenizer.model``, for both values of ``legacy``. These tests need neither torch
nor transformers; they need the ``tokenizers`` package (the extra ``llama-np[fast]``).
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llama_np.errors import TokenizerError
from llama_np.text.streaming import IncrementalDecoder
from llama_np.text.tokenizer import LlamaTokenizer

pytest.importorskip("tokenizers")

from llama_np.text.tokenizer_fast import LlamaTokenizerFast, convert_sentencepiece  # noqa: E402

DATA = Path(__file__).parent / "data" / "tokenizer_fast"
MODEL = Path(__file__).parent / "data" / "tokenizer" / "tokenizer.model"
SOURCES = [(source, legacy) for source in ("json", "model") for legacy in (True, False)]


def load_json(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


ENCODINGS = load_json("encodings.json")
SPECIAL = load_json("special_tokens.json")
PADDING = load_json("padding.json")


def key(source, legacy):
    return f"{source}_legacy_{str(legacy).lower()}"


def json_dir(legacy):
    return DATA / f"json_legacy_{str(legacy).lower()}"


@pytest.fixture(scope="module")
def model_only_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model_only")
    shutil.copyfile(MODEL, directory / "tokenizer.model")
    return directory


def load(source, legacy, model_only_dir, **kwargs):
    """The fast tokenizer as the reference script loaded it."""
    if source == "json":
        return LlamaTokenizerFast.from_pretrained(json_dir(legacy), **kwargs)
    return LlamaTokenizerFast.from_pretrained(model_only_dir, legacy=legacy, **kwargs)


@pytest.fixture(scope="module", params=SOURCES, ids=[key(*s) for s in SOURCES])
def fast_and_expected(request, model_only_dir):
    source, legacy = request.param
    return load(source, legacy, model_only_dir), ENCODINGS[key(source, legacy)], legacy


# --------------------------------------------------------------------------------------------
# tokenizer.model -> tokenizer.json


@pytest.mark.parametrize("legacy", [True, False])
def test_converting_tokenizer_model_builds_transformers_tokenizer_json(legacy):
    ours = LlamaTokenizerFast(vocab_file=MODEL, legacy=legacy)
    built = json.loads(ours.backend_tokenizer.to_str())
    stored = json.loads((json_dir(legacy) / "tokenizer.json").read_text(encoding="utf-8"))
    for part in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert built[part] == stored[part], part
    assert built["model"]["vocab"] == stored["model"]["vocab"]
    assert built["model"]["merges"] == stored["model"]["merges"]
    assert built == stored


def test_the_merges_replay_the_sentencepiece_scores():
    from llama_np.text.bpe import read_model

    model = read_model(MODEL)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(
        (json_dir(True) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]]
    scores = {piece: score for piece, score in zip(model.pieces, model.scores)}
    merged_scores = [scores[left + right] for left, right in merges]
    assert merged_scores == sorted(merged_scores, reverse=True)  # best merge first


# --------------------------------------------------------------------------------------------
# encoding and decoding, text by text


@pytest.mark.parametrize("index", range(len(ENCODINGS["texts"])))
def test_tokenize_and_encode_match_transformers(fast_and_expected, index):
    tokenizer, expected, _ = fast_and_expected
    text, row = ENCODINGS["texts"][index], expected[index]
    assert tokenizer.tokenize(text) == row["tokens"]
    assert tokenizer.encode(text) == row["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == row["ids_without_special_tokens"]
    assert tokenizer(text)["input_ids"] == row["ids"]


@pytest.mark.parametrize("index", range(len(ENCODINGS["texts"])))
def test_decode_matches_transformers(fast_and_expected, index):
    tokenizer, expected, _ = fast_and_expected
    row = expected[index]
    assert tokenizer.decode(row["ids"]) == row["decoded"]
    assert tokenizer.decode(row["ids"], skip_special_tokens=True) == row["decoded_skip_special_tokens"]
    assert tokenizer.convert_tokens_to_string(row["tokens"]) == row["tokens_to_string"]
    assert [tokenizer.decode([i]) for i in row["ids"]] == row["per_token_decoded"]
    assert tokenizer.convert_ids_to_tokens(row["ids_without_special_tokens"]) == row["tokens"]


def test_the_texts_cover_korean_cjk_emoji_bytes_and_special_token_strings():
    texts = "".join(ENCODINGS["texts"])
    for sample in ("안녕하세요", "東京", "北京", "👩‍👩‍👧", "🇰🇷", "<s>[INST]", "</s><unk>"):
        assert sample in texts
    byte_rows = [row for row in ENCODINGS["json_legacy_true"] if any(
        token.startswith("<0x") for token in row["tokens"])]
    assert len(byte_rows) >= 5


@pytest.mark.parametrize("legacy", [True, False])
def test_fast_equals_slow_wherever_transformers_says_they_agree(legacy):
    slow = LlamaTokenizer(MODEL, legacy=legacy)
    fast = LlamaTokenizerFast.from_pretrained(json_dir(legacy))
    rows = ENCODINGS[key("json", legacy)]
    agreeing = [(text, row) for text, row in zip(ENCODINGS["texts"], rows) if row["slow_ids_agree"]]
    assert len(agreeing) >= 50
    for text, row in agreeing:
        assert slow.encode(text) == fast.encode(text) == row["ids"], text
    decoding = [row for row in rows if row["slow_decode_agrees"]]
    assert decoding
    for row in decoding:
        assert slow.decode(row["ids"]) == fast.decode(row["ids"]), row["ids"]


def test_where_they_disagree_each_matches_its_own_transformers_class():
    """legacy=False: Transformers' slow and fast Llama tokenizers disagree on some texts; ours
    follow them, each its own."""
    rows = ENCODINGS[key("json", False)]
    disagreeing = [i for i, row in enumerate(rows) if not row["slow_ids_agree"]]
    assert disagreeing
    slow_expected = json.loads((MODEL.parent / "encodings.json").read_text(encoding="utf-8"))
    slow = LlamaTokenizer(MODEL, legacy=False)
    fast = LlamaTokenizerFast.from_pretrained(json_dir(False))
    for i in disagreeing:
        text = ENCODINGS["texts"][i]
        assert fast.encode(text) == rows[i]["ids"]
        if text in slow_expected["texts"]:
            j = slow_expected["texts"].index(text)
            assert slow.encode(text) == slow_expected["legacy_false"][j]["ids"]


@pytest.mark.parametrize("legacy", ["true", "false"])
def test_byte_pieces_decode_like_transformers_even_when_cut_off(legacy):
    tokenizer = LlamaTokenizerFast.from_pretrained(DATA / f"json_legacy_{legacy}")
    for case in load_json("byte_decoding.json")[f"legacy_{legacy}"]:
        ids = case["ids"]
        if case["text"] is not None:
            assert tokenizer.encode(case["text"], add_special_tokens=False) == ids
        assert tokenizer.convert_ids_to_tokens(ids) == case["tokens"]
        assert [tokenizer.decode(ids[:n]) for n in range(1, len(ids) + 1)] == case["prefix_decoded"]
        assert tokenizer.decode([tokenizer.bos_token_id] + ids) == case["with_bos_decoded"]


def test_incremental_decoder_reproduces_the_fast_decode():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(False))
    for text in ENCODINGS["texts"][:40]:
        ids = tokenizer.encode(text)
        decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        streamed = "".join(decoder.put(i) for i in ids) + decoder.end()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# the post-processor and the special-token methods


@pytest.mark.parametrize("case", SPECIAL["cases"],
                         ids=[f"bos{c['add_bos_token']}-eos{c['add_eos_token']}" for c in SPECIAL["cases"]])
def test_post_processor_toggles_match_transformers(case):
    a, b = SPECIAL["a"], SPECIAL["b"]
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    tokenizer.add_bos_token, tokenizer.add_eos_token = case["add_bos_token"], case["add_eos_token"]
    built = LlamaTokenizerFast.from_pretrained(json_dir(True), add_bos_token=case["add_bos_token"],
                                               add_eos_token=case["add_eos_token"])
    for t in (tokenizer, built):
        assert json.loads(t.backend_tokenizer.to_str())["post_processor"] == case["post_processor"]
        assert t.build_inputs_with_special_tokens(a) == case["build_single"]
        assert t.build_inputs_with_special_tokens(a, b) == case["build_pair"]
        assert t.get_special_tokens_mask(t.build_inputs_with_special_tokens(a),
                                         already_has_special_tokens=True) == case["mask_already_single"]
        assert t.create_token_type_ids_from_sequences(a) == case["token_types_single"]
        assert t.create_token_type_ids_from_sequences(a, b) == case["token_types_pair"]
        assert t.num_special_tokens_to_add(pair=False) == case["num_special_single"]
        assert t.num_special_tokens_to_add(pair=True) == case["num_special_pair"]
        assert t.encode("A llama is not a camel, but close.") == case["encode_single"]
        assert t.encode("A llama is not a camel, but close.", "Hello world") == case["encode_pair"]
        assert t("A llama is not a camel, but close.", "Hello world", return_token_type_ids=True,
                 return_special_tokens_mask=True) == case["call_pair"]


def test_special_tokens_mask_without_already_has_special_tokens_is_an_error_as_in_transformers():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    assert SPECIAL["cases"][0]["mask_single"] == {"error": "AssertionError"}
    assert SPECIAL["cases"][0]["mask_pair"] == {"error": "AssertionError"}
    with pytest.raises(TokenizerError, match="already_has_special_tokens=True"):
        tokenizer.get_special_tokens_mask(SPECIAL["a"])
    with pytest.raises(TokenizerError, match="return_special_tokens_mask=True"):
        tokenizer.get_special_tokens_mask(SPECIAL["a"], SPECIAL["b"], already_has_special_tokens=True)


def test_already_has_special_tokens_marks_unk_too():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    case = SPECIAL["mask_already_with_unk"]
    assert tokenizer.encode("a <unk> b </s>") == case["ids"]
    assert tokenizer.get_special_tokens_mask(case["ids"], already_has_special_tokens=True) == case["mask"]


def test_default_padding_side_is_transformers_class_default():
    assert LlamaTokenizerFast.from_pretrained(json_dir(True)).padding_side == SPECIAL["default_padding_side"]


def test_update_post_processor_with_a_null_bos_token_is_an_error_naming_both_fields():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    tokenizer.bos_token = None
    with pytest.raises(TokenizerError, match="add_bos_token is true but bos_token is null"):
        tokenizer.update_post_processor()
    tokenizer.add_bos_token = False  # the setter rebuilds the post-processor, now without bos
    assert tokenizer.encode("Hello world") == tokenizer.encode("Hello world", add_special_tokens=False)


def test_a_new_bos_token_takes_effect_after_update_post_processor():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    tokenizer.add_special_tokens({"bos_token": "</s>"})
    assert tokenizer.encode("Hello")[0] == 1  # as in Transformers: the post-processor is unchanged
    tokenizer.update_post_processor()
    assert tokenizer.encode("Hello")[0] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------
# padding, truncation, added tokens


@pytest.mark.parametrize("case", PADDING["cases"], ids=lambda c: json.dumps(c["kwargs"]))
def test_padding_and_truncation_match_transformers(case):
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.truncation_side = case.get("truncation_side", "right")
    if "error" in case:
        with pytest.raises(TokenizerError, match="cannot encode"):
            tokenizer(case["text"], case.get("text_pair"), **case["kwargs"])
        return
    output = tokenizer(case["text"], case.get("text_pair"), **case["kwargs"])
    assert {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in output.items()} == case["output"]
    assert {k: isinstance(v, np.ndarray) for k, v in output.items()} == case["output_is_array"]


def test_batch_decode_matches_transformers():
    expected = PADDING["batch_decode"]
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    assert tokenizer(["Hello world", "A llama is not a camel, but close.", "我们", ""])["input_ids"] == expected["unpadded_ids"]
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.batch_decode(expected["ids"]) == expected["decoded"]
    assert tokenizer.batch_decode(np.array(expected["ids"]), skip_special_tokens=True) == expected["decoded_skip_special_tokens"]


@pytest.mark.parametrize("legacy", ["true", "false"])
def test_adding_pad_gives_the_next_id_and_grows_len(legacy):
    expected = load_json("added_pad.json")[f"legacy_{legacy}"]
    tokenizer = LlamaTokenizerFast.from_pretrained(DATA / f"json_legacy_{legacy}")
    assert len(tokenizer) == expected["len_before"]
    assert tokenizer.add_special_tokens({"pad_token": "<pad>"}) == expected["added"]
    assert len(tokenizer) == expected["len_after"]
    assert tokenizer.vocab_size == expected["vocab_size"]
    assert tokenizer.pad_token_id == expected["pad_token_id"] == tokenizer.get_vocab()["<pad>"]
    assert len(tokenizer.get_vocab()) == expected["vocab_len"]
    assert tokenizer.all_special_ids == expected["all_special_ids"]
    assert tokenizer.tokenize("a <pad> b<pad>") == expected["tokens"]
    ids = tokenizer.encode("a <pad> b<pad>")
    assert ids == expected["ids"]
    assert tokenizer.decode(ids) == expected["decoded"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == expected["decoded_skip_special_tokens"]
    assert tokenizer.add_special_tokens({"pad_token": "<pad>"}) == expected["added_again"]


# --------------------------------------------------------------------------------------------
# files: from_pretrained, save_pretrained, the automatic choice


def test_llama_tokenizer_from_pretrained_gives_the_fast_tokenizer_for_a_tokenizer_json_only_dir():
    tokenizer = LlamaTokenizer.from_pretrained(json_dir(True))
    assert isinstance(tokenizer, LlamaTokenizerFast)
    assert tokenizer.encode("Hello <s>.") == LlamaTokenizerFast.from_pretrained(json_dir(True)).encode("Hello <s>.")
    assert isinstance(LlamaTokenizer.from_pretrained(DATA / "chat_llama2"), LlamaTokenizer)  # both files: slow


def test_save_pretrained_writes_tokenizer_json_that_loads_back_the_same(tmp_path):
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(False), padding_side="right")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_eos_token = True
    paths = tokenizer.save_pretrained(tmp_path)
    assert sorted(Path(p).name for p in paths) == ["special_tokens_map.json", "tokenizer.json",
                                                   "tokenizer_config.json"]
    loaded = LlamaTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, LlamaTokenizerFast)
    for text in ENCODINGS["texts"][:30]:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.pad_token_id == tokenizer.pad_token_id == 1000
    assert loaded.add_eos_token and loaded.padding_side == "right"


def test_save_vocabulary_needs_a_tokenizer_model(tmp_path, model_only_dir):
    with pytest.raises(TokenizerError, match="without a tokenizer.model"):
        LlamaTokenizerFast.from_pretrained(json_dir(True)).save_vocabulary(tmp_path)
    converted = LlamaTokenizerFast.from_pretrained(model_only_dir)
    (path,) = converted.save_vocabulary(tmp_path, filename_prefix="x")
    assert Path(path).name == "x-tokenizer.model"
    assert Path(path).read_bytes() == MODEL.read_bytes()
    assert "tokenizer.model" in {Path(p).name for p in converted.save_pretrained(tmp_path / "saved")}


def test_add_prefix_space_without_tokenizer_model_is_an_error_naming_the_setting(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(json_dir(True) / name, tmp_path / name)
    with pytest.raises(TokenizerError, match="add_prefix_space=True .* rebuilt from tokenizer.model"):
        LlamaTokenizerFast.from_pretrained(tmp_path, add_prefix_space=True)


def test_a_corrupt_tokenizer_json_is_a_tokenizer_error_naming_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(TokenizerError, match="tokenizer.json is not a tokenizers file"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_a_directory_without_either_file_names_both(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model .* and no tokenizer.json"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_a_refused_truncation_leaves_no_setting_behind():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    with pytest.raises(TokenizerError, match="cannot encode"):
        tokenizer("A llama is not a camel, but close.", truncation="only_second", max_length=4)
    assert len(tokenizer.tokenize("A llama is not a camel, but close.")) > 4


def test_padding_saved_in_tokenizer_json_gives_the_pad_token_but_pads_nothing_by_itself(tmp_path):
    saved = json.loads((json_dir(True) / "tokenizer.json").read_text(encoding="utf-8"))
    saved["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                        "pad_id": 2, "pad_type_id": 0, "pad_token": "</s>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved), encoding="utf-8")
    tokenizer = LlamaTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer.pad_token == "</s>"
    assert tokenizer(["a", "b c d"])["input_ids"] == [tokenizer.encode("a"), tokenizer.encode("b c d")]


def test_bad_inputs_are_tokenizer_errors():
    tokenizer = LlamaTokenizerFast.from_pretrained(json_dir(True))
    with pytest.raises(TokenizerError, match="text must be a string"):
        tokenizer.encode(5)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([1, 1000])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.convert_ids_to_tokens(-1)
    with pytest.raises(TokenizerError, match="no pad token"):
        tokenizer(["a", "b c"], padding=True)
    with pytest.raises(TokenizerError, match="add_bos_token must be true or false"):
        tokenizer.add_bos_token = "false"
    with pytest.raises(TokenizerError, match="must be a list of tokens"):
        tokenizer.add_special_tokens({"additional_special_tokens": "<x>"})
    with pytest.raises(TokenizerError, match="unknown special token name"):
        tokenizer.add_special_tokens({"sep_token": "<x>"})


def test_without_the_tokenizers_package_the_error_names_the_extra():
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tokenizers"] = None  # what an environment without it looks like
        from llama_np import LlamaTokenizer, TokenizerError
        assert LlamaTokenizer.from_pretrained({str(MODEL.parent)!r}).encode("Hi")  # slow: fine
        try:
            LlamaTokenizer.from_pretrained({str(json_dir(True))!r})
        except TokenizerError as error:
            print(error)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs the 'tokenizers' package: pip install 'llama-np[fast]'" in result.stdout


def test_converting_a_unigram_model_is_refused(tmp_path):
    data = bytearray(MODEL.read_bytes())
    # TrainerSpec (field 2) holds model_type (field 3) as the varint 2 (BPE): 0x18 0x02 -> 0x18 0x01
    start = data.index(b"\x12") + 2
    position = data.index(b"\x18\x02", start)
    data[position + 1] = 1
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="not BPE"):
        convert_sentencepiece(path)


def _tokenizer_json_variant(tmp_path, edit):
    directory = tmp_path / "variant"
    shutil.copytree(DATA / "json_legacy_false", directory)
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def test_a_garbage_precompiled_charsmap_is_refused_on_load_with_no_rust_panic_text(tmp_path, capfd):
    directory = _tokenizer_json_variant(tmp_path, lambda t: t.__setitem__(
        "normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAAAAAAAAAAAAAAAAAA"}))
    with pytest.raises(TokenizerError, match="tokenizer.json is not a tokenizers file .*index out of bounds"):
        LlamaTokenizerFast.from_pretrained(directory)
    assert "panicked" not in capfd.readouterr().err


def test_a_split_regex_that_backtracks_for_ever_is_a_tokenizer_error_not_a_panic(tmp_path):
    directory = _tokenizer_json_variant(tmp_path, lambda t: t.__setitem__(
        "pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}))
    tokenizer = LlamaTokenizerFast.from_pretrained(directory)
    with pytest.raises(TokenizerError, match="cannot encode this input .*PanicException"):
        tokenizer.encode("a" * 5000 + "b")


def test_a_tokenizer_json_without_a_decoder_joins_tokens_as_the_library_decodes(tmp_path):
    tokenizer = LlamaTokenizerFast.from_pretrained(_tokenizer_json_variant(tmp_path, lambda t: t.__setitem__("decoder", None)))
    assert tokenizer.convert_tokens_to_string(["▁hello", "▁world"]) == "▁hello ▁world"
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert tokenizer.decode(ids) == " ".join(tokenizer.convert_ids_to_tokens(ids))
