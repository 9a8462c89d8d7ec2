"""Sliding-window perplexity (``llama_np.perplexity`` and ``llama-np perplexity``) against Transformers.

tests/data/perplexity/reference.json holds what the recipe of Transformers' documentation
("Perplexity of fixed-length models") computes for the bundled ``tiny-shakespeare`` on a held-out
passage (Julius Caesar III.2, ``julius_caesar_3_2.txt``), for two (context, stride) pairs, with
every window; tests/reference/make_perplexity_reference.py wrote it. Perplexity and NLL must agree
within PERPLEXITY_TOLERANCE (relative), the windows and token counts exactly. Neither torch nor
transformers is needed.
"""

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_np
from llama_np.cli.main import main
from llama_np.errors import InputError
from llama_np.losses import log_softmax
from llama_np.perplexity import (TokenComparison, encode_long_text, kl_divergence, kl_statistics, llama_cpp_chunks,
                                 perplexity, read_text_file, scored_log_probs, sliding_windows)
from tolerance import PERPLEXITY_TOLERANCE, REPEATED_TOLERANCE, assert_close, assert_relatively_close

DATA = Path(__file__).parent / "data" / "perplexity"
REFERENCE = json.loads((DATA / "reference.json").read_text())
PASSAGE = DATA / REFERENCE["passage"]["file"]
RUNS = {f"context{run['context']}_stride{run['stride']}": run for run in REFERENCE["runs"]}
MODEL = REFERENCE["model"]
TOKENIZER_MODEL = Path(__file__).parent / "data" / "tokenizer" / "tokenizer.model"


@functools.lru_cache(maxsize=None)
def bundled_model():
    return llama_np.LlamaForCausalLM.from_pretrained(MODEL)


def run(capsys, *argv):
    """(exit status, stdout, stderr) of one command."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, out, err, *names):
    """Exit 2, nothing on stdout, one ``llama-np: error:`` line on stderr naming each of ``names``."""
    assert status == 2, (status, out, err)
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-np: error: "), err
    for name in names:
        assert str(name) in lines[0], f"the error does not name {name}: {lines[0]}"


# ---------------------------------------------------------------------------- the stored reference


def test_reference_was_made_from_the_shipped_checkpoint():
    folder = Path(llama_np.__file__).parent / "assets" / MODEL
    for name, digest in REFERENCE["checkpoint"].items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} changed since reference.json was made; rerun make_perplexity_reference.py"


def test_tokenizer_gives_the_stored_ids_with_bos_once():
    tokenizer = llama_np.LlamaTokenizer.from_pretrained(MODEL)
    ids = tokenizer.encode(PASSAGE.read_bytes().decode("utf-8"))
    assert ids == REFERENCE["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", RUNS)
def test_windows_are_those_of_the_documented_recipe(name):
    reference = RUNS[name]
    windows = sliding_windows(len(REFERENCE["input_ids"]), reference["context"], reference["stride"])
    ours = [(w.begin, w.end, w.targets, w.loss_tokens) for w in windows]
    theirs = [(w["begin"], w["end"], w["trg_len"], w["num_loss_tokens"]) for w in reference["windows"]]
    assert ours == theirs


@pytest.mark.parametrize("name", RUNS)
def test_perplexity_matches_transformers_recipe(name):
    reference = RUNS[name]
    result = perplexity(bundled_model(), REFERENCE["input_ids"], reference["context"], reference["stride"])
    assert result.tokens == reference["tokens"]
    assert_relatively_close(result.nll, reference["nll"], f"{name} nll", tolerance=PERPLEXITY_TOLERANCE)
    assert_relatively_close(result.perplexity, reference["perplexity"], f"{name} perplexity",
                            tolerance=PERPLEXITY_TOLERANCE)


@pytest.mark.parametrize("name", RUNS)
def test_cli_json_matches_transformers_recipe(name, capsys):
    reference = RUNS[name]
    status, out, err = run(capsys, "perplexity", PASSAGE, "--context", reference["context"],
                           "--stride", reference["stride"], "--json")
    assert status == 0, err
    printed = json.loads(out)
    assert printed["tokens"] == reference["tokens"]
    assert (printed["context"], printed["stride"]) == (reference["context"], reference["stride"])
    assert_relatively_close(printed["nll"], reference["nll"], f"{name} nll (--json)", tolerance=PERPLEXITY_TOLERANCE)
    assert_relatively_close(printed["perplexity"], reference["perplexity"], f"{name} perplexity (--json)",
                            tolerance=PERPLEXITY_TOLERANCE)


def test_model_card_states_the_stored_perplexity():
    """MODEL_CARD.md holds the section write_model_cards.py renders from reference.json."""
    script = Path(__file__).parent / "reference" / "write_model_cards.py"
    spec = importlib.util.spec_from_file_location("write_model_cards", script)
    cards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cards)  # standard library only
    card = (Path(llama_np.__file__).parent / "assets" / MODEL / "MODEL_CARD.md").read_text()
    section = cards.perplexity_section(DATA)
    assert section and section in card, "MODEL_CARD.md's perplexity section is stale; run write_model_cards.py"


# ---------------------------------------------------------------------------- the recipe's edges


def test_the_recipe_weights_an_overlapping_window_by_one_token_less_than_it_averages():
    """context 8, stride 4 over 12 tokens: the first window scores tokens 1..7; the second
    (tokens 4..11) keeps the labels of tokens 8..11 and its loss is their mean over four, but
    the documented recipe weights it by 3."""
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:12])
    first = per_token_nll(model, ids[:8]).mean()  # tokens 1..7
    second = per_token_nll(model, ids[4:12])[3:].mean()  # tokens 8..11, seen from token 4 on
    labels = ids[None, 4:12].copy()
    labels[:, :4] = -100
    assert_close(model(ids[None, 4:12], labels=labels).loss, second, "second window loss", REPEATED_TOLERANCE)
    result = perplexity(model, ids, context=8, stride=4)
    assert result.tokens == 7 + 3
    assert_close(result.nll, (7 * first + 3 * second) / 10, "nll weighted 7 and 3", REPEATED_TOLERANCE)


def per_token_nll(model, ids):
    """NLL of each token after the first, (T - 1,), from one pass over ids (T,)."""
    log_probs = log_softmax(model(ids[None, :]).logits[0])  # (T, V)
    return -log_probs[np.arange(len(ids) - 1), ids[1:]]


def test_a_last_window_of_one_token_without_overlap_is_skipped_not_nan():
    """Over context + 1 tokens with stride = context, the recipe's last window holds one token,
    whose loss over no labels is NaN (multiplied by a weight of 0); it adds nothing here."""
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:9])
    result = perplexity(model, ids, context=8, stride=8)
    assert [w.loss_tokens for w in sliding_windows(9, 8, 8)] == [7, 0]
    assert result.tokens == 7
    assert_close(result.nll, model(ids[None, :8], labels=ids[None, :8]).loss, "first window only", REPEATED_TOLERANCE)
    assert math.isclose(result.perplexity, math.exp(result.nll))


def test_stride_equal_to_context_is_the_chunked_mean_of_disjoint_windows():
    model = bundled_model()
    ids = np.array(REFERENCE["input_ids"][:20])
    chunks = [ids[None, 0:8], ids[None, 8:16], ids[None, 16:20]]
    losses = [model(chunk, labels=chunk).loss for chunk in chunks]
    result = perplexity(model, ids, context=8, stride=8)
    assert result.tokens == 7 + 7 + 3
    assert_close(result.nll, (7 * losses[0] + 7 * losses[1] + 3 * losses[2]) / 17, "chunked mean", REPEATED_TOLERANCE)


def test_progress_is_called_once_per_window():
    calls = []
    perplexity(bundled_model(), REFERENCE["input_ids"][:40], context=16, stride=8,
               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 4) for i in range(1, 5)]


@pytest.mark.parametrize("ids, context, stride, message", [
    ([1], 8, 4, "at least 2"),
    ([[1, 2, 3], [1, 2, 3]], 8, 4, "one sequence"),
    ([1.0, 2.0], 8, 4, "integers"),
    ([1, 2, 3], 1, 1, "context must be an integer >= 2"),
    ([1, 2, 3], True, 1, "context must be an integer >= 2"),
    ([1, 2, 3], 8, 0, "stride must be an integer in [1, context=8]"),
    ([1, 2, 3], 8, 9, "stride must be an integer in [1, context=8]"),
    ([1, 2, 3], 8, 2.0, "stride must be an integer"),
])
def test_bad_arguments_are_input_errors_naming_them(ids, context, stride, message):
    with pytest.raises(InputError, match=re.escape(message)):
        perplexity(bundled_model(), ids, context, stride)


# ---------------------------------------------------------------------------- the command line


def test_help_shows_an_example(capsys):
    status, out, _ = run(capsys, "perplexity", "--help")
    assert status == 0 and "example:" in out and "--stride" in out


def test_defaults_are_the_model_context_and_half_of_it(capsys):
    status, out, _ = run(capsys, "perplexity", PASSAGE)
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["perplexity", "nll", "tokens"]
    assert "nats/token" in lines[1]
    max_positions = bundled_model().config.max_position_embeddings  # 256, under the 512 cap
    assert f"of up to {max_positions} tokens, stride {max_positions // 2})" in lines[2]
    windows = sliding_windows(len(REFERENCE["input_ids"]), max_positions, max_positions // 2)
    assert f"{sum(w.loss_tokens for w in windows)} scored of {len(REFERENCE['input_ids'])}" in lines[2]


@pytest.fixture
def short_text(tmp_path) -> Path:
    """The passage's first 600 characters: a few windows of 64 tokens."""
    path = tmp_path / "short.txt"
    path.write_bytes(PASSAGE.read_bytes()[:600])
    return path


def test_a_terminal_sees_a_window_counter_without_tqdm(capsys, monkeypatch, short_text):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is optional: import fails as if absent
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    status, out, err = run(capsys, "perplexity", short_text, "--context", 64, "--stride", 64)
    tokens = len(llama_np.LlamaTokenizer.from_pretrained(MODEL).encode(short_text.read_text()))
    windows = len(sliding_windows(tokens, 64, 64))
    assert status == 0 and out.startswith("perplexity") and windows > 1
    assert err == "".join(f"\rwindow {i}/{windows}" for i in range(1, windows + 1)) + "\n"


def test_no_progress_is_printed_when_stderr_is_not_a_terminal(capsys, short_text):
    status, _, err = run(capsys, "perplexity", short_text, "--context", 64, "--stride", 64)
    assert status == 0 and err == ""


@pytest.mark.parametrize("flags, names", [
    (["--context", "1"], ["--context", "at least 2"]),
    (["--context", "257"], ["--context", "256"]),
    (["--stride", "0"], ["--stride", "at least 1"]),
    (["--context", "64", "--stride", "65"], ["--stride", "[1, 64]"]),
    (["--stride", "300"], ["--stride", "[1, 256]"]),
    (["--context", "x"], ["--context", "'x'"]),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, names, capsys):
    status, out, err = run(capsys, "perplexity", PASSAGE, *flags)
    assert_one_line_error(status, out, err, *names)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"ROMEO.\n\xff\xfe love", "not UTF-8"),
])
def test_unusable_files_are_one_line_errors_naming_the_file(content, message, capsys, tmp_path):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    status, out, err = run(capsys, "perplexity", path)
    assert_one_line_error(status, out, err, path, message)


def test_a_directory_is_one_line_error_naming_it(capsys, tmp_path):
    status, out, err = run(capsys, "perplexity", tmp_path)
    assert_one_line_error(status, out, err, tmp_path, "directory")


def test_a_text_of_one_token_is_one_line_error(capsys, tmp_path):
    """Without bos, a one-character text is one token: nothing to predict."""
    model_dir = tmp_path / "no-bos"
    config = llama_np.LlamaConfig(vocab_size=llama_np.LlamaTokenizer(TOKENIZER_MODEL).vocab_size,
                                  hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama_np.LlamaForCausalLM.from_config(config, seed=0).save_pretrained(model_dir)
    shutil.copy(TOKENIZER_MODEL, model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    path = tmp_path / "one.txt"
    path.write_text("a")
    assert len(llama_np.LlamaTokenizer.from_pretrained(model_dir).encode("a")) == 1
    status, out, err = run(capsys, "perplexity", path, "--model", model_dir)
    assert_one_line_error(status, out, err, path, "1 token")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_text_that_is_a_fifo_or_a_device_is_refused_not_read_for_ever(tmp_path, kind, capsys):
    from llama_np.cli.main import main

    if kind == "fifo":
        path = tmp_path / "text.txt"
        os.mkfifo(path)
        expected = "is a FIFO"
    else:
        path = Path("/dev/zero")
        expected = "is a device"
    with pytest.raises(InputError, match=expected):
        read_text_file(path)
    assert main(["perplexity", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-np: error:") and expected in err


def test_a_text_larger_than_the_bound_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 1000)
    with pytest.raises(InputError, match="larger than the 999 bytes"):
        read_text_file(path, max_bytes=999)
    assert read_text_file(path, max_bytes=1000) == "x" * 1000


LONG_TEXT_SAMPLE = (Path(__file__).parent / "reference" / "tokenizer_sample.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("legacy", [True, False])
def test_a_long_text_tokenized_in_pieces_gives_the_whole_texts_ids(legacy):
    tokenizer = llama_np.LlamaTokenizer.from_pretrained(Path(__file__).parent / "data" / "tokenizer", legacy=legacy)
    text = LONG_TEXT_SAMPLE * 4 + "\n\n  indented\n\tx\n日本語 😀\n"
    done = []
    ids = encode_long_text(tokenizer, text, piece_characters=300, progress=lambda d, t: done.append((d, t)))
    assert ids.tolist() == tokenizer.encode(text)
    assert len(done) > 10 and done[-1] == (len(text), len(text))
    assert all(a[0] < b[0] for a, b in zip(done, done[1:]))


def test_a_cut_the_tokenizer_would_merge_across_is_not_made():
    class MergesNewlineWithA:
        """Characters as ids, except that "\\nA" is one token: no cut may fall before an "A"."""

        def encode(self, text, add_special_tokens=True):
            ids, i = ([1] if add_special_tokens else []), 0
            while i < len(text):
                if text.startswith("\nA", i):
                    ids.append(1000)
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            return ids

    tokenizer = MergesNewlineWithA()
    text = "".join(f"{'A' if n % 3 == 0 else 'b'}line {n}\n" for n in range(200))
    ids = encode_long_text(tokenizer, text, piece_characters=50)
    assert ids.tolist() == tokenizer.encode(text)


def test_a_loss_too_large_for_exp_gives_an_infinite_perplexity_not_an_overflow_error():
    model = llama_np.LlamaForCausalLM.from_pretrained(MODEL)
    model.weights["lm_head.weight"] = np.asarray(model.weights["lm_head.weight"]) * 1e4  # absurd logits
    result = perplexity(model, np.arange(1, 40), context=16, stride=16)
    assert result.nll > 710 and result.perplexity == math.inf


# ---------------------------------------------------------------------------- llama.cpp's recipe and KL
# tests/data/perplexity/llama_cpp.json holds what llama.cpp's llama-perplexity printed for the bundled
# model's F32 and Q8_0 GGUF files on the same passage (tests/reference/make_llama_cpp_perplexity_reference.py).
# The files are rewritten here with llama-np quantize and must have the hashes of the files it ran.

LLAMA_CPP = json.loads((DATA / "llama_cpp.json").read_text(encoding="utf-8"))
LLAMA_CPP_CONTEXT = LLAMA_CPP["context"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """{"F32": path, "Q8_0": path}: the bundled model written as the files llama.cpp ran."""
    directory = tmp_path_factory.mktemp("gguf")
    paths = {}
    for name, record in LLAMA_CPP["files"].items():
        type_name = name.rsplit("-", 1)[1].removesuffix(".gguf")
        path = directory / name
        assert main(["quantize", MODEL, str(path), "--type", type_name]) == 0
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"], f"{name} is not the file llama.cpp ran"
        paths[type_name] = path
    return paths


@functools.lru_cache(maxsize=None)
def gguf_model(path):
    return llama_np.LlamaForCausalLM.from_pretrained(path)


def test_llama_cpp_chunks_are_the_token_ids_llama_perplexity_ran():
    """llama.cpp tokenizes with bos at the start, runs T // context chunks and drops the rest."""
    ids = np.asarray(REFERENCE["input_ids"])
    assert len(ids) // LLAMA_CPP_CONTEXT == LLAMA_CPP["n_chunk"] == 15
    chunks = llama_cpp_chunks(ids, LLAMA_CPP_CONTEXT, bos_token_id=1)
    expected = np.asarray(LLAMA_CPP["chunk_token_ids"]).reshape(LLAMA_CPP["n_chunk"], LLAMA_CPP_CONTEXT)
    np.testing.assert_array_equal(chunks[:, 1:], expected[:, 1:])
    assert (chunks[:, 0] == 1).all() and not (expected[1:, 0] == 1).all()  # bos replaces a real token


def test_llama_cpp_recipe_matches_llama_perplexity(gguf_files):
    """Same scored-token count; perplexity within PERPLEXITY_TOLERANCE of the printed 4 decimals
    (5e-5 of rounding is 2.4e-6 relative) and the mean NLL of its 6 decimals."""
    result = perplexity(gguf_model(gguf_files["F32"]), REFERENCE["input_ids"], LLAMA_CPP_CONTEXT, recipe="llama.cpp")
    assert result.tokens == LLAMA_CPP["scored_tokens"] == 15 * 63
    assert_relatively_close(result.perplexity, LLAMA_CPP["perplexity"]["final"], "perplexity",
                            tolerance=PERPLEXITY_TOLERANCE)
    assert_relatively_close(result.nll, LLAMA_CPP["perplexity"]["chunks"][-1]["nll"], "nll",
                            tolerance=PERPLEXITY_TOLERANCE)


def test_llama_cpp_running_nll_matches_llama_perplexity_after_every_chunk(gguf_files):
    """--ppl-output-type 1 prints the mean NLL over the chunks so far; each must agree."""
    model = gguf_model(gguf_files["F32"])
    chunks = llama_cpp_chunks(REFERENCE["input_ids"], LLAMA_CPP_CONTEXT, model.config.bos_token_id)
    nll_sum, count = 0.0, 0
    for chunk, printed in zip(chunks, LLAMA_CPP["perplexity"]["chunks"], strict=True):
        log_probs, targets = scored_log_probs(model, chunk)
        nll_sum -= log_probs[np.arange(len(targets)), targets].sum()
        count += len(targets)
        assert_relatively_close(nll_sum / count, printed["nll"], f"running nll after chunk {printed['chunk']}",
                                tolerance=PERPLEXITY_TOLERANCE)


def test_the_two_recipes_differ_on_the_same_model():
    """llama.cpp's 20.918 against Transformers' 20.571 (stride 64): the cut, not the numerics."""
    ours = perplexity(bundled_model(), REFERENCE["input_ids"], LLAMA_CPP_CONTEXT, recipe="llama.cpp")
    transformers = RUNS["context128_stride64"]["perplexity"]
    assert abs(ours.perplexity / transformers - 1) > 0.01


def test_llama_cpp_recipe_refuses_a_stride_a_short_text_and_an_unknown_recipe():
    with pytest.raises(InputError, match="stride is not used by the llama.cpp recipe"):
        perplexity(bundled_model(), REFERENCE["input_ids"], 128, 64, recipe="llama.cpp")
    with pytest.raises(InputError, match=re.escape("needs at least 2 * context = 256")):
        perplexity(bundled_model(), REFERENCE["input_ids"][:255], 128, recipe="llama.cpp")
    with pytest.raises(InputError, match="recipe must be one of transformers, llama.cpp"):
        perplexity(bundled_model(), REFERENCE["input_ids"], 128, 64, recipe="llama-cpp")
    with pytest.raises(InputError, match="context must be an integer >= 3 for the llama.cpp recipe, got 2"):
        perplexity(bundled_model(), REFERENCE["input_ids"], 2, recipe="llama.cpp")  # would score no token


def test_kl_divergence_refuses_a_reference_with_another_vocabulary():
    config = llama_np.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    other = llama_np.LlamaForCausalLM.from_config(config, seed=0)
    with pytest.raises(InputError, match="reference_model has a vocabulary of 100 tokens, model one of 2000"):
        kl_divergence(bundled_model(), other, REFERENCE["input_ids"], 16)


def test_kl_of_q8_0_against_f32_agrees_with_llama_perplexity(gguf_files):
    """The reference's perplexity within PERPLEXITY_TOLERANCE of llama.cpp's; the quantised one's
    within 1e-4 too (measured 5e-5: llama.cpp's Q8_0 products also round the activations to 8
    bits, llama_np's multiply the dequantised weights in float32). For the same reason llama.cpp's
    mean KL (7.3e-5) is larger than llama_np's (3.2e-5, weight rounding alone): it must be of the
    same order, and the top tokens may disagree on at most 2 more or fewer of the 945 tokens."""
    comparison = kl_divergence(gguf_model(gguf_files["Q8_0"]), gguf_model(gguf_files["F32"]),
                               REFERENCE["input_ids"], LLAMA_CPP_CONTEXT)
    statistics = kl_statistics(comparison)
    printed = LLAMA_CPP["kl_q8_0"]
    assert statistics["tokens"] == LLAMA_CPP["scored_tokens"]
    assert_relatively_close(statistics["ppl_reference"], printed["ppl_reference"][0], "PPL(base)",
                            tolerance=PERPLEXITY_TOLERANCE)
    assert_relatively_close(statistics["ppl"], printed["ppl"][0], "PPL(Q)", tolerance=PERPLEXITY_TOLERANCE)
    assert 0 < statistics["mean_kl"] <= printed["mean_kl"][0] < 4 * statistics["mean_kl"]
    same_top = round(statistics["same_top"] * statistics["tokens"])
    assert abs(same_top - round(printed["same_top_percent"][0] / 100 * statistics["tokens"])) <= 2


def test_kl_of_a_model_against_itself_is_zero_and_every_top_token_agrees():
    comparison = kl_divergence(bundled_model(), bundled_model(), REFERENCE["input_ids"], LLAMA_CPP_CONTEXT)
    statistics = kl_statistics(comparison)
    np.testing.assert_allclose(comparison.kl_divergence, 0.0, atol=1e-12)
    assert statistics["same_top"] == 1.0 and statistics["ppl_ratio"] == 1.0
    assert_relatively_close(statistics["ppl"], perplexity(bundled_model(), REFERENCE["input_ids"], LLAMA_CPP_CONTEXT,
                                                          recipe="llama.cpp").perplexity, "PPL", tolerance=1e-12)


def test_kl_statistics_use_llama_cpps_formulas():
    """Hand-made tokens: the standard errors are llama.cpp's sqrt((E[x²] − E[x]²) / (N − 1))."""
    kl = np.linspace(0.0, 0.02, 21)
    comparison = TokenComparison(nll=np.full(21, 2.0) + kl, nll_reference=np.full(21, 2.0), kl_divergence=kl,
                                 probability_difference=np.full(21, 0.01), same_top=np.arange(21) < 20)
    statistics = kl_statistics(comparison)
    assert_relatively_close(statistics["mean_kl"], 0.01, "mean KL", tolerance=1e-12)
    assert_relatively_close(statistics["mean_kl_error"], kl.std() / math.sqrt(20), "its error", tolerance=1e-9)
    assert_relatively_close(statistics["ppl_ratio"], math.exp(0.01), "PPL ratio", tolerance=1e-12)
    assert_relatively_close(statistics["rms_probability_difference"], 0.01, "RMS Δp", tolerance=1e-12)
    assert statistics["same_top"] == 20 / 21
    assert_relatively_close(statistics["same_top_error"], math.sqrt(20 / 21 * 1 / 21 / 20), "its error",
                            tolerance=1e-12)


def test_cli_llama_cpp_recipe_prints_llama_perplexitys_number(capsys, gguf_files):
    status, out, err = run(capsys, "perplexity", PASSAGE, "--model", gguf_files["F32"], "--recipe", "llama.cpp",
                           "--context", LLAMA_CPP_CONTEXT, "--json")
    assert status == 0 and err == ""
    printed = json.loads(out)
    assert (printed["recipe"], printed["context"], printed["stride"]) == ("llama.cpp", LLAMA_CPP_CONTEXT, None)
    assert printed["tokens"] == LLAMA_CPP["scored_tokens"]
    assert_relatively_close(printed["perplexity"], LLAMA_CPP["perplexity"]["final"], "perplexity (--json)",
                            tolerance=PERPLEXITY_TOLERANCE)
    status, out, _ = run(capsys, "perplexity", PASSAGE, "--model", gguf_files["F32"], "--recipe", "llama.cpp",
                         "--context", LLAMA_CPP_CONTEXT)
    assert status == 0 and out.splitlines()[0] == f"perplexity  {LLAMA_CPP['perplexity']['final']:.4f}"
    assert "945 scored of 2026 (15 chunks of 128 tokens" in out and "106 left over" in out


def test_cli_kl_divergence_prints_llama_cpps_summary_lines(capsys, gguf_files):
    status, out, err = run(capsys, "perplexity", PASSAGE, "--model", gguf_files["Q8_0"],
                           "--kl-divergence", gguf_files["F32"], "--context", LLAMA_CPP_CONTEXT)
    assert status == 0 and err == ""
    labels = [line.split(":")[0].rstrip() for line in out.splitlines()[1:]]
    assert labels == ["Mean PPL(Q)", "Mean PPL(base)", "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)",
                      "Mean PPL(Q)-PPL(base)", "Mean    KLD", "Maximum KLD", "Median  KLD", "RMS Δp", "Same top p"]
    base = float(re.search(r"Mean PPL\(base\)\s*:\s*([\d.]+) ±", out).group(1))
    assert_relatively_close(base, LLAMA_CPP["kl_q8_0"]["ppl_reference"][0], "printed PPL(base)",
                            tolerance=PERPLEXITY_TOLERANCE)


@pytest.mark.parametrize("flags, names", [
    (["--recipe", "llama.cpp", "--stride", "64"], ["--stride", "--recipe llama.cpp"]),
    (["--kl-divergence", MODEL, "--recipe", "transformers"], ["--kl-divergence", "--recipe transformers"]),
    (["--kl-divergence", MODEL, "--stride", "8"], ["--stride", "--kl-divergence"]),
    (["--recipe", "llama-cpp"], ["--recipe", "llama-cpp"]),
    (["--recipe", "llama.cpp", "--context", "2"], ["--context", "at least 3"]),
])
def test_llama_cpp_and_kl_flags_are_one_line_errors_naming_the_flag(flags, names, capsys):
    status, out, err = run(capsys, "perplexity", PASSAGE, *flags)
    assert_one_line_error(status, out, err, *names)


def test_a_text_shorter_than_two_chunks_is_one_line_error_naming_the_file(capsys, short_text):
    status, out, err = run(capsys, "perplexity", short_text, "--recipe", "llama.cpp", "--context", 128)
    assert_one_line_error(status, out, err, short_text, "2 * --context = 256")


def round_activations_as_ggml(x):
    """What ggml does to the input of a matrix product with a Q8_0 matrix (blocks of 32 numbers,
    d = max|x| / 127 stored as float16, x · (1/d) rounded to the nearest integer) or an F16 one (the
    688-wide down_proj input: rounded to float16)."""
    if x.shape[-1] % 32:
        return x.astype(np.float16).astype(np.float32)
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)  # ggml: x * (1/d)
    q = np.rint(blocks * inverse)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def test_llama_cpps_larger_q8_0_kl_is_its_rounding_of_the_activations(gguf_files, monkeypatch):
    """With the quantised model's activations rounded as ggml rounds them, llama_np's mean KL
    comes within 10 % of llama.cpp's 0.000073 (without: 0.000032) and the top token agrees on
    llama.cpp's 939 of 945 tokens, give or take one (the emulation does not sum in ggml's order):
    the gap in the test above is that rounding, not a bug in either."""
    from llama_np import layers

    linear, rounding = layers.linear, {"on": False}

    def linear_as_ggml(x, weight, bias=None, pretraining_tp=1):
        return linear(round_activations_as_ggml(x) if rounding["on"] else x, weight, bias, pretraining_tp)

    class RoundedActivations:
        def __init__(self, model):
            self.model, self.config = model, model.config

        def __call__(self, *args, **kwargs):
            rounding["on"] = True
            try:
                return self.model(*args, **kwargs)
            finally:
                rounding["on"] = False

    monkeypatch.setattr(layers, "linear", linear_as_ggml)
    statistics = kl_statistics(kl_divergence(RoundedActivations(gguf_model(gguf_files["Q8_0"])),
                                             gguf_model(gguf_files["F32"]), REFERENCE["input_ids"], LLAMA_CPP_CONTEXT))
    printed = LLAMA_CPP["kl_q8_0"]
    assert_relatively_close(statistics["mean_kl"], printed["mean_kl"][0], "mean KL with ggml's rounding", tolerance=0.1)
    same_top = round(statistics["same_top"] * statistics["tokens"])
    assert abs(same_top - round(printed["same_top_percent"][0] / 100 * statistics["tokens"])) <= 1
