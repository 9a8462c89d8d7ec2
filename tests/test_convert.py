"""llama-np convert / convert_meta_checkpoint: Meta's layout -> Hugging Face's, tensor by tensor.

Compared with what Transformers 4.45.2's convert_llama_weights_to_hf.py wrote for the same Meta
directories (tests/data/meta/, see tests/reference/make_meta_reference.py): every tensor equal
bit for bit, the same config values, and logits within the tolerance policy.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, convert_meta_checkpoint
from llama_np.formats.safetensors import Checkpoint
from llama_np.cli.main import main
from llama_np.errors import CheckpointError, InputError
from test_meta import CASES, CONFIG_FIELDS, META, copy_case, rewrite_shard
from tolerance import assert_close_to_reference

TESTS = Path(__file__).resolve().parent


def converted(tmp_path, case, **options) -> Path:
    out = tmp_path / f"{case}-converted"
    convert_meta_checkpoint(META / case, out, **options)
    return out


@pytest.mark.parametrize("case", CASES)
def test_conversion_equals_transformers_tensor_for_tensor(tmp_path, case):
    ours = Checkpoint.open(converted(tmp_path, case))
    theirs = Checkpoint.open(META / f"{case}-hf")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape), name
        np.testing.assert_array_equal(ours[name].stored(), theirs[name].stored(), err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_converted_config_has_transformers_values_in_the_4x_spelling(tmp_path, case):
    out = converted(tmp_path, case)
    ours, theirs = LlamaConfig.from_pretrained(out), LlamaConfig.from_pretrained(META / f"{case}-hf")
    for name in CONFIG_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == theirs.rope_theta and "rope_parameters" not in written
    assert written["architectures"] == ["LlamaForCausalLM"] and written["model_type"] == "llama"
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("case", CASES)
def test_converted_directory_gives_transformers_logits(tmp_path, case):
    model = LlamaForCausalLM.from_pretrained(converted(tmp_path, case))
    reference = np.load(META / f"{case}-hf" / "reference.npz")
    assert_close_to_reference(model(reference["input_ids"]).logits, reference["logits"],
                              f"{case}: logits of the converted directory")


def test_the_converted_tokenizer_encodes_as_the_meta_one(tmp_path):
    out = converted(tmp_path, "mha_1shard")
    text = "The embedding has one row for every piece."
    assert (LlamaTokenizer.from_pretrained(out).encode(text)
            == LlamaTokenizer.from_pretrained(META / "mha_1shard").encode(text)
            == LlamaTokenizer.from_pretrained(META / "mha_1shard-hf").encode(text))


def test_large_models_are_sharded_with_an_index(tmp_path):
    out = tmp_path / "sharded"
    result = convert_meta_checkpoint(META / "gqa_2shards", out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(result.weight_files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == result.bytes == Checkpoint.open(out).nbytes
    theirs = Checkpoint.open(META / "gqa_2shards-hf")
    ours = Checkpoint.open(out)
    for name in theirs:
        np.testing.assert_array_equal(ours[name].stored(), theirs[name].stored(), err_msg=name)


def test_float16_and_float32_outputs_hold_the_bfloat16_values(tmp_path):
    theirs = Checkpoint.open(META / "mha_2shards-hf")
    f16 = Checkpoint.open(converted(tmp_path, "mha_2shards", dtype="float16"))
    f32 = Checkpoint.open(converted(tmp_path / "b", "mha_2shards", dtype="float32"))
    assert f16.storage_dtypes == {"F16"} and f32.storage_dtypes == {"F32"}
    for name in theirs:
        values = theirs[name].numpy()
        np.testing.assert_array_equal(f32[name].numpy(), values, err_msg=name)  # exact widening
        np.testing.assert_array_equal(f16[name].stored(), values.astype(np.float16), err_msg=name)
    assert json.loads((tmp_path / "mha_2shards-converted" / "config.json").read_text())["torch_dtype"] == "float16"


def test_values_converted_in_small_chunks_are_the_same(tmp_path, monkeypatch):
    from llama_np.formats import convert

    whole = Checkpoint.open(converted(tmp_path / "whole", "gqa_2shards", dtype="float16"))
    monkeypatch.setattr(convert, "CHUNK_ELEMENTS", 100)  # many chunks per tensor, one partial
    chunked = Checkpoint.open(converted(tmp_path / "chunked", "gqa_2shards", dtype="float16"))
    for name in whole:
        np.testing.assert_array_equal(chunked[name].stored(), whole[name].stored(), err_msg=name)


def test_float16_refuses_a_weight_it_cannot_hold_by_name_and_leaves_nothing(tmp_path):
    directory = copy_case("mha_1shard", tmp_path / "meta")
    rewrite_shard(META / "mha_1shard" / "consolidated.00.pth", directory / "consolidated.00.pth",
                  lambda name, values: np.where(np.arange(values.size).reshape(values.shape) == 3, 1e5, values)
                  if name == "layers.1.feed_forward.w2.weight" else values)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as error:
        convert_meta_checkpoint(directory, out, dtype="float16", max_shard_bytes=10_000)
    message = str(error.value)
    assert "model.layers.1.mlp.down_proj.weight holds values too large for float16" in message
    assert "99840, beyond its largest 65504" in message  # 1e5 in bfloat16
    assert not out.exists()  # the shards written before the failure were removed
    convert_meta_checkpoint(directory, out)  # bfloat16 holds it
    assert Checkpoint.open(out)["model.layers.1.mlp.down_proj.weight"].numpy().max() > 65504


def test_an_existing_output_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is not empty"):
        convert_meta_checkpoint(META / "mha_1shard", out)
    assert (out / "config.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_meta_checkpoint(META / "mha_1shard", tmp_path / "file")


def test_a_bad_dtype_or_input_directory_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="dtype must be one of float32, float16, bfloat16"):
        convert_meta_checkpoint(META / "mha_1shard", tmp_path / "out", dtype="int8")
    with pytest.raises(CheckpointError, match="is not a Meta checkpoint directory"):
        convert_meta_checkpoint(META / "mha_1shard-hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_prints_one_summary_and_no_progress_off_a_terminal(tmp_path, capsys):
    status = main(["convert", str(META / "gqa_2shards"), str(tmp_path / "out"), "--dtype", "bfloat16"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.startswith("wrote 21 tensors (") and "BF16" in captured.out
    assert captured.err == ""
    assert main(["inspect", "--model", str(tmp_path / "out")]) == 0
    assert "Hugging Face (safetensors)" in capsys.readouterr().out


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    directory = copy_case("mha_2shards", tmp_path / "m", shards={"consolidated.00.pth"})
    assert main(["convert", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("llama-np: error: ")
    assert "the directory holds 1" in err


def test_cli_convert_help_shows_an_example(capsys):
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out and "llama-np convert " in out and "--dtype" in out


def test_progress_is_shown_when_asked(tmp_path, capsys):
    convert_meta_checkpoint(META / "mha_1shard", tmp_path / "out", progress=True)
    assert "converting:" in capsys.readouterr().err


MEASURE = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from llama_np.formats.convert import convert_meta_checkpoint
    from llama_np.formats.meta import open_meta_checkpoint
    meta_dir, out_dir, dtype = sys.argv[1], sys.argv[2], sys.argv[3] or None
    _, checkpoint = open_meta_checkpoint(meta_dir)  # imports and first reads: the baseline
    largest = max(t.nbytes for t in checkpoint.tensors.values())
    del checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    result = convert_meta_checkpoint(meta_dir, out_dir, dtype=dtype)
    peak = tracemalloc.get_traced_memory()[1]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"largest": largest, "total": result.bytes, "peak": peak, "rss_growth": after - before}))
""")


@pytest.mark.parametrize("dtype", ["", "float16"])
def test_peak_memory_of_a_conversion_is_a_few_tensors_not_the_model(tmp_path, dtype):
    """A 2-shard, 16-layer model of 27 MB: what the conversion allocates (tracemalloc, which
    NumPy reports to) stays within 8 of its largest stored tensors (joining, permuting and
    widening to float32 and back each need a copy), and the process's peak resident memory
    (ru_maxrss, which would count the mapped files' pages) grows by much less than the model."""
    from torch_files import write_random_meta_checkpoint

    params = {"dim": 256, "n_heads": 4, "n_layers": 16, "norm_eps": 1e-5, "multiple_of": 32,
              "vocab_size": 1000}
    write_random_meta_checkpoint(tmp_path / "meta", params, shards=2)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "meta"), str(tmp_path / "out"), dtype],
                         capture_output=True, text=True, check=True, cwd=TESTS)
    measured = json.loads(run.stdout)
    assert measured["total"] > 40 * measured["largest"]  # many tensors: the bound means something
    assert measured["peak"] < 8 * measured["largest"], measured
    assert measured["rss_growth"] < measured["total"] / 3, measured
    assert len(Checkpoint.open(tmp_path / "out")) == 3 + 9 * 16


def test_a_rerun_after_an_interrupted_conversion_names_the_leftover_and_what_to_do(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"x")
    (out / ".model-00001-of-00002.safetensors.ab12cd34.tmp").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=r"is not empty \(it holds .*tmp, tokenizer.model\); "
                                              r".*\.tmp is the temporary file of a conversion that did not finish"):
        convert_meta_checkpoint(META / "mha_1shard", out)
