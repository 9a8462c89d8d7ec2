"""LlamaConfig: both config.json spellings, defaults, round trips, and ConfigError on bad fields."""

import json

import pytest

from llama_np import ConfigError, LlamaConfig

LLAMA2_7B_4X = {  # the config.json of a Llama 2 7B checkpoint (4.x spelling)
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
    "use_cache": True, "vocab_size": 32000,
}


def small(**overrides):
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    fields.update(overrides)
    return fields


def test_llama2_7b_config_in_4x_spelling_reads_every_field():
    config = LlamaConfig.from_dict(LLAMA2_7B_4X)
    assert (config.hidden_size, config.head_dim, config.num_key_value_groups) == (4096, 128, 1)
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.torch_dtype == "float16"
    assert config.architectures == ["LlamaForCausalLM"]  # unknown fields are kept


def test_5x_spelling_and_4x_spelling_give_the_same_config():
    four = LlamaConfig.from_dict(small(rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, torch_dtype="bfloat16"))
    five = LlamaConfig.from_dict(small(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, dtype="bfloat16"))
    assert four == five
    assert five.rope_theta == 500000.0 and five.rope_scaling["rope_type"] == "llama3"


def test_defaults_match_transformers():
    config = LlamaConfig()
    assert config.rms_norm_eps == 1e-6  # Llama 2 checkpoints say 1e-5: always read it
    assert config.num_key_value_heads == config.num_attention_heads == 32
    assert (config.vocab_size, config.max_position_embeddings, config.num_labels) == (32000, 2048, 2)
    assert config.pad_token_id is None and (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_to_dict_round_trips_through_json(tmp_path):
    config = LlamaConfig.from_dict(small(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                         id2label={"0": "comedy", "1": "history", "2": "tragedy"}))
    config.save_pretrained(tmp_path)
    again = LlamaConfig.from_pretrained(tmp_path)
    assert again == config
    assert again.num_labels == 3 and again.label2id["tragedy"] == 2
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written


def test_explicit_head_dim_may_differ_from_hidden_over_heads():
    config = LlamaConfig.from_dict(small(hidden_size=30, head_dim=16, num_attention_heads=4))
    assert config.head_dim == 16


def test_yarn_original_max_positions_defaults_to_max_position_embeddings():
    config = LlamaConfig.from_dict(small(max_position_embeddings=128,
                                         rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert config.rope_parameters["original_max_position_embeddings"] == 128


@pytest.mark.parametrize("overrides, field", [
    (dict(num_attention_heads=5), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-3), "vocab_size"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rope_scaling={"rope_type": "su", "factor": 2.0}), "'su'"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_scaling="linear"), "rope_scaling"),
    (dict(eos_token_id="</s>"), "eos_token_id"),
    (dict(problem_type="ranking"), "problem_type"),
    # A string or number where JSON true/false belongs: "false" would switch the feature on.
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(attention_bias=1), "attention_bias must be true or false"),
    (dict(mlp_bias=None), "mlp_bias must be true or false"),
    # pretraining_tp slices: 64 % 3 would silently drop vocabulary rows from the logits.
    (dict(pretraining_tp=3), r"pretraining_tp=3 must divide.*hidden_size = 32"),
    (dict(pretraining_tp=2, vocab_size=63), r"pretraining_tp=2 must divide.*vocab_size = 63"),
    (dict(pretraining_tp=10**30), "pretraining_tp=1000000000000000000000000000000 must divide"),
    (dict(rms_norm_eps=1e308), "rms_norm_eps must be a positive number below float32's maximum"),
    (dict(pad_token_id=64), r"pad_token_id=64 is outside the vocabulary \[0, vocab_size=64\)"),
    (dict(rope_scaling={"rope_type": ["linear"], "factor": 2.0}), r"rope type \['linear'\]"),
    (dict(rope_parameters={"rope_type": {}, "rope_theta": 1e4}), "rope type {}"),
    (dict(rope_theta=1.0), "rope_theta must be a number above 1"),
    (dict(rope_theta=1e-300), "rope_theta must be a number above 1"),
    (dict(rope_theta=1e308), "rope_theta must be a number above 1 and below float32's maximum"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 1e300}), "factor must be a positive number"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 0.5}), "factor must be >= 1"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}), "beta_fast"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_slow": "8"}), "beta_slow"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": []}), "attention_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": float("nan")}), "mscale"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "truncate": "no"}), "truncate"),
    # Each a valid number alone, absurd together: the attention factor of 1.2e29 gave NaN logits.
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1e30, "mscale_all_dim": 1.0}),
     r"mscale=1e\+30 and mscale_all_dim=1.0 \(factor=4.0\) gives an attention factor of 1.218e\+29"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1e30}),
     "mscale=1.0 and mscale_all_dim=1e\\+30"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": 1e6}),
     r"attention_factor=1000000.0 gives an attention factor of 1e\+06, outside \[0.01, 100.0\]"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": 1e-30}),
     "attention_factor=1e-30"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 1e-300,
                        "original_max_position_embeddings": 1e30}),
     r"RoPE settings \(.*beta_fast=1e-300.*\) cannot be computed"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 1e-300, "truncate": False,
                        "original_max_position_embeddings": 1e30}),
     r"RoPE settings \(.*beta_fast=1e-300.*\) give frequencies that are not finite"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, head_dim=2),
     "dynamic RoPE needs head_dim > 2"),
])
def test_bad_field_raises_config_error_naming_it(overrides, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_dict(small(**overrides))


def test_yarn_optional_fields_may_be_null_or_positive():
    config = LlamaConfig.from_dict(small(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "beta_fast": None, "beta_slow": 2.0, "attention_factor": 1.2,
        "mscale": None, "mscale_all_dim": None, "truncate": False}))
    assert config.rope_parameters["beta_slow"] == 2.0 and config.rope_parameters["truncate"] is False


def test_yarn_with_deepseek_style_mscale_settings_is_accepted():
    config = LlamaConfig.from_dict(small(rope_scaling={
        "rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096}))
    assert config.rope_parameters["mscale"] == 0.707


def test_config_json_nested_thousands_deep_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON.*recursion"):
        LlamaConfig.from_pretrained(tmp_path)


def test_unreadable_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        LlamaConfig.from_pretrained(tmp_path)
