"""Checkpoints as they sit on users' disks, through the Python API and every CLI verb:

- a directory that ships ``tokenizer.json`` and no ``tokenizer.model``;
- a repo id (``org/name``) whose snapshot sits in the Hugging Face hub cache, laid out as
  huggingface_hub lays it out (``models--org--name/refs/main`` holding a commit hash,
  ``snapshots/<hash>/<file>`` symlinks into ``blobs/``), found offline by huggingface_hub;
- a model whose tokenizer_config.json carries its own ``chat_template`` (TinyLlama-Chat's).

The models are tiny random ones; the tokenizer is the reference test model.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("huggingface_hub")
pytest.importorskip("jinja2")

from huggingface_hub import constants  # noqa: E402

from llama_np.cli import generate as generate_cli  # noqa: E402
from llama_np.formats.locate import resolve_model_path  # noqa: E402
from llama_np.cli.main import main  # noqa: E402
from llama_np.config import LlamaConfig  # noqa: E402
from llama_np.errors import CheckpointError, TokenizerError  # noqa: E402
from llama_np.model import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402
from llama_np.text.tokenizer import LlamaTokenizer  # noqa: E402
from llama_np.text.tokenizer_fast import LlamaTokenizerFast  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_MODEL = REPO / "tests" / "data" / "tokenizer" / "tokenizer.model"
CHAT_ZEPHYR = REPO / "tests" / "data" / "tokenizer_fast" / "chat_zephyr"
PROMPT = "To be, or not to be"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5, **extra)


def with_tokenizer_json(directory: Path, chat_template=None, legacy=True) -> Path:
    """Give a model directory tokenizer.json and tokenizer_config.json, no tokenizer.model."""
    tokenizer = LlamaTokenizerFast(vocab_file=TOKENIZER_MODEL, padding_side="right",
                                   chat_template=chat_template, legacy=legacy)
    tokenizer.save_pretrained(directory)
    (directory / "tokenizer.model").unlink()
    return directory


@pytest.fixture(scope="module")
def json_lm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("json-lm")
    LlamaForCausalLM.from_config(tiny_config(), seed=1).save_pretrained(directory)
    return with_tokenizer_json(directory)


@pytest.fixture(scope="module")
def model_lm_dir(json_lm_dir, tmp_path_factory) -> Path:
    """The same model with the sentencepiece tokenizer.model instead."""
    directory = tmp_path_factory.mktemp("model-lm")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (json_lm_dir / name).exists():
            shutil.copyfile(json_lm_dir / name, directory / name)
    shutil.copyfile(TOKENIZER_MODEL, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def json_classifier_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("json-classifier")
    config = tiny_config(id2label={0: "comedy", 1: "history", 2: "tragedy"}, pad_token_id=0)
    LlamaForSequenceClassification.from_config(config, seed=2).save_pretrained(directory)
    return with_tokenizer_json(directory)


@pytest.fixture(scope="module")
def chat_lm_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("TinyLlama-1.1B-Chat-v1.0")
    LlamaForCausalLM.from_config(tiny_config(), seed=3).save_pretrained(directory)
    template = json.loads((CHAT_ZEPHYR / "tokenizer_config.json").read_text())["chat_template"]
    return with_tokenizer_json(directory, chat_template=template, legacy=False)  # as TinyLlama


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit=COMMIT, ref="main") -> Path:
    """Lay ``source``'s files out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, json_lm_dir, model_lm_dir, json_classifier_dir, chat_lm_dir):
    cache = tmp_path_factory.mktemp("hub")
    add_to_hub_cache(cache, "llama-np-test/tiny-lm", json_lm_dir)
    add_to_hub_cache(cache, "llama-np-test/tiny-lm", model_lm_dir, commit=OLD_COMMIT, ref="v0")
    add_to_hub_cache(cache, "llama-np-test/tiny-classifier", json_classifier_dir)
    add_to_hub_cache(cache, "TinyLlama/TinyLlama-1.1B-Chat-v1.0", chat_lm_dir)
    add_to_hub_cache(cache, "someone/tiny-shakespeare", json_lm_dir)
    return cache


@pytest.fixture
def in_hub_cache(hub_cache, monkeypatch):
    """Point huggingface_hub (already imported) at the test cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


class Lines(io.StringIO):
    def isatty(self):
        return False


# --------------------------------------------------------------------------------------------
# the Python API


def test_a_repo_id_resolves_to_its_snapshot_in_the_cache(in_hub_cache):
    snapshot = resolve_model_path("llama-np-test/tiny-lm")
    assert snapshot == in_hub_cache / "models--llama-np-test--tiny-lm" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_symlink()


def test_from_pretrained_by_repo_id_and_revision(in_hub_cache, json_lm_dir):
    model = LlamaForCausalLM.from_pretrained("llama-np-test/tiny-lm")
    tokenizer = LlamaTokenizer.from_pretrained("llama-np-test/tiny-lm")
    assert isinstance(tokenizer, LlamaTokenizerFast)  # the snapshot ships tokenizer.json only
    ids = np.array([tokenizer.encode(PROMPT)])
    local = LlamaForCausalLM.from_pretrained(json_lm_dir)
    np.testing.assert_array_equal(model(ids).logits, local(ids).logits)
    assert LlamaConfig.from_pretrained("llama-np-test/tiny-lm") == local.config

    old = LlamaTokenizer.from_pretrained("llama-np-test/tiny-lm", revision="v0")
    assert type(old) is LlamaTokenizer  # the v0 snapshot ships tokenizer.model
    assert old.encode(PROMPT) == tokenizer.encode(PROMPT)
    by_hash = LlamaForCausalLM.from_pretrained("llama-np-test/tiny-lm", revision=OLD_COMMIT)
    np.testing.assert_array_equal(by_hash(ids).logits, model(ids).logits)
    assert LlamaTokenizerFast.from_pretrained("llama-np-test/tiny-lm", revision="v0").encode(PROMPT) == old.encode(PROMPT)


def test_an_unknown_repo_id_names_the_cache_and_the_download_command(in_hub_cache):
    with pytest.raises(CheckpointError) as error:
        LlamaForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")
    message = str(error.value)
    assert str(in_hub_cache) in message
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in message
    assert "never downloads" in message
    with pytest.raises(TokenizerError, match="at revision 'nope'.*--revision nope"):
        LlamaTokenizer.from_pretrained("llama-np-test/tiny-lm", revision="nope")


def test_a_bundled_name_wins_only_without_a_slash(in_hub_cache):
    assert resolve_model_path("tiny-shakespeare").parent.name == "assets"
    assert resolve_model_path("someone/tiny-shakespeare").parent.name == "snapshots"


def test_a_local_directory_wins_over_the_cache(in_hub_cache, json_lm_dir, tmp_path, monkeypatch):
    local = tmp_path / "llama-np-test" / "tiny-lm"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("llama-np-test/tiny-lm") == Path("llama-np-test/tiny-lm")


def test_a_revision_is_refused_for_a_path_that_is_no_repo_id(json_lm_dir):
    with pytest.raises(CheckpointError, match="revision='main' is for a repo id"):
        resolve_model_path(str(json_lm_dir), revision="main")


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_the_cache_is_found_through_hf_hub_cache_or_hf_home(hub_cache, tmp_path, variable):
    if variable == "HF_HOME":
        home = tmp_path / "home"
        home.mkdir()
        (home / "hub").symlink_to(hub_cache)
        value = home
    else:
        value = hub_cache
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environment.update({variable: str(value), "HF_HUB_OFFLINE": "1"})
    code = ("from llama_np.formats.locate import resolve_model_path;"
            "print(resolve_model_path('llama-np-test/tiny-lm'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"snapshots/{COMMIT}")


def test_without_huggingface_hub_a_repo_id_names_the_extra():
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"
            "from llama_np.formats.locate import resolve_model_path\n"
            "try:\n    resolve_model_path('meta-llama/Llama-2-7b-hf')\n"
            "except Exception as error:\n    print(type(error).__name__, error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("CheckpointError")
    assert "pip install 'llama-np[hub]'" in result.stdout


def test_a_model_with_its_own_chat_template_formats_chats_with_it(chat_lm_dir):
    tokenizer = LlamaTokenizer.from_pretrained(chat_lm_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(messages) == tokenizer.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------
# every CLI verb


def model_names(request, json_lm_dir, chat_lm_dir):
    return {"json": str(json_lm_dir), "repo": "llama-np-test/tiny-lm", "chat": str(chat_lm_dir),
            "chat-repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}[request]


@pytest.mark.parametrize("source", ["json", "repo", "chat", "chat-repo"])
def test_every_language_model_verb_runs_on_each_kind_of_checkpoint(source, capsys, monkeypatch, in_hub_cache,
                                                                     json_lm_dir, model_lm_dir, chat_lm_dir,
                                                                     tmp_path):
    model = model_names(source, json_lm_dir, chat_lm_dir)
    status, out, err = run(capsys, "generate", PROMPT, "--model", model, "--greedy", "--max-new-tokens", 5)
    assert status == 0, err
    if source in ("json", "repo"):  # the same weights and ids as the tokenizer.model directory
        assert run(capsys, "generate", PROMPT, "--model", model_lm_dir, "--greedy",
                   "--max-new-tokens", 5)[1] == out
    reference = tmp_path / "reference.npz"
    status, out, err = run(capsys, "logits", PROMPT, "--model", model, "--out", reference)
    assert status == 0, err
    status, out, err = run(capsys, "compare", reference, "--model", model)
    assert status == 0 and "PASS" in out, out + err
    status, out, err = run(capsys, "inspect", "--model", model)
    assert status == 0, err
    status, out, err = run(capsys, "dump", PROMPT, "--model", model, "--out", tmp_path / "dump.npz")
    assert status == 0, err
    status, out, err = run(capsys, "attention", PROMPT, "--model", model, "--layer", 0,
                           "--out", tmp_path / "attention.png")
    assert status == 0, err
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    status, out, err = run(capsys, "perplexity", text, "--model", model, "--context", 16)
    assert status == 0, err
    monkeypatch.setattr(sys, "stdin", Lines("Good morrow.\n"))
    status, out, err = run(capsys, "chat", "--model", model, "--greedy", "--max-new-tokens", 3)
    assert status == 0, err
    assert ("no chat_template" in err) == (source in ("json", "repo"))


@pytest.mark.parametrize("source", ["json", "repo"])
def test_classify_runs_on_a_tokenizer_json_checkpoint_and_a_repo_id(source, capsys, in_hub_cache,
                                                                   json_classifier_dir):
    model = str(json_classifier_dir) if source == "json" else "llama-np-test/tiny-classifier"
    status, out, err = run(capsys, "classify", "All's well that ends well.", "--model", model)
    assert status == 0, err
    assert any(label in out for label in ("comedy", "history", "tragedy"))


def test_an_unknown_repo_id_on_the_command_line_is_one_line_naming_the_download(capsys, in_hub_cache):
    status, out, err = run(capsys, "generate", PROMPT, "--model", "meta-llama/Llama-2-7b-hf")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-np: error: ")
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in err


def test_chat_prompts_the_model_in_its_own_template(capsys, monkeypatch, chat_lm_dir):
    prompts = []

    def record(model, tokenizer, prompt_ids, settings, stats, **kwargs):
        prompts.append(prompt_ids)
        stats.update(new_tokens=0, seconds=0.0, first_token_seconds=0.0)
        return []

    monkeypatch.setattr(generate_cli, "stream_continuation", record)
    monkeypatch.setattr(generate_cli, "speed_report", lambda stats, prompt_length: "")
    monkeypatch.setattr(sys, "stdin", Lines("Who art thou?\nAnd thou?\n"))
    status, _, err = run(capsys, "chat", "--model", chat_lm_dir, "--system", "Speak in verse.")
    assert status == 0, err
    tokenizer = LlamaTokenizer.from_pretrained(chat_lm_dir)
    first = "<|system|>\nSpeak in verse.</s>\n<|user|>\nWho art thou?</s>\n<|assistant|>\n"
    second = first + "</s>\n<|user|>\nAnd thou?</s>\n<|assistant|>\n"  # the empty answer, then
    assert prompts == [tokenizer.encode(first, add_special_tokens=False),
                       tokenizer.encode(second, add_special_tokens=False)]
    assert "[INST]" not in tokenizer.decode(prompts[1])


def test_chat_on_a_model_without_a_template_warns_once(capsys, monkeypatch, json_lm_dir):
    monkeypatch.setattr(sys, "stdin", Lines("Hello\nAgain\n"))
    status, _, err = run(capsys, "chat", "--model", json_lm_dir, "--greedy", "--max-new-tokens", 2)
    assert status == 0, err
    assert err.count("llama-np: warning:") == 1
    assert "is not a Llama 2 chat model" in err


def test_chat_on_a_llama2_chat_model_without_a_template_does_not_warn(capsys, monkeypatch, json_lm_dir,
                                                                      tmp_path):
    directory = tmp_path / "Llama-2-7b-chat-hf"
    shutil.copytree(json_lm_dir, directory)
    monkeypatch.setattr(sys, "stdin", Lines("Hello\n"))
    status, _, err = run(capsys, "chat", "--model", directory, "--greedy", "--max-new-tokens", 2)
    assert status == 0, err
    assert "warning" not in err


def test_a_fifo_in_place_of_a_cache_ref_is_refused_not_waited_on(in_hub_cache, json_lm_dir):
    repo = "llama-np-test/fifo-ref"
    add_to_hub_cache(in_hub_cache, repo, json_lm_dir)
    ref = in_hub_cache / ("models--" + repo.replace("/", "--")) / "refs" / "main"
    ref.unlink()
    os.mkfifo(ref)
    with pytest.raises(CheckpointError, match=r"refs/main is not a regular file"):
        resolve_model_path(repo)


def test_a_snapshot_file_that_links_outside_the_cache_is_refused(in_hub_cache, json_lm_dir, tmp_path):
    repo = "llama-np-test/escaping-link"
    snapshot = add_to_hub_cache(in_hub_cache, repo, json_lm_dir)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((json_lm_dir / "config.json").read_text())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"config.json in the Hugging Face cache of .* leads to .*elsewhere.json, outside the cache"):
        resolve_model_path(repo)


def test_a_fifo_named_as_a_model_is_called_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(CheckpointError, match=r"model.gguf is a FIFO \(named pipe\); a model is named by"):
        resolve_model_path(tmp_path / "model.gguf")
