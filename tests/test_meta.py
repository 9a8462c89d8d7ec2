"""Meta's original layout run as it is: params.json -> LlamaConfig, shards joined on use.

The reference is tests/data/meta/ (tests/reference/make_meta_reference.py): Meta-format
checkpoints written by torch.save in bfloat16, Transformers 4.45.2's conversion of each, and the
converted model's logits.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaConfig, LlamaForCausalLM
from llama_np.cli.main import main
from llama_np.errors import CheckpointError, ConfigError
from llama_np.formats.meta import compute_intermediate_size, meta_config, open_meta_checkpoint, read_params
from llama_np.formats.model_files import open_model_files
from llama_np.formats.torch_pickle import read_torch_file
from tolerance import assert_close_to_reference
from torch_files import Tensor, write_torch_file

META = Path(__file__).resolve().parent / "data" / "meta"
CASES = ("mha_1shard", "mha_2shards", "gqa_2shards")
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "rope_theta",
                 "rope_parameters", "max_position_embeddings", "bos_token_id", "eos_token_id",
                 "tie_word_embeddings", "torch_dtype")


def copy_case(case, target: Path, shards=None) -> Path:
    """A copy of a stored Meta directory, optionally with only some of its shard files."""
    shutil.copytree(META / case, target)
    if shards is not None:
        for path in target.glob("consolidated.*.pth"):
            if path.name not in shards:
                path.unlink()
    return target


def rewrite_shard(source: Path, target: Path, edit) -> None:
    """Write a shard's tensors again, each through edit(name, float32 values) -> values."""
    tensors = {}
    for name, stored in read_torch_file(source).items():
        values = edit(name, stored.numpy())
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")  # exact for bf16 values
        tensors[name] = Tensor("BF16", stored.shape, bits.tobytes())
    write_torch_file(target, tensors)


# --------------------------------------------------------------------------------------------
# params.json -> config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_config_equals_the_one_transformers_converter_writes(case):
    ours, _ = open_meta_checkpoint(META / case)
    theirs = LlamaConfig.from_pretrained(META / f"{case}-hf")
    for name in CONFIG_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("dim, multiplier, multiple_of, expected", [
    (4096, 1, 256, 11008),   # Llama 2 7B
    (5120, 1, 256, 13824),   # Llama 2 13B
    (8192, 1.3, 4096, 28672),  # Llama 2 70B
    (8192, 1, 256, 22016),   # Code Llama 34B
    (32, 0.8, 24, 72),       # the gqa_2shards case: int(0.8 * 85) = 68, rounded up to 72
])
def test_intermediate_size_is_computed_as_meta_and_transformers_do(dim, multiplier, multiple_of, expected):
    assert compute_intermediate_size(dim, multiplier, multiple_of) == expected


def test_max_positions_follow_the_llama_version_and_rope_theta(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 1, "norm_eps": 1e-6}))
    params = read_params(path)
    assert meta_config(params, 10, "1").max_position_embeddings == 2048
    assert meta_config(params, 10, "2").max_position_embeddings == 4096
    path.write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 1, "norm_eps": 1e-5, "rope_theta": 1e6}))
    assert meta_config(read_params(path), 10, "2").max_position_embeddings == 16384
    with pytest.raises(ConfigError, match="llama_version"):
        meta_config(params, 10, "3")


GOOD = {"dim": 64, "n_heads": 4, "n_layers": 1, "norm_eps": 1e-5, "vocab_size": -1}


@pytest.mark.parametrize("edit, expected", [
    ({"dim": None}, "'dim' is missing"),
    ({"n_layers": 0}, "n_layers must be a positive integer, got 0"),
    ({"n_heads": "32"}, "n_heads must be a positive integer"),
    ({"n_heads": 5}, "n_heads=5 does not divide dim=64"),
    ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer, got 0"),
    ({"norm_eps": None}, "'norm_eps' is missing"),
    ({"norm_eps": -1}, "norm_eps must be a positive number"),
    ({"ffn_dim_multiplier": float("nan")}, "ffn_dim_multiplier must be a positive number"),
    ({"multiple_of": 2.5}, "multiple_of must be a positive integer"),
    ({"vocab_size": -2}, "vocab_size must be -1"),
    ({"vocab_size": 128256, "rope_theta": 500000.0}, "Llama 3"),
])
def test_a_bad_params_field_is_a_config_error_naming_it(tmp_path, edit, expected):
    params = {key: value for key, value in {**GOOD, **edit}.items() if value is not None}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=expected) as error:
        read_params(tmp_path / "params.json")
    assert "params.json" in str(error.value)


def test_params_that_are_not_json_name_the_file(tmp_path):
    (tmp_path / "params.json").write_text("{dim: 4096")
    with pytest.raises(ConfigError, match="params.json is not valid JSON"):
        read_params(tmp_path / "params.json")


def test_unknown_params_fields_are_one_warning(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({**GOOD, "max_seq_len": 2048, "flash": True}))
    with pytest.warns(UserWarning, match="flash"):
        read_params(tmp_path / "params.json")


def test_vocab_size_minus_one_without_a_tokenizer_says_where_to_find_it(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "llama-2-7b")
    (directory / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="vocab_size -1.*no tokenizer.model.*folder above"):
        LlamaForCausalLM.from_pretrained(directory)


def test_a_given_vocab_size_must_match_the_embedding(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "m")
    (directory / "params.json").write_text(json.dumps(
        {**json.loads((directory / "params.json").read_text()), "vocab_size": 100}))
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight .*\(100, 32\)"):
        LlamaForCausalLM.from_pretrained(directory)


# --------------------------------------------------------------------------------------------
# Running the Meta directory as it is
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_logits_of_the_meta_directory_equal_transformers_conversion(case):
    model = LlamaForCausalLM.from_pretrained(META / case)
    reference = np.load(META / f"{case}-hf" / "reference.npz")
    assert_close_to_reference(model(reference["input_ids"]).logits, reference["logits"],
                              f"{case}: logits run from Meta's layout")


@pytest.mark.parametrize("case", CASES)
def test_every_joined_tensor_equals_transformers_converted_tensor(case):
    _, ours = open_meta_checkpoint(META / case)
    _, theirs = open_model_files(META / f"{case}-hf")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == "BF16", name
        np.testing.assert_array_equal(ours[name].stored(), theirs[name].stored(), err_msg=name)


def test_an_unpermuted_tensor_of_one_shard_is_the_mapping_itself():
    _, checkpoint = open_meta_checkpoint(META / "mha_1shard")
    v_proj = checkpoint["model.layers.0.self_attn.v_proj.weight"].stored()
    q_proj = checkpoint["model.layers.0.self_attn.q_proj.weight"].stored()
    assert not v_proj.flags.owndata and not v_proj.flags.writeable  # a view of the file
    assert q_proj.flags.writeable  # permuted: a new array, made on use


def test_inspect_names_the_layout_it_found(capsys):
    assert main(["inspect", "--model", str(META / "gqa_2shards")]) == 0
    out = capsys.readouterr().out
    assert "layout           Meta (params.json and 2 consolidated.NN.pth shards" in out
    assert "2 key/value" in out
    assert main(["inspect", "--model", str(META / "mha_1shard-hf-bin")]) == 0
    assert "pytorch_model" in capsys.readouterr().out


def test_every_cli_verb_takes_a_meta_directory(capsys):
    assert main(["logits", "Meta", "--model", str(META / "mha_2shards"), "--top", "2"]) == 0
    assert "top 2 of 96" in capsys.readouterr().out
    assert main(["generate", "The", "--model", str(META / "mha_2shards"), "--max-new-tokens", "3",
                 "--greedy"]) == 0


def test_rope_freqs_is_ignored_and_an_unknown_tensor_warned_about(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rope.freqs is in every stored shard: no warning
        open_meta_checkpoint(directory)
    shard = directory / "consolidated.00.pth"
    tensors = {name: Tensor(t.dtype, t.shape, t.stored().tobytes()) for name, t in read_torch_file(shard).items()}
    tensors["layers.0.attention.extra"] = Tensor("BF16", (2,), bytes(4))
    write_torch_file(shard, tensors)
    with pytest.warns(UserWarning, match="layers.0.attention.extra"):
        open_meta_checkpoint(directory)


# --------------------------------------------------------------------------------------------
# Shards that do not fit together
# --------------------------------------------------------------------------------------------


def test_a_missing_shard_is_named_with_the_count_the_sizes_need(tmp_path):
    directory = copy_case("mha_2shards", tmp_path / "llama-2-13b", shards={"consolidated.00.pth"})
    with pytest.raises(CheckpointError) as error:
        LlamaForCausalLM.from_pretrained(directory)
    message = str(error.value)
    assert "tok_embeddings.weight" in message or "wq" in message, message
    assert "need 2 consolidated.NN.pth files, the directory holds 1" in message, message


def test_a_gap_in_the_shard_numbers_is_named(tmp_path):
    directory = copy_case("mha_2shards", tmp_path / "m")
    (directory / "consolidated.01.pth").rename(directory / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="lacks consolidated.01.pth"):
        open_meta_checkpoint(directory)


def test_shards_of_two_different_models_are_refused(tmp_path):
    directory = copy_case("mha_2shards", tmp_path / "m")
    shutil.copy(META / "gqa_2shards" / "consolidated.01.pth", directory / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="params.json implies|shapes"):
        open_meta_checkpoint(directory)


def test_an_extra_shard_is_refused(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "m")
    shutil.copy(directory / "consolidated.00.pth", directory / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="need 1 consolidated.NN.pth files, the directory holds 2"):
        open_meta_checkpoint(directory)


def test_replicated_norms_that_differ_between_shards_are_refused_on_use(tmp_path):
    directory = copy_case("mha_2shards", tmp_path / "m")
    rewrite_shard(META / "mha_2shards" / "consolidated.01.pth", directory / "consolidated.01.pth",
                  lambda name, values: values * 2 if name == "norm.weight" else values)
    model = LlamaForCausalLM.from_pretrained(directory)
    with pytest.raises(CheckpointError, match="norm.weight differs between consolidated.00.pth and consolidated.01.pth"):
        model(np.array([[1, 2, 3]]))


@pytest.mark.parametrize("n_layers", [1, 3, 10**9])
def test_a_layer_count_the_shards_do_not_hold_is_refused_at_once(tmp_path, n_layers):
    directory = copy_case("mha_1shard", tmp_path / "m")
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "n_layers": n_layers}))
    with pytest.raises(CheckpointError, match=f"n_layers={n_layers}, but .* holds 2 layers"):
        open_meta_checkpoint(directory)


def test_shard_files_without_params_are_named(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "m")
    (directory / "params.json").unlink()
    with pytest.raises(CheckpointError, match="no params.json"):
        LlamaForCausalLM.from_pretrained(directory)


def test_params_without_shards_are_named(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "m")
    (directory / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth"):
        LlamaForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("edit, expected", [
    ({"dim": 10**400}, "dim must be at most 2,147,483,647, got an integer of 401 digits"),
    ({"ffn_dim_multiplier": 1e308}, r"ffn_dim_multiplier must be at most 64, got 1e\+308"),
    ({"multiple_of": 2**70}, "multiple_of must be at most"),
    ({"rope_theta": 1e300}, r"rope_theta must be at most 1e\+30"),
])
def test_params_too_large_for_any_llama_are_a_config_error_not_an_overflow(tmp_path, edit, expected):
    params = {**GOOD, **edit}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=expected):
        read_params(tmp_path / "params.json")


def test_inspect_of_a_meta_checkpoint_with_an_overflowing_ffn_multiplier_is_one_error_line(tmp_path, capsys):
    from llama_np.cli.main import main

    directory = copy_case("mha_1shard", tmp_path / "m")
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "ffn_dim_multiplier": 1e308}))
    for verb in (["inspect", "--model", str(directory)], ["generate", "x", "--model", str(directory)],
                 ["convert", str(directory), str(tmp_path / "out")]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert err.startswith("llama-np: error:") and "ffn_dim_multiplier must be at most 64" in err, err


def test_two_shards_that_are_byte_copies_are_warned_about(tmp_path):
    import shutil

    directory = copy_case("gqa_2shards", tmp_path / "m")
    shutil.copy(directory / "consolidated.00.pth", directory / "consolidated.01.pth")
    with pytest.warns(UserWarning, match="consolidated.01.pth and consolidated.00.pth hold the same bytes"):
        open_meta_checkpoint(directory)
