"""apply_chat_template with a checkpoint's own Jinja chat_template, against Transformers 4.45.2.

``tests/data/tokenizer_fast/chat_llama2/`` carries the chat_template of Llama-2-7b-chat-hf's
tokenizer_config.json and ``chat_zephyr/`` that of TinyLlama-1.1B-Chat-v1.0 (Zephyr's format);
``chat.json`` holds what Transformers' slow and fast tokenizers render and encode for a few
conversations (``tests/reference/make_fast_tokenizer_reference.py``).
"""

import json
import shutil
from pathlib import Path

import pytest

from llama_np.errors import TokenizerError
from llama_np.text.tokenizer import LlamaTokenizer

pytest.importorskip("jinja2")

DATA = Path(__file__).parent / "data" / "tokenizer_fast"
CHAT = json.loads((DATA / "chat.json").read_text(encoding="utf-8"))
CASES = [(name, kind) for name in ("chat_llama2", "chat_zephyr") for kind in ("slow", "fast")]


def load(name, kind):
    if kind == "fast":
        pytest.importorskip("tokenizers")
        from llama_np.text.tokenizer_fast import LlamaTokenizerFast

        return LlamaTokenizerFast.from_pretrained(DATA / name)
    return LlamaTokenizer.from_pretrained(DATA / name)


@pytest.mark.parametrize("name, kind", CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_text_and_ids_match_transformers(name, kind, add_generation_prompt):
    tokenizer = load(name, kind)
    for messages, expected in zip(CHAT["conversations"], CHAT[f"{name}_{kind}"]):
        expected = expected[f"generation_prompt_{str(add_generation_prompt).lower()}"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == expected["text"]
        assert ids == expected["ids"]


def test_the_zephyr_template_writes_its_own_markers_not_inst():
    text = CHAT["chat_zephyr_fast"][2]["generation_prompt_true"]["text"]
    assert text.startswith("<|user|>\n  Hello there  </s>\n<|assistant|>\nGood morrow.</s>\n")
    assert text.endswith("<|assistant|>\n") and "[INST]" not in text


def test_the_llama2_chat_template_equals_the_built_in_llama2_format(tmp_path):
    """The template of Llama-2-chat and llama_np's own Llama 2 format agree, text and ids."""
    with_template = load("chat_llama2", "slow")
    shutil.copyfile(DATA / "chat_llama2" / "tokenizer.model", tmp_path / "tokenizer.model")
    built_in = LlamaTokenizer.from_pretrained(tmp_path)
    assert built_in.chat_template is None
    for messages in CHAT["conversations"]:
        generation_prompt = messages[-1]["role"] == "user"
        assert (built_in.apply_chat_template(messages, add_generation_prompt=generation_prompt)
                == with_template.apply_chat_template(messages, add_generation_prompt=generation_prompt))


@pytest.mark.parametrize("kind", ["slow", "fast"])
def test_raise_exception_in_a_template_is_a_tokenizer_error(kind):
    assert CHAT[f"chat_llama2_{kind}_not_alternating"] == [{"error": "TemplateError"}]
    tokenizer = load("chat_llama2", kind)
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_template_that_is_not_jinja_is_a_tokenizer_error_with_its_line(tmp_path):
    tokenizer = load("chat_zephyr", "slow")
    tokenizer.chat_template = "{% for m in messages %}\n{{ m['content'] }"
    with pytest.raises(TokenizerError, match=r"not valid Jinja \(line 2\)"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_the_sandbox_refuses_what_a_template_must_not_do():
    tokenizer = load("chat_zephyr", "slow")
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TokenizerError, match="cannot render"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    tokenizer.chat_template = "{% set x = messages.append(1) %}"
    with pytest.raises(TokenizerError, match="cannot render"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_template_globals_and_generation_tag_as_in_transformers():
    tokenizer = load("chat_zephyr", "slow")
    tokenizer.chat_template = ("{{ bos_token }}{{ eos_token }}{{ unk_token }}{{ pad_token }}"
                               "{{ messages | tojson }}{% generation %}[{{ add_generation_prompt }}]"
                               "{% endgeneration %}{% for m in messages %}{% break %}{% endfor %}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "é<"}], tokenize=False)
    assert text == '<s></s><unk></s>[{"role": "user", "content": "é<"}][True]'


def test_messages_must_be_a_list_of_dicts():
    tokenizer = load("chat_zephyr", "slow")
    with pytest.raises(TokenizerError, match="non-empty list of"):
        tokenizer.apply_chat_template("hello")


def test_a_chat_template_list_uses_the_default_one_and_a_bad_value_is_named(tmp_path):
    config = json.loads((DATA / "chat_zephyr" / "tokenizer_config.json").read_text(encoding="utf-8"))
    shutil.copyfile(DATA / "chat_zephyr" / "tokenizer.model", tmp_path / "tokenizer.model")
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": "{{ 'default' }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert LlamaTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False) == "default"
    config["chat_template"] = 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template must be a Jinja"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_save_pretrained_keeps_the_chat_template(tmp_path):
    tokenizer = load("chat_zephyr", "slow")
    tokenizer.save_pretrained(tmp_path)
    assert LlamaTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


# A chat template comes with a downloaded tokenizer_config.json: whatever it does while it
# renders is one TokenizerError, in bounded time and memory.
HOSTILE_TEMPLATES = {
    "division by zero": ("{{ 1/0 }}", "ZeroDivisionError"),
    "include": ("{% include 'other.jinja' %}", "TypeError"),
    "extends": ("{% extends 'base.jinja' %}", "TypeError"),
    "import": ("{% import 'macros.jinja' as m %}", "TypeError"),
    "str + int": ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    "sort of an int": ("{{ 5|sort }}", "TypeError"),
    "sum of an int": ("{{ 5|sum }}", "TypeError"),
    "recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "range(10**12)": ("{{ range(10**12)|list }}", "passes 1000000000000"),
    "'a' * 10**10": ("{{ 'a' * 10**10 }}", "repeats a str"),
    "[1] * 10**8": ("{{ [1] * 10**8 }}", "repeats a list"),
    "center(10**10)": ("{{ 'a'|center(10**10) }}", "passes 10000000000"),
    "tojson(indent=10**10)": ("{{ messages|tojson(indent=10**10) }}", "passes 10000000000 to tojson"),
    "lipsum(10**6)": ("{{ lipsum(10**6) }}", "passes 1000000"),
    "2 ** 10**8": ("{{ 2 ** 100000000 }}", "to the power 100000000"),
    "a string doubled 40 times": ("{% set x = namespace(s='a') %}{% for i in range(40) %}"
                                  "{% set x.s = x.s ~ x.s %}{% endfor %}{{ x.s|length }}", "a variable holds"),
    "100 MB of output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "writes more than"),
}


@pytest.mark.parametrize("template, expected", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_hostile_chat_template_is_one_tokenizer_error(template, expected):
    from llama_np.text.chat import render_chat_template

    with pytest.raises(TokenizerError, match=r"the chat template \(tokenizer_config.json's chat_template\)") as error:
        render_chat_template(template, [{"role": "user", "content": "hi"}], True, {"bos_token": "<s>"})
    assert expected in str(error.value)


def test_a_chat_template_that_loops_for_ever_is_stopped_at_the_deadline(monkeypatch):
    from llama_np.text import chat

    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.2)
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TokenizerError, match="ran for more than 0.2 seconds"):
        chat.render_chat_template(nested, [{"role": "user", "content": "hi"}], True, {})


def test_a_hostile_chat_template_in_a_checkpoint_is_one_error_line_in_llama_np_chat(tmp_path, capsys, monkeypatch):
    import io
    import sys

    from llama_np.cli.main import main

    directory = tmp_path / "hostile-chat"
    shutil.copytree(DATA / "chat_llama2", directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ 1/0 }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert LlamaTokenizer.from_pretrained(directory).chat_template == "{{ 1/0 }}"
    with pytest.raises(TokenizerError, match="ZeroDivisionError"):
        LlamaTokenizer.from_pretrained(directory).apply_chat_template([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    # the bundled model's weights with the hostile tokenizer files beside them
    from llama_np.formats.locate import resolve_model_path

    for file in resolve_model_path("tiny-shakespeare").iterdir():
        if not (directory / file.name).exists():
            shutil.copy(file, directory / file.name)
    assert main(["chat", "--model", str(directory), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-np: error:") and "ZeroDivisionError" in err and "Traceback" not in err
