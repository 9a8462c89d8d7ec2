"""The ``llama-np`` command line, run in-process through ``main(argv)`` on tiny random checkpoints.

Each checkpoint is a 2-layer GQA model (4 query heads, 2 key/value heads) written to a temporary
directory beside a copy of the tokenizer test model, so these tests do not depend on the bundled
models.
"""

import io
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text

import llama_np
from llama_np.cli import checkpoints as checkpoints_cli
from llama_np.cli.classify import CLASSIFY_EXAMPLES
from llama_np.cli.common import DEFAULT_CLASSIFIER
from llama_np.cli.compare import MAX_FIGURE_PIXELS, figure_dpi
from llama_np.weights.memory import human_bytes
from llama_np.interp import plotting
from llama_np.formats.locate import bundled_model_names
from llama_np.cli.main import main
from llama_np.config import LlamaConfig
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification
from llama_np.text.tokenizer import LlamaTokenizer
from tolerance import REPEATED_TOLERANCE, assert_close

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "fixtures"
TOKENIZER_MODEL = REPO / "tests" / "data" / "tokenizer" / "tokenizer.model"
VERBS = ("generate", "chat", "classify", "logits", "compare", "inspect", "dump", "diff", "attention")
LABELS = {0: "comedy", 1: "history", 2: "tragedy"}
PROMPT = "To be, or not to be"


def tiny_config(**extra) -> LlamaConfig:
    vocab_size = LlamaTokenizer(TOKENIZER_MODEL).vocab_size
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5, **extra)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM.from_config(tiny_config(), seed=1).save_pretrained(directory, storage_dtype=np.float16)
    shutil.copy(TOKENIZER_MODEL, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-classifier")
    config = tiny_config(id2label=LABELS, pad_token_id=0)
    LlamaForSequenceClassification.from_config(config, seed=2).save_pretrained(directory)
    shutil.copy(TOKENIZER_MODEL, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def reference_file(lm_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    assert main(["logits", PROMPT, "--model", str(lm_dir), "--out", str(path)]) == 0
    return path


def run(capsys, *argv):
    """(exit status, stdout, stderr) of one command."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-np: error: "), err
    assert "Traceback" not in err


# -------------------------------------------------------------------------------- help, version


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb_shows_an_example(verb, capsys):
    status, out, _ = run(capsys, verb, "--help")
    assert status == 0
    assert "example:" in out
    assert f"llama-np {verb}" in out.split("example:")[1]


def test_version_from_python_m_llama_np():
    result = subprocess.run([sys.executable, "-m", "llama_np", "--version"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"llama-np {llama_np.__version__}"


# -------------------------------------------------------------------------------- errors


def test_missing_model_path_is_one_line_error(capsys, tmp_path):
    status, _, err = run(capsys, "inspect", "--model", tmp_path / "no-such-model")
    assert_one_line_error(status, err)
    assert "no-such-model" in err


def test_bad_argument_is_one_line_error(capsys, lm_dir):
    status, _, err = run(capsys, "generate", PROMPT, "--model", lm_dir, "--max-new-tokens", "many")
    assert_one_line_error(status, err)
    assert "--max-new-tokens" in err


def test_missing_verb_is_one_line_error(capsys):
    status, _, err = run(capsys)
    assert_one_line_error(status, err)


def test_greedy_with_temperature_is_refused(capsys, lm_dir):
    status, _, err = run(capsys, "generate", PROMPT, "--model", lm_dir, "--greedy", "--temperature", "0.7")
    assert_one_line_error(status, err)
    assert "--temperature" in err


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch, lm_dir):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "generate", interrupted)
    status, _, err = run(capsys, "generate", PROMPT, "--model", lm_dir)
    assert status == 130
    assert err == ""


# -------------------------------------------------------------------------------- generate, chat


def test_generate_greedy_streams_the_same_text_as_decoding_the_whole_sequence(capsys, lm_dir):
    status, out, err = run(capsys, "generate", PROMPT, "--model", lm_dir, "--greedy", "--seed", 0,
                           "--max-new-tokens", 12)
    assert status == 0, err
    model, tokenizer = LlamaForCausalLM.from_pretrained(lm_dir), LlamaTokenizer.from_pretrained(lm_dir)
    prompt_ids = tokenizer.encode(PROMPT)
    sequence = model.generate(np.array([prompt_ids]), max_new_tokens=12, do_sample=False)[0]
    whole = tokenizer.decode(sequence, skip_special_tokens=True)
    continuation = whole[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)):]
    assert continuation  # the random model says something
    assert out == PROMPT + continuation + "\n"
    assert "tokens/s" in err
    new_tokens = len(sequence) - len(prompt_ids)
    assert err.startswith(f"{new_tokens} new tokens; ")
    assert f"over the {new_tokens - 1} steps after the first" in err
    assert f"prompt of {len(prompt_ids)} tokens" in err


def test_generate_with_the_same_seed_samples_the_same_text(capsys, lm_dir):
    argv = ("generate", PROMPT, "--model", lm_dir, "--temperature", 1.5, "--top-k", 50, "--seed", 7,
            "--max-new-tokens", 10)
    first, second = run(capsys, *argv), run(capsys, *argv)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]


def test_chat_answers_each_line_and_stops_at_exit(capsys, monkeypatch, lm_dir):
    monkeypatch.setattr(sys, "stdin", _Lines("Who art thou?\nexit\nnever read\n"))
    status, _, err = run(capsys, "chat", "--model", lm_dir, "--system", "Speak in verse.", "--greedy",
                         "--max-new-tokens", 4, "--speed")
    assert status == 0, err
    assert err.count("tokens/s") == 1


def test_chat_stops_at_end_of_input(capsys, monkeypatch, lm_dir):
    monkeypatch.setattr(sys, "stdin", _Lines("Good morrow.\nAnd to thee?\n"))
    status, out, err = run(capsys, "chat", "--model", lm_dir, "--greedy", "--max-new-tokens", 3, "--speed")
    assert status == 0, err
    assert err.count("tokens/s") == 2


def test_piped_chat_marks_each_message_and_prints_no_speed_unless_asked(capsys, monkeypatch, lm_dir):
    monkeypatch.setattr(sys, "stdin", _Lines("Good morrow.\nAnd to thee?\n"))
    status, out, err = run(capsys, "chat", "--model", lm_dir, "--greedy", "--max-new-tokens", 3)
    assert status == 0, err
    assert out.startswith("> Good morrow.\n") and "\n> And to thee?\n" in out
    assert "tokens/s" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "0", "--temperature must be a finite number > 0, got 0; for greedy decoding use --greedy"),
    ("--temperature", "nan", "--temperature must be a finite number > 0, got nan"),
    ("--top-p", "2", "--top-p must be in (0, 1]"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-k", "-1", "--top-k must be >= 0"),
    ("--repetition-penalty", "0", "--repetition-penalty must be a finite number > 0"),
    ("--repetition-penalty", "inf", "--repetition-penalty must be a finite number > 0"),
    ("--seed", "-1", "--seed must be a non-negative integer"),
])
def test_generate_refuses_a_bad_sampling_flag_by_its_name_before_printing_anything(capsys, lm_dir, flag, value,
                                                                                    message):
    status, out, err = run(capsys, "generate", "ROMEO.", "--model", lm_dir, flag, value)
    assert_one_line_error(status, err)
    assert out == ""  # not even the prompt
    assert message in err
    assert "do_sample" not in err and "top_p " not in err


def test_a_checkpoint_temperature_of_0_with_top_k_names_the_file_and_the_flag_before_any_output(
        capsys, lm_dir, tmp_path):
    greedy_zero = tmp_path / "greedy-zero"
    shutil.copytree(lm_dir, greedy_zero)
    (greedy_zero / "generation_config.json").write_text('{"do_sample": false, "temperature": 0}')
    status, out, err = run(capsys, "generate", "ROMEO.", "--model", greedy_zero, "--top-k", 5)
    assert_one_line_error(status, err)
    assert out == ""
    assert "generation_config.json" in err and "--temperature" in err
    assert run(capsys, "generate", "ROMEO.", "--model", greedy_zero, "--max-new-tokens", 2)[0] == 0


def test_generate_dash_reads_the_prompt_from_stdin_less_the_final_newline(capsys, monkeypatch, lm_dir):
    argv = ("--model", lm_dir, "--greedy", "--max-new-tokens", 6)
    status, from_argument, err = run(capsys, "generate", PROMPT, *argv)
    assert status == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    status, from_stdin, err = run(capsys, "generate", "-", *argv)
    assert status == 0, err
    assert from_stdin == from_argument and from_stdin.startswith(PROMPT)


def test_generate_dash_with_stdin_closed_is_one_line_error(capsys, monkeypatch, lm_dir):
    monkeypatch.setattr(sys, "stdin", None)
    status, out, err = run(capsys, "generate", "-", "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "stdin is closed" in err and out == ""


def test_a_prompt_on_stdin_that_is_not_in_stdins_encoding_is_one_line_error(capsys, monkeypatch, lm_dir):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café\n".encode()), encoding="ascii"))
    status, _, err = run(capsys, "generate", "-", "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "not ascii text" in err and "PYTHONIOENCODING=utf-8" in err


def test_a_one_token_prompt_and_one_new_token_are_counted_in_the_singular(capsys, lm_dir):
    status, _, err = run(capsys, "generate", "", "--model", lm_dir, "--greedy", "--max-new-tokens", 1)
    assert status == 0, err
    assert err.startswith("1 new token; - tokens/s over the 0 steps after the first (prompt of 1 token read")


def test_output_to_an_ascii_only_stdout_escapes_what_it_cannot_encode(monkeypatch, lm_dir):
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="ascii")  # as with PYTHONIOENCODING=ascii
    monkeypatch.setattr(sys, "stdout", stdout)
    status = main(["generate", "café", "--model", str(lm_dir), "--greedy", "--max-new-tokens", "2"])
    stdout.flush()
    assert status == 0
    assert raw.getvalue().startswith(b"caf\\xe9")
    assert stdout.errors == "strict"  # the caller's stream is left as it was


def test_chat_with_stdin_closed_is_one_line_error(lm_dir):
    # `llama-np chat <&-`: Python starts with sys.stdin = None.
    result = subprocess.run(["sh", "-c", 'exec "$0" -m llama_np chat --model "$1" <&-', sys.executable, str(lm_dir)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(result.returncode, result.stderr)
    assert "stdin is closed" in result.stderr


class _Lines:
    """A non-interactive stdin holding ``text``."""

    def __init__(self, text):
        self.lines = text.splitlines(keepends=True)

    def readline(self):
        return self.lines.pop(0) if self.lines else ""

    def isatty(self):
        return False


# -------------------------------------------------------------------------------- classify


def test_classify_prints_a_label_and_probabilities_per_text(capsys, classifier_dir):
    texts = ["MACBETH. Is this a dagger", "DUKE. If music be the food of love, play on"]
    status, out, err = run(capsys, "classify", *texts, "--model", classifier_dir)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    model = LlamaForSequenceClassification.from_pretrained(classifier_dir)
    tokenizer = LlamaTokenizer.from_pretrained(classifier_dir)
    for line, text in zip(lines, texts):
        logits = model(np.array([tokenizer.encode(text)])).logits[0]
        assert line.startswith(LABELS[int(np.argmax(logits))] + "\t")
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        for index, name in LABELS.items():
            assert f"{name} {probabilities[index]:.3f}" in line


@pytest.mark.parametrize("verb, other", [("generate", "classify"), ("logits", "classify"), ("chat", "classify")])
def test_a_language_model_verb_on_a_classifier_names_the_verb_for_it(capsys, classifier_dir, verb, other):
    argv = (verb, "--model", classifier_dir) if verb == "chat" else (verb, PROMPT, "--model", classifier_dir)
    status, out, err = run(capsys, *argv)
    assert_one_line_error(status, err)
    assert "is a sequence classifier" in err and f"'llama-np {other}'" in err
    assert "lm_head.weight is missing" not in err and "missing: lm_head.weight" not in err
    assert out == ""


def test_classify_on_a_causal_language_model_names_generate_and_logits(capsys, lm_dir):
    status, _, err = run(capsys, "classify", PROMPT, "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "is a causal language model" in err and "'llama-np generate' or 'llama-np logits'" in err


@pytest.mark.skipif(DEFAULT_CLASSIFIER not in bundled_model_names(), reason="bundled classifier not installed")
def test_the_classify_example_in_help_is_labelled_right_by_the_bundled_classifier(capsys):
    _, help_text, _ = run(capsys, "classify", "--help")
    assert "69%" in help_text  # the help says how often the model is right
    texts = [text for text, _ in CLASSIFY_EXAMPLES]
    for text in texts:
        assert text.replace("\n", "\\n") in help_text
    status, out, err = run(capsys, "classify", *texts)
    assert status == 0, err
    predicted = [line.split("\t")[0] for line in out.strip().splitlines()]
    assert predicted == [genre for _, genre in CLASSIFY_EXAMPLES]


def test_classify_batched_equals_one_at_a_time(classifier_dir):
    from llama_np.cli.classify import classify_logits

    model = LlamaForSequenceClassification.from_pretrained(classifier_dir)
    tokenizer = LlamaTokenizer.from_pretrained(classifier_dir)
    rows = [tokenizer.encode(text) for text in ("A short one", "A rather longer passage of text, with more")]
    batched = classify_logits(model, rows)
    alone = np.concatenate([model(np.array([row])).logits for row in rows])
    assert_close(batched, alone, "batched vs one at a time", REPEATED_TOLERANCE)


# -------------------------------------------------------------------------------- logits


def test_logits_shows_top_tokens_and_saves_full_logits(capsys, lm_dir, tmp_path):
    out_file = tmp_path / "saved.npz"
    status, out, err = run(capsys, "logits", PROMPT, "--model", lm_dir, "--top", 3, "--out", out_file)
    assert status == 0, err
    model, tokenizer = LlamaForCausalLM.from_pretrained(lm_dir), LlamaTokenizer.from_pretrained(lm_dir)
    ids = np.array([tokenizer.encode(PROMPT)])
    expected = model(ids).logits
    best = int(np.argmax(expected[0, -1]))
    rows = out.strip().splitlines()[2:]
    assert len(rows) == 3
    assert rows[0].split()[:2] == ["1", str(best)]
    with np.load(out_file, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["input_ids"], ids)
        assert_close(saved["logits"], expected, "saved logits", REPEATED_TOLERANCE)
    assert not [p for p in tmp_path.iterdir() if p.name != "saved.npz"]  # no temporary file left


# -------------------------------------------------------------------------------- compare


def test_compare_passes_on_a_reference_written_by_logits_out(capsys, lm_dir, reference_file):
    status, out, err = run(capsys, "compare", reference_file, "--model", lm_dir)
    assert status == 0, err
    assert "PASS" in out and "FAIL" not in out
    with np.load(reference_file) as reference:
        length = reference["input_ids"].shape[1]
    assert f"argmax agrees at {length}/{length} positions" in out


def test_compare_fails_with_exit_1_on_perturbed_logits(capsys, lm_dir, reference_file, tmp_path):
    with np.load(reference_file) as reference:
        arrays = dict(reference)
    arrays["logits"] = arrays["logits"].copy()
    arrays["logits"][0, 2, 5] += 1e-2
    perturbed = tmp_path / "perturbed.npz"
    np.savez(perturbed, **arrays)
    status, out, _ = run(capsys, "compare", perturbed, "--model", lm_dir)
    assert status == 1
    assert "FAIL" in out
    assert "row 0, position 2" in out
    # The same file passes once the tolerance is wide enough.
    assert run(capsys, "compare", perturbed, "--model", lm_dir, "--atol", 2e-2)[0] == 0


def test_compare_skips_padding_positions_and_reads_a_prefix(capsys, lm_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    ids = np.array([[0, 0, 1, 50, 60], [1, 70, 80, 90, 99]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    logits = model(ids, attention_mask=mask).logits.copy()
    logits[0, :2] += 100.0  # garbage at the pads must not matter
    path = tmp_path / "several.npz"
    np.savez(path, **{"batch.input_ids": ids, "batch.attention_mask": mask, "batch.logits": logits})
    status, out, err = run(capsys, "compare", path, "--model", lm_dir, "--prefix", "batch")
    assert status == 0, err
    assert "argmax agrees at 8/8 positions" in out


def test_compare_checks_classifier_logits(capsys, classifier_dir, tmp_path):
    model = LlamaForSequenceClassification.from_pretrained(classifier_dir)
    ids = np.array([[1, 40, 41, 42], [1, 43, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    path = tmp_path / "classifier.npz"
    np.savez(path, input_ids=ids, attention_mask=mask, logits=model(ids, attention_mask=mask).logits)
    status, out, err = run(capsys, "compare", path, "--model", classifier_dir)
    assert status == 0, err
    assert "argmax agrees at 2/2 rows" in out


@pytest.mark.parametrize("fixture, prefix", [("gqa_f32", "forward"), ("gqa_f32", "padded"),
                                             ("mqa_tied_f16", "forward"), ("seqcls_single_label", "left")])
def test_compare_passes_on_stored_transformers_fixtures(capsys, fixture, prefix):
    directory = FIXTURES / fixture
    status, out, err = run(capsys, "compare", directory / "reference.npz", "--model", directory, "--prefix", prefix)
    assert status == 0, out + err
    assert out.strip().endswith("PASS: tolerance |Δ| <= 0.0001 * max(1, |reference logit|)")


def test_compare_without_prefix_on_a_file_of_several_references_names_the_prefixes(capsys):
    directory = FIXTURES / "gqa_f32"
    status, _, err = run(capsys, "compare", directory / "reference.npz", "--model", directory)
    assert_one_line_error(status, err)
    assert "has no input_ids or logits" in err
    assert "--prefix (forward, keep, padded)" in err


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"logits": np.zeros((1, 3, 8), np.float32)}, "no input_ids"),
    ({"input_ids": np.array([[1, 2, 3]])}, "no logits"),
    ({"input_ids": np.array([[1, 2, 3]]), "logits": np.zeros((1, 4, 1000), np.float32)}, "(1, 3, vocabulary)"),
    ({"input_ids": np.array([[1, 2, 3]]), "logits": np.zeros((1, 3, 77), np.float32)}, "77 vocabulary entries"),
    ({"input_ids": np.array([[1.0, 2.0]]), "logits": np.zeros((1, 2, 1000), np.float32)}, "integer"),
    ({"input_ids": np.array([[1, 2]]), "logits": np.zeros((1, 2, 1000), np.float32),
      "attention_mask": np.array([[1, 1, 1]])}, "attention_mask"),
])
def test_compare_rejects_malformed_reference_with_one_line(capsys, lm_dir, tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    status, _, err = run(capsys, "compare", path, "--model", lm_dir)
    assert_one_line_error(status, err)
    assert message in err


def test_compare_rejects_files_that_are_not_npz_or_hold_pickles(capsys, lm_dir, tmp_path):
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("not an archive\n")
    assert_one_line_error(*run(capsys, "compare", not_zip, "--model", lm_dir)[::2])

    pickled = _write_npz(tmp_path / "pickled.npz", input_ids=np.array([[1, 2]]),
                         logits=np.array([{"a": 1}], dtype=object))
    status, _, err = run(capsys, "compare", pickled, "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "pickle" in err.lower()

    status, _, err = run(capsys, "compare", tmp_path / "absent.npz", "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "does not exist" in err


def test_compare_says_a_text_file_renamed_npz_is_not_a_zip_archive(capsys, lm_dir, tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("input_ids: 1 2 3\n")
    status, _, err = run(capsys, "compare", text, "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "is not an .npz file" in err and "not a zip archive" in err
    assert "allow_pickle" not in err


def test_compare_fails_when_every_position_is_masked_as_nothing_was_compared(capsys, lm_dir, reference_file,
                                                                              tmp_path):
    with np.load(reference_file) as reference:
        arrays = dict(reference)
    arrays["attention_mask"] = np.zeros_like(arrays["attention_mask"])
    masked = _write_npz(tmp_path / "masked.npz", **arrays)
    status, out, _ = run(capsys, "compare", masked, "--model", lm_dir)
    assert status == 1
    assert "FAIL: nothing was compared" in out and "PASS" not in out


def test_compare_reads_a_compressed_reference(capsys, lm_dir, reference_file, tmp_path):
    with np.load(reference_file) as reference:
        arrays = dict(reference)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    status, out, err = run(capsys, "compare", compressed, "--model", lm_dir)
    assert status == 0, err
    assert "PASS" in out


def _npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


TERABYTES_SHAPE = (1, 3, 2**40)  # 12 TiB of float32


def test_compare_refuses_an_npz_whose_header_declares_terabytes_it_does_not_hold(capsys, lm_dir, tmp_path):
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("input_ids.npy", _npy_header((1, 3), "<i8") + np.array([[1, 2, 3]]).tobytes())
        archive.writestr("logits.npy", _npy_header(TERABYTES_SHAPE) + bytes(12))
    assert forged.stat().st_size < 1000
    status, _, err = run(capsys, "compare", forged, "--model", lm_dir)  # NumPy alone allocates 12 TiB
    assert_one_line_error(status, err)
    assert "forged.npz: array logits declares shape (1, 3, 1099511627776) float32 (12.0 TiB)" in err
    assert "holds 12 bytes" in err


@pytest.mark.parametrize("verb", ["compare", "diff"])
def test_an_npz_member_that_would_inflate_to_terabytes_is_refused_before_reading(capsys, lm_dir, tmp_path, verb):
    # A deflate bomb: the zip declares 12 TiB uncompressed for a member of a few compressed bytes.
    bomb = tmp_path / "bomb.npz"
    header = _npy_header(TERABYTES_SHAPE)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input_ids.npy", _npy_header((1, 3), "<i8") + np.array([[1, 2, 3]]).tobytes())
        archive.writestr("logits.npy", header + bytes(64))
        archive.filelist[-1].file_size = len(header) + 3 * 2**40 * 4
    assert bomb.stat().st_size < 1000
    argv = ("compare", bomb, "--model", lm_dir) if verb == "compare" else ("diff", bomb, bomb)
    status, _, err = run(capsys, *argv)
    assert_one_line_error(status, err)
    assert "bomb.npz: its arrays would take 12.0 TiB in memory (the largest, logits, 12.0 TiB)" in err


def test_compare_on_a_classifier_with_language_model_logits_says_which_kind_it_needs(capsys, classifier_dir,
                                                                                      reference_file):
    status, _, err = run(capsys, "compare", reference_file, "--model", classifier_dir)
    assert_one_line_error(status, err)
    assert "language-model logits (B, T, V)" in err and "not a causal language model" in err


# -------------------------------------------------------------------------------- inspect


def test_inspect_reports_gqa_dtype_sizes_and_memory(capsys, lm_dir):
    status, out, err = run(capsys, "inspect", "--model", lm_dir, "--seq-len", 16)
    assert status == 0, err
    assert "GQA ratio        2:1" in out
    assert "grouped-query attention" in out
    assert "F16 (" in out
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    assert f"parameters       {model.num_parameters():,}" in out
    size = (lm_dir / "model.safetensors").stat().st_size
    assert f"{size:,} bytes" in out
    assert "RoPE             type default, theta 10000" in out
    assert "16 tokens" in out and "key/value cache" in out


def test_inspect_says_how_a_model_too_large_to_keep_widened_runs(capsys, lm_dir, monkeypatch):
    monkeypatch.setattr(checkpoints_cli, "keep_widened_limit", lambda: 1000)
    monkeypatch.setattr(checkpoints_cli, "streamed_widened_budget", lambda stored_bytes: 2048)
    status, out, err = run(capsys, "inspect", "--model", lm_dir)
    assert status == 0, err
    stored = human_bytes(LlamaForCausalLM.from_pretrained(lm_dir).checkpoint.nbytes)
    assert ("(above 1000 B, half the memory available now, so not all kept widened: up to 2.0 KiB of the "
            f"float16/bfloat16 matrices are, the rest are streamed from the {stored} memory-mapped file") in out


def test_inspect_recognises_a_classifier(capsys, classifier_dir):
    status, out, err = run(capsys, "inspect", "--model", classifier_dir)
    assert status == 0, err
    assert "LlamaForSequenceClassification" in out
    assert "comedy, history, tragedy" in out
    assert "F32 (" in out


def test_a_warning_repeated_at_every_step_is_printed_once(capsys, lm_dir):
    status, _, err = run(capsys, "generate", PROMPT, "--model", lm_dir, "--greedy", "--max-new-tokens", 70)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("llama-np: warning: ")]
    assert len(warnings) == 1 and "max_position_embeddings=64" in warnings[0]


def test_logits_refuses_an_out_file_in_a_missing_directory_before_running(capsys, lm_dir, tmp_path):
    status, out, err = run(capsys, "logits", PROMPT, "--model", lm_dir, "--out", tmp_path / "absent" / "x.npz")
    assert_one_line_error(status, err)
    assert out == ""
    assert "absent" in err


# -------------------------------------------------------------------------------- dump, diff, attention


def test_dump_saves_every_hook_and_diff_passes_on_itself(capsys, lm_dir, tmp_path):
    golden = tmp_path / "golden.npz"
    status, out, err = run(capsys, "dump", PROMPT, "--model", lm_dir, "--out", golden)
    assert status == 0, err
    saved = np.load(golden)
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    assert set(llama_np.interp.hooks.hook_names(model.config)) <= set(saved.files)
    np.testing.assert_array_equal(saved["logits"], model(saved["input_ids"]).logits)
    status, out, _ = run(capsys, "diff", golden, golden)
    assert status == 0 and out.strip().endswith("max(1, |value|)") and "PASS" in out


def test_diff_names_the_first_divergence_in_forward_order(capsys, lm_dir, tmp_path):
    golden = tmp_path / "golden.npz"
    run(capsys, "dump", PROMPT, "--model", lm_dir, "--out", golden)
    changed = dict(np.load(golden))
    changed["blocks.1.hook_resid_post"] = changed["blocks.1.hook_resid_post"] + 1.0  # later
    changed["blocks.0.mlp.hook_post"] = changed["blocks.0.mlp.hook_post"] * 1.01  # earlier
    port = tmp_path / "port.npz"
    np.savez(port, **changed)
    status, out, _ = run(capsys, "diff", port, golden)
    assert status == 1
    assert "first divergence at blocks.0.mlp.hook_post" in out


def test_diff_refuses_dumps_of_different_inputs(capsys, lm_dir, tmp_path):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    run(capsys, "dump", PROMPT, "--model", lm_dir, "--out", first, "--names", "hook_embed")
    run(capsys, "dump", PROMPT + " more", "--model", lm_dir, "--out", second, "--names", "hook_embed")
    status, _, err = run(capsys, "diff", first, second)
    assert_one_line_error(status, err)
    assert "different input_ids" in err


@pytest.mark.parametrize("part, hint", [("nosuchhook", "hook names look like hook_embed"),
                                        ("hook_patern", "did you mean hook_pattern"),
                                        ("resid_pst", "did you mean hook_resid_post")])
def test_dump_refuses_a_names_part_that_matches_no_hook_and_suggests_close_ones(capsys, lm_dir, tmp_path, part,
                                                                                 hint):
    out_file = tmp_path / "dump.npz"
    status, _, err = run(capsys, "dump", PROMPT, "--model", lm_dir, "--out", out_file, "--names", "hook_embed", part)
    assert_one_line_error(status, err)
    assert f"--names {part} matches no hook name" in err and hint in err
    assert not out_file.exists()


def test_attention_writes_a_png_and_checks_the_layer(capsys, lm_dir, tmp_path):
    figure = tmp_path / "layer.png"
    status, out, err = run(capsys, "attention", PROMPT, "--model", lm_dir, "--layer", 1, "--out", figure)
    assert status == 0, err
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, _, err = run(capsys, "attention", PROMPT, "--model", lm_dir, "--layer", 9, "--out", figure)
    assert_one_line_error(status, err)
    assert "--layer" in err


def test_compare_checks_a_classifier_reference_against_the_bundled_classifier_by_default(capsys):
    reference = REPO / "tests" / "data" / "bundled" / "tiny-shakespeare-genre.npz"
    status, out, err = run(capsys, "compare", reference, "--prefix", "left")
    assert status == 0, err
    assert "PASS" in out


def test_compare_refuses_a_single_npy_array_renamed_to_npz(capsys, lm_dir, tmp_path):
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    status, _, err = run(capsys, "compare", single, "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "holds a single array, not an .npz archive" in err


@pytest.mark.parametrize("value", [np.array(["x"]), np.array([1 + 2j])], ids=["strings", "complex"])
def test_diff_refuses_arrays_that_are_not_real_numbers(capsys, tmp_path, value):
    good, odd = tmp_path / "good.npz", tmp_path / "odd.npz"
    np.savez(good, input_ids=np.array([[1]]), hook_embed=np.array([1.0]))
    np.savez(odd, input_ids=np.array([[1]]), hook_embed=value)
    status, _, err = run(capsys, "diff", good, odd)
    assert_one_line_error(status, err)
    assert f"are not real numbers: hook_embed ({value.dtype})" in err


def test_a_prompt_with_undecodable_bytes_is_one_line_error(capsys, lm_dir):
    # Python hands undecodable bytes of an argument over as lone surrogates ("\udcff").
    status, _, err = run(capsys, "logits", "caf\udcff", "--model", lm_dir)
    assert_one_line_error(status, err)
    assert "lone surrogate" in err


@pytest.mark.parametrize("file_name, text, message", [
    ("config.json", "[" * 100_000, "config.json is not valid JSON"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token must be true or false"),
    ("generation_config.json", '{"do_sample": "no"}', "do_sample must be True or False"),
])
def test_broken_side_files_of_a_model_are_one_line_errors(capsys, lm_dir, tmp_path, file_name, text, message):
    broken = tmp_path / "broken"
    shutil.copytree(lm_dir, broken)
    (broken / file_name).write_text(text)
    status, _, err = run(capsys, "generate", PROMPT, "--model", broken, "--max-new-tokens", 2)
    assert_one_line_error(status, err)
    assert message in err and file_name in err


def test_a_negative_seed_is_one_line_error(capsys, lm_dir):
    status, _, err = run(capsys, "generate", PROMPT, "--model", lm_dir, "--seed", -1, "--max-new-tokens", 2)
    assert_one_line_error(status, err)
    assert "seed must be a non-negative integer" in err


def test_attention_on_a_long_prompt_says_why_the_token_labels_were_left_out(capsys, lm_dir, tmp_path):
    long_prompt = " ".join(["To be, or not to be"] * 5)  # more tokens than a head's panel can label
    status, _, err = run(capsys, "attention", long_prompt, "--model", lm_dir, "--layer", 0, "--out",
                         tmp_path / "layer.png")
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("llama-np: warning: ")]
    assert len(warnings) == 1 and "token labels left out" in warnings[0] and "--head" in warnings[0]


def _uniform_pattern(heads: int, length: int) -> dict:
    """A trace-cache-like dict holding layer 0's attention pattern (1, H, T, T)."""
    return {"blocks.0.attn.hook_pattern": np.full((1, heads, length, length), 1.0 / length)}


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 1), (16, 2)])
def test_the_layer_figure_labels_tokens_up_to_what_fits_and_warns_beyond(heads, kv_heads):
    figure = plotting.plot_attention_layer(_uniform_pattern(heads, 4), 0, kv_heads)
    panel_inches = (figure.get_figwidth() - 1) / figure.axes[0].get_gridspec().ncols
    fit = plotting.labels_that_fit(plotting.PANEL_IMAGE_SHARE * panel_inches)
    assert fit >= 8
    tokens = [f"t{i}" for i in range(fit)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = plotting.plot_attention_layer(_uniform_pattern(heads, fit), 0, kv_heads, tokens=tokens)
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == tokens  # the left column
    with pytest.warns(UserWarning, match=f"token labels left out, since {fit + 1} labels"):
        figure = plotting.plot_attention_layer(_uniform_pattern(heads, fit + 1), 0, kv_heads,
                                               tokens=[f"t{i}" for i in range(fit + 1)])
    assert not figure.axes[0].get_yticklabels()


def test_the_head_figure_thins_labels_it_cannot_fit_and_says_so():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plotting.plot_attention_head(_uniform_pattern(1, 30), 0, 0, tokens=[f"t{i}" for i in range(30)])
    with pytest.warns(UserWarning, match="labelled every 2nd token"):
        figure = plotting.plot_attention_head(_uniform_pattern(1, 100), 0, 0, tokens=[f"t{i}" for i in range(100)])
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()][:3] == ["t0", "t2", "t4"]


SMALLEST_READABLE_PIXELS = 10


@pytest.mark.parametrize("layer_figure, heads, kv_heads, length", [
    (False, 1, 1, 5), (False, 1, 1, 60), (False, 1, 1, 200),
    (True, 4, 2, 8), (True, 8, 8, 8), (True, 16, 2, 8), (True, 16, 2, 40),
])
def test_attention_figures_saved_by_the_cli_are_at_most_1200_pixels_wide_with_text_10_pixels_high(
        layer_figure, heads, kv_heads, length):
    tokens = [f"t{i}" for i in range(length)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels left out or thinned: tested above
        if layer_figure:
            figure = plotting.plot_attention_layer(_uniform_pattern(heads, length), 0, kv_heads, tokens=tokens)
        else:
            figure = plotting.plot_attention_head(_uniform_pattern(heads, length), 0, 0, tokens=tokens)
    dpi = figure_dpi(figure)
    assert figure.get_figwidth() * dpi <= MAX_FIGURE_PIXELS + 0.5
    figure.canvas.draw()
    texts = [text for text in figure.findobj(Text) if text.get_visible() and text.get_text()]
    assert texts
    smallest = min(text.get_fontsize() for text in texts)
    assert smallest * dpi / 72 >= SMALLEST_READABLE_PIXELS, (smallest, dpi)


def test_the_activation_norms_plot_has_whole_layer_numbers_on_its_axis(lm_dir):
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    _, cache = model.run_with_cache(np.array([[1, 50, 60, 70]]))
    figure = plotting.plot_activation_norms(cache)
    axis = figure.axes[0]
    low, high = axis.get_xlim()
    assert [tick for tick in axis.get_xticks() if low <= tick <= high] == [0, 1]  # not 0.2, 0.4, ...


# -------------------------------------------------------------------------------- packaging


def test_the_package_ships_a_py_typed_marker_for_type_checkers():
    assert (REPO / "llama_np" / "py.typed").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["llama_np"]


def test_a_fifo_given_as_a_reference_npz_is_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "golden.npz"
    os.mkfifo(fifo)
    assert main(["compare", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-np: error:") and "is a FIFO" in err


@pytest.mark.parametrize("argv, nearest", [
    (["generate", "x", "--max_new_tokens", "3"], "--max-new-tokens"),
    (["generate", "x", "--temprature", "0.5"], "--temperature"),
    (["generate", "x", "--max-new-token", "3"], "--max-new-tokens"),
    (["diff", "a.npz", "b.npz", "--atl", "1"], "--atol"),
])
def test_an_unknown_or_abbreviated_flag_names_the_nearest_one_of_its_verb(argv, nearest, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"did you mean {nearest}?" in err and f"llama-np {argv[0]} --help" in err


def test_generate_piped_into_head_ends_with_status_0():
    command = f"{sys.executable} -m llama_np generate ROMEO. --max-new-tokens 200 --seed 0 | head -c 20"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error" not in result.stderr


def test_ctrl_c_during_an_answer_returns_to_the_chat_prompt(capsys, monkeypatch, lm_dir):
    from llama_np.cli import generate as generate_verbs

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    real = generate_verbs.stream_continuation
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(args[2])  # the prompt ids of this turn
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_verbs, "stream_continuation", interrupted_once)
    monkeypatch.setattr(sys, "stdin", Terminal("Good morrow.\nAnd to thee?\n"))
    status, _, err = run(capsys, "chat", "--model", lm_dir, "--greedy", "--max-new-tokens", 3)
    assert status == 0, err
    assert "[interrupted: this answer is left out of the conversation]" in err
    assert len(calls) == 2 and len(calls[1]) < len(calls[0]) + 12, "the second turn's dialog lacks the first"
