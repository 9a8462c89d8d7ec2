"""K-quant GGUF files written by llama.cpp's llama-quantize (Q4_K_M, Q5_K_M, Q6_K) against
Transformers' ``gguf_file=`` loading of the same files.

tests/data/gguf_kquant/ holds llama-quantize's files of a small random Llama whose rows are
multiples of 256 numbers, the type llama-quantize chose for each tensor, and Transformers 5.23's
float32 logits and greedy ids for them (tests/reference/make_gguf_kquant_reference.py, its
manifest.json). Each file is checked kept (widened to float32 once) and streamed (its matrices
stay in their blocks and are decoded tile by tile).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from tolerance import FLOAT32_TOLERANCE, assert_close, assert_same_token_ids

from llama_np import LlamaForCausalLM
from llama_np.formats import gguf as gguf_format
from llama_np.weights import streaming
from llama_np.weights.codecs import CODECS

KQUANT_DATA = Path(__file__).resolve().parent / "data" / "gguf_kquant"
MANIFEST = json.loads((KQUANT_DATA / "manifest.json").read_text(encoding="utf-8"))
REFERENCE = np.load(KQUANT_DATA / "reference.npz")
FILES = sorted(MANIFEST["files"])
# What each file type must mix, by the types llama-quantize chose: the stored files have to show it.
EXPECTED_MATRIX_TYPES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}}


def test_the_stored_files_are_the_three_k_quant_mixes():
    assert sorted(entry["type"] for entry in MANIFEST["files"].values()) == ["Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.mark.parametrize("name", FILES)
def test_the_reader_reports_the_tensor_types_llama_quantize_chose(name):
    entry = MANIFEST["files"][name]
    _, checkpoint = gguf_format.open_gguf_checkpoint(KQUANT_DATA / name)
    ours = {tensor.gguf_name: tensor.dtype for tensor in checkpoint.tensors.values()}
    assert ours == entry["tensor_types"]
    matrix_types = {t for gguf_name, t in ours.items() if t != "F32"}
    print(f"{name}: {entry['type_counts']}")
    assert matrix_types == EXPECTED_MATRIX_TYPES[entry["type"]]
    assert {t for gguf_name, t in ours.items() if gguf_name.endswith("norm.weight")} == {"F32"}


@pytest.mark.parametrize("keep_widened", [True, False], ids=["kept", "streamed"])
@pytest.mark.parametrize("name", FILES)
def test_logits_and_greedy_ids_match_transformers_loading_the_llama_quantize_file(name, keep_widened):
    stem = name[: -len(".gguf")]
    model = LlamaForCausalLM.from_pretrained(KQUANT_DATA / name, keep_widened=keep_widened)
    if not keep_widened:  # the matrices really are streamed from their blocks, in the file's types
        for gguf_name, stored_type in MANIFEST["files"][name]["tensor_types"].items():
            if stored_type == "F32" or gguf_name == "token_embd.weight":
                continue
            hf_name = gguf_format.hf_name(gguf_name)
            matrix = model.weights[hf_name]
            assert isinstance(matrix, streaming.StreamedMatrix), hf_name
            assert matrix.storage_dtype == stored_type
            assert matrix.stored.nbytes == CODECS[stored_type].nbytes(matrix.shape)
    largest = assert_close(model(REFERENCE["input_ids"]).logits, REFERENCE[f"{stem}/logits"],
                           f"{name} logits", FLOAT32_TOLERANCE)
    print(f"{name}: largest scaled deviation {largest:.2e}")
    generated = model.generate(REFERENCE["prompt_ids"], max_new_tokens=8)
    assert_same_token_ids(generated, REFERENCE[f"{stem}/generated"], f"{name} greedy ids")
