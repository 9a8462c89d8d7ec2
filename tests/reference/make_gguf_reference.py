"""Write small GGUF files from stored checkpoints, and what Transformers computes loading them.

GGUF is llama.cpp's file format. Each file here is written with llama.cpp's own Python package
(``gguf``, its ``GGUFWriter`` and ``gguf.quants.quantize``) the way llama.cpp's
``convert_hf_to_gguf.py`` writes a Llama model: the ``llama.*`` metadata, ``blk.N.*`` tensor
names, q_proj/k_proj rows permuted to Meta's interleaved RoPE layout (``permute`` below, k with
the key/value head count), 1-D tensors (norms) in F32, and a matrix whose rows are not a
multiple of the block size (32 numbers) kept in F16 (F32 in an F32 file), as the converter
falls back when ``quantize`` refuses a row.

    tests/data/gguf/<source>-<type>.gguf   one file per source and type:
        gqa_f32       tests/data/fixtures/gqa_f32 (GQA, 8 query heads on 2 key/value heads)
                      in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
        mqa_tied_f16  tests/data/fixtures/mqa_tied_f16 (one key/value head, tied embeddings:
                      no output.weight) in F32, F16, Q8_0, Q4_0
        tiny-shakespeare  the bundled model, with its tokenizer (tokenizer.ggml.*), in Q4_0
                      only, to keep the stored data small (3 MB); its ffn_down rows are 688
                      numbers, not a multiple of 32, so ffn_down stays F16
        kquants       a one-layer model (KQUANT_CONFIG) in Q4_K_M, Q5_K_M and Q6_K: gguf.quants
                      cannot quantise to the k-quants, so its matrices are random valid blocks
                      (random bytes, float16 scales set to small numbers), written in those types
                      the way llama-quantize mixes them (KQUANT_MIXES), not a quantised model
    tests/data/gguf/reference.npz   per file "<file stem>/logits": Transformers' float32 logits
        (2, 7, V) for "<source>/input_ids"; "<file stem>/generated": greedy generation of 8
        tokens from "<source>/prompt_ids"; for tiny-shakespeare, "tokenizer/<i>" the ids
        Transformers' tokenizer of the Q4_0 file gives TEXTS[i]
    tests/data/gguf/manifest.json   versions, date, files, what every array holds

Transformers loads a GGUF file with ``from_pretrained(directory, gguf_file=name)``: it
dequantises every tensor with ``gguf.quants.dequantize`` and permutes q/k back, so its logits
are those of the dequantised float model, computed in float32 (eager attention, one thread).

Run from the repository root in the virtualenv of requirements.txt plus gguf (CPU-only torch):

    pip install -r tests/reference/requirements.txt
    python tests/reference/make_gguf_reference.py
"""

import datetime
import importlib.metadata
import json
import os
import platform
import sys

import gguf
import numpy as np
import safetensors.numpy
import sentencepiece
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "gguf")
SOURCES = {
    "gqa_f32": (os.path.join(ROOT, "tests", "data", "fixtures", "gqa_f32"),
                ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]),
    "mqa_tied_f16": (os.path.join(ROOT, "tests", "data", "fixtures", "mqa_tied_f16"), ["F32", "F16", "Q8_0", "Q4_0"]),
    "tiny-shakespeare": (os.path.join(ROOT, "llama_np", "assets", "tiny-shakespeare"), ["Q4_0"]),
    "kquants": (None, ["Q4_K_M", "Q5_K_M", "Q6_K"]),
}
# The k-quant source: one layer with rows of 256 numbers (a k-quant super-block), GQA 4:2.
KQUANT_CONFIG = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 256,
                 "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0},
                 "bos_token_id": 1, "eos_token_id": 2}
# llama-quantize's mixes, as far as one layer shows them: attn_v, ffn_down and output in Q6_K.
KQUANT_MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
KQUANT_Q6_K_TENSORS = ("attn_v.weight", "ffn_down.weight", "output.weight")
# (byte offset of each float16 scale in a block, its range): values then stay within about ±0.1
KQUANT_SCALES = {"Q4_K": [(0, 5e-5), (2, 5e-4)], "Q5_K": [(0, 2.5e-5), (2, 5e-4)], "Q6_K": [(208, 1.2e-5)]}
TEXTS = ["Hello world", "ROMEO: But soft, what light through yonder window breaks?",
         "  two leading spaces, a tab\tand\nnew lines\n", "Café ünïcödé 你好 🙂", "<s> and </s> inside text", ""]
NEW_TOKENS = 8
MIN_GREEDY_GAP = 1e-3  # refused below: see tests/reference/README.md
LAYER_NAMES = {  # Hugging Face -> llama.cpp, inside model.layers.N. / blk.N.
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
# llama.cpp's llama_ftype of each file type (general.file_type)
LLAMA_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15,
               "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
# sentencepiece piece types -> llama.cpp token types (gguf.TokenType)
UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face rotate-half rows -> Meta's interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, _, index, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{index}.{LAYER_NAMES[module]}.{kind}"


def stored_tensor(array: np.ndarray, qtype: gguf.GGMLQuantizationType):
    """(data, type) as convert_hf_to_gguf stores a float32 tensor for the file type ``qtype``."""
    T = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == T.F32:
        return array.astype(np.float32), T.F32
    if qtype == T.F16:
        return array.astype(np.float16), T.F16
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size
        return array.astype(np.float16), T.F16


def add_tokenizer(writer: gguf.GGUFWriter, directory: str, config: dict) -> None:
    """tokenizer.ggml.* from the directory's sentencepiece model, as convert_hf_to_gguf's
    _set_vocab_sentencepiece writes them."""
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(i).encode("utf-8"))
        scores.append(processor.get_score(i))
        types.append(UNKNOWN if processor.is_unknown(i) else CONTROL if processor.is_control(i)
                     else UNUSED if processor.is_unused(i) else BYTE if processor.is_byte(i) else 1)
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(tokenizer_config.get("add_bos_token", True))
    writer.add_add_eos_token(tokenizer_config.get("add_eos_token", False))
    writer.add_add_space_prefix(True)


def random_kquant_blocks(shape: tuple, type_name: str, rng) -> np.ndarray:
    """Random valid blocks of a k-quant type for a (rows, columns) matrix, (rows, bytes) uint8:
    random packed integers and 6-bit scales, float16 super-block scales drawn in KQUANT_SCALES."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, columns = shape
    blocks = rng.integers(0, 256, size=(rows, columns // block_size, block_bytes), dtype=np.uint8)
    for offset, largest in KQUANT_SCALES[type_name]:
        scales = rng.uniform(0.2 * largest, largest, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def kquant_tensors(rng) -> dict:
    """The k-quant source's float tensors (Hugging Face names, shapes from KQUANT_CONFIG): only
    the norms' values are used; the matrices are replaced by random blocks when written."""
    c = KQUANT_CONFIG
    D, I, V, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in {
            "input_layernorm.weight": (D,), "self_attn.q_proj.weight": (H * hd, D),
            "self_attn.k_proj.weight": (KV * hd, D), "self_attn.v_proj.weight": (KV * hd, D),
            "self_attn.o_proj.weight": (D, H * hd), "post_attention_layernorm.weight": (D,),
            "mlp.gate_proj.weight": (I, D), "mlp.up_proj.weight": (I, D), "mlp.down_proj.weight": (D, I)}.items()})
    return {name: (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path: str, config: dict, tensors: dict, type_name: str, tokenizer_dir: str | None) -> None:
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(os.path.basename(path).rsplit("-", 1)[0])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(LLAMA_FTYPE[type_name])
    if tokenizer_dir is not None:
        add_tokenizer(writer, tokenizer_dir, config)
    rng = np.random.default_rng(1)
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = permute(array, H, H)
        elif name.endswith("k_proj.weight"):
            array = permute(array, H, KV)
        file_name = gguf_name(name)
        if type_name in KQUANT_MIXES and array.ndim == 2:
            stored_type = "Q6_K" if file_name.endswith(KQUANT_Q6_K_TENSORS) else KQUANT_MIXES[type_name]
            data, stored_type = random_kquant_blocks(array.shape, stored_type, rng), gguf.GGMLQuantizationType[stored_type]
        else:
            data, stored_type = stored_tensor(array, gguf.GGMLQuantizationType[KQUANT_MIXES.get(type_name, type_name)])
        writer.add_tensor(file_name, data, raw_dtype=stored_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_source(directory: str | None) -> tuple[dict, dict]:
    """(config.json as a dict, float32 tensors by Hugging Face name) of a source."""
    if directory is None:
        return KQUANT_CONFIG, kquant_tensors(np.random.default_rng(0))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
    return config, {name: array.astype(np.float32) for name, array in tensors.items()}


def transformers_outputs(directory: str, name: str, input_ids, prompt_ids) -> tuple:
    """Transformers loading ``directory/name`` with ``gguf_file=``: its float32 logits for
    ``input_ids``, its greedy ids after ``prompt_ids`` and the smallest top-1/top-2 logit gap of
    those steps (refused below MIN_GREEDY_GAP: the stored ids would hinge on float rounding)."""
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor(input_ids)).logits.numpy()
        result = model.generate(torch.tensor(prompt_ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    top_two = torch.stack(result.logits).topk(2, dim=-1).values
    gap = float((top_two[..., 0] - top_two[..., 1]).min())
    if gap < MIN_GREEDY_GAP:
        raise SystemExit(f"{name}: a greedy step's top-1/top-2 logit gap is {gap:.2e}; pick another prompt")
    return logits, result.sequences.numpy(), gap


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    arrays, files = {}, {}
    for source, (directory, types) in SOURCES.items():
        config, tensors = read_source(directory)
        vocab_size = config["vocab_size"]
        rng = np.random.default_rng(0)
        input_ids = rng.integers(3, vocab_size, size=(2, 7))
        prompt_ids = rng.integers(3, vocab_size, size=(1, 5))
        arrays[f"{source}/input_ids"] = input_ids
        arrays[f"{source}/prompt_ids"] = prompt_ids
        for type_name in types:
            name = f"{source}-{type_name}.gguf"
            write_gguf(os.path.join(OUT, name), config, tensors, type_name,
                       tokenizer_dir=directory if source == "tiny-shakespeare" else None)
            logits, generated, gap = transformers_outputs(OUT, name, input_ids, prompt_ids)
            stem = name[: -len(".gguf")]
            arrays[f"{stem}/logits"] = logits.astype(np.float32)
            arrays[f"{stem}/generated"] = generated
            files[name] = {"source": os.path.relpath(directory, ROOT) if directory else "KQUANT_CONFIG, random blocks",
                           "type": type_name, "smallest_greedy_gap": round(gap, 6),
                           "bytes": os.path.getsize(os.path.join(OUT, name))}
    tokenizer = AutoTokenizer.from_pretrained(OUT, gguf_file="tiny-shakespeare-Q4_0.gguf")
    for i, text in enumerate(TEXTS):
        arrays[f"tokenizer/{i}"] = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
    np.savez(os.path.join(OUT, "reference.npz"), **arrays)
    manifest = {
        "written_by": "tests/reference/make_gguf_reference.py",
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                     "numpy": np.__version__, "sentencepiece": sentencepiece.__version__},
        "files": files,
        "texts": TEXTS,
        "arrays": {
            "<source>/input_ids": "(2, 7) int64 token ids, seeded",
            "<source>/prompt_ids": "(1, 5) int64 token ids, seeded",
            "<file stem>/logits": "(2, 7, V) float32: Transformers' logits for <source>/input_ids, "
                                  "loading the file with gguf_file=, float32, eager attention",
            "<file stem>/generated": f"(1, 5 + {NEW_TOKENS}) int64: greedy generate from <source>/prompt_ids",
            "tokenizer/<i>": "int64 ids of Transformers' tokenizer of tiny-shakespeare-Q4_0.gguf for texts[i]",
        },
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(files, indent=1))


if __name__ == "__main__":
    sys.exit(main())
