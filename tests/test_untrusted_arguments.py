"""Arguments of the wrong kind in the Python API are one LlamaNPError naming the argument, never
a raw TypeError, ValueError or OSError from deep inside (issue: tracebacks from untrusted fields)."""

import datetime
import os
from pathlib import Path

import numpy as np
import pytest

from llama_np import (CheckpointError, InputError, LlamaConfig, LlamaForCausalLM, LlamaNPError, LlamaTokenizer,
                      TokenizerError, convert_meta_checkpoint)

META = Path(__file__).parent / "data" / "meta" / "mha_1shard"


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_pretrained("tiny-shakespeare")


@pytest.fixture(scope="module")
def tokenizer():
    return LlamaTokenizer.from_pretrained("tiny-shakespeare")


@pytest.mark.parametrize("load", [LlamaForCausalLM.from_pretrained, LlamaTokenizer.from_pretrained,
                                  LlamaConfig.from_pretrained])
def test_a_path_with_a_nul_byte_is_an_error_naming_it(load):
    with pytest.raises(LlamaNPError, match="holds a NUL byte"):
        load("models/llama\0-2")


def test_batch_decode_and_convert_tokens_to_ids_of_an_int_are_tokenizer_errors(tokenizer):
    with pytest.raises(TokenizerError, match="batch_decode takes a"):
        tokenizer.batch_decode(5)
    with pytest.raises(TokenizerError, match="convert_tokens_to_ids takes a token"):
        tokenizer.convert_tokens_to_ids(5)


def test_text_given_as_input_ids_says_to_tokenize_it_first(model):
    with pytest.raises(InputError, match="tokenize it first"):
        model("ROMEO.")
    with pytest.raises(InputError, match="input_ids must be integers, got dtype object"):
        model([[datetime.timedelta(days=1)]])


def test_an_unknown_generate_argument_names_the_nearest_one(model):
    with pytest.raises(InputError, match="generate\\(\\) has no argument 'max_new_token'; did you mean max_new_tokens"):
        model.generate(np.array([[1, 2]]), max_new_token=3)


def test_generate_takes_transformers_max_length_counting_the_prompt(model):
    out = model.generate(np.array([[1, 2]]), max_length=5, do_sample=False)
    assert out.shape == (1, 5)
    np.testing.assert_array_equal(out, model.generate(np.array([[1, 2]]), max_new_tokens=3, do_sample=False))
    with pytest.raises(InputError, match="not both"):
        model.generate(np.array([[1, 2]]), max_length=5, max_new_tokens=3)


@pytest.mark.parametrize("shard_bytes", ["5GB", None, 0, 2.5])
def test_convert_with_a_bad_shard_size_is_an_input_error(tmp_path, shard_bytes):
    with pytest.raises(InputError, match="max_shard_bytes must be a positive number of bytes"):
        convert_meta_checkpoint(META, tmp_path / "out", max_shard_bytes=shard_bytes)
    assert not (tmp_path / "out").exists()


def test_convert_into_a_file_or_a_dangling_link_is_a_checkpoint_error(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, so .* cannot be made in it"):
        convert_meta_checkpoint(META, file / "out")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(CheckpointError, match="is a symbolic link to .*nowhere, which does not exist"):
        convert_meta_checkpoint(META, tmp_path / "dangling")
