"""Everything about a model that is not its forward pass: weights, loading, saving, resizing.

``model.py`` holds the maths of the three model classes; they inherit from
``LlamaPreTrainedModel`` here, which opens a checkpoint (``from_pretrained``), builds a random
model (``from_config``), writes one (``save_pretrained``), grows the vocabulary
(``resize_token_embeddings``) and decides how much widened (float32) weight to keep in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.config import LlamaConfig
from llama_np.errors import CheckpointError, InputError
from llama_np.formats.model_files import open_model_files
from llama_np.formats.safetensors import save_safetensors
from llama_np.generation import GenerationConfig
from llama_np.inputs import check_compute_dtype, is_integer
from llama_np.interp import hooks
from llama_np.training import lora
from llama_np.weights.memory import check_fits, keep_widened_limit, streamed_widened_budget
from llama_np.weights.store import Progress, Weights


# ---------------------------------------------------------------------------- tensor names


# The tensors of one decoder layer: field of model.LayerWeights -> name under model.layers.{i}.
LAYER_TENSOR_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


# The order in which Transformers' modules list one layer's parameters (self_attn, mlp, then the
# two norms), which named_parameters follows.
PARAMETER_ORDER = ("q_proj", "q_bias", "k_proj", "k_bias", "v_proj", "v_bias", "o_proj", "o_bias",
                   "gate_proj", "gate_bias", "up_proj", "up_bias", "down_proj", "down_bias",
                   "input_layernorm", "post_attention_layernorm")


def layer_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """The shape of every tensor of one decoder layer, by LAYER_TENSOR_NAMES field."""
    D, I, hd = config.hidden_size, config.intermediate_size, config.head_dim
    H, KV = config.num_attention_heads, config.num_key_value_heads
    shapes = {
        "input_layernorm": (D,), "q_proj": (H * hd, D), "k_proj": (KV * hd, D),
        "v_proj": (KV * hd, D), "o_proj": (D, H * hd), "post_attention_layernorm": (D,),
        "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I),
    }
    if config.attention_bias:
        shapes.update(q_bias=(H * hd,), k_bias=(KV * hd,), v_bias=(KV * hd,), o_bias=(D,))
    if config.mlp_bias:
        shapes.update(gate_bias=(I,), up_bias=(I,), down_bias=(D,))
    return shapes


def expected_base_shapes(config: LlamaConfig, prefix: str = "model.") -> dict[str, tuple]:
    """Every tensor of the Llama stack with the shape the config implies (docs/reference.md §2.4)."""
    D, V = config.hidden_size, config.vocab_size
    shapes = {f"{prefix}embed_tokens.weight": (V, D), f"{prefix}norm.weight": (D,)}
    per_layer = layer_shapes(config)
    for i in range(config.num_hidden_layers):
        for field_name, shape in per_layer.items():
            shapes[f"{prefix}layers.{i}.{LAYER_TENSOR_NAMES[field_name]}"] = shape
    return shapes


def parameter_count(config: LlamaConfig, head_rows: int) -> int:
    """How many numbers the model holds, from the config alone (no list of every tensor).

    ``head_rows`` is the head's output size: the vocabulary for an untied lm_head, num_labels for
    a classifier, 0 for the bare stack or tied embeddings.
    """
    per_layer = sum(int(np.prod(shape)) for shape in layer_shapes(config).values())
    D = config.hidden_size
    return config.num_hidden_layers * per_layer + (config.vocab_size + 1 + head_rows) * D


# ---------------------------------------------------------------------------- weights


# ---------------------------------------------------------------------------- loading and saving


class LlamaPreTrainedModel:
    """Loading, saving and the shared plumbing of the three model classes."""

    base_prefix = "model."  # where the Llama stack's tensors live in a checkpoint
    # What llama_np.interp.hooks asks of a model class: whether it has TransformerLens' unembedding
    # (an lm_head, hence unembed.hook_in/hook_out), and which output field is its result.
    has_lm_head = False
    main_output = "logits"
    prefix_optional = False  # LlamaModel: a checkpoint saved from the bare stack has no "model."

    def __init__(self, config: LlamaConfig, weights: Weights, generation_config=None):
        self.config = config
        self.weights = weights
        self.dtype = weights.dtype
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.name_or_path = None
        self.hook_options = hooks.HookOptions()  # TransformerLens' optional hook points, all off
        self.adapter: lora.LoraAdapter | None = None  # a LoRA adapter (add_adapter, load_adapter)

    # -- construction

    @classmethod
    def expected_shapes(cls, config: LlamaConfig, prefix: str = "model.") -> dict[str, tuple]:
        return expected_base_shapes(config, prefix)

    @classmethod
    def optional_tensors(cls, config: LlamaConfig) -> tuple:
        return ()

    @classmethod
    def head_rows(cls, config: LlamaConfig) -> int:
        """Output rows of the head's own weight (0 for none): see ``parameter_count``."""
        return 0

    def layer_tensor_names(self, index: int) -> dict[str, str]:
        """Decoder layer ``index``'s tensors: LayerWeights field -> checkpoint name."""
        return {field_name: f"{self.base_prefix}layers.{index}.{name}" for field_name, name in LAYER_TENSOR_NAMES.items()}

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=np.float32, keep_widened: bool | None = None,
                        revision: str | None = None, widened_budget: int | None = None,
                        progress: Progress | None = None, gguf_file: str | None = None):
        """Open a checkpoint directory or a bundled model by name. Memory-mapped and lazy.

        The directory may be in Hugging Face's layout (safetensors, or pickled
        ``pytorch_model*.bin`` read without running the pickle) or in Meta's original one
        (``params.json`` and ``consolidated.NN.pth``; see ``llama_np.formats.meta``). A GGUF
        file of llama.cpp is named by its path, or as in Transformers by its directory and
        ``gguf_file`` (``llama_np.formats.gguf``); its quantised matrices are decoded tile by
        tile where they are used when they are not kept widened.

        Only headers are read here; tensors are widened to ``dtype`` (float32 or float64) when
        first used. ``keep_widened`` keeps those widened copies; by default it is on when they
        fit in ``keep_widened_limit()`` (half the available memory, at least 2 GiB). Without it,
        float16/bfloat16 matrices are streamed from the file (``llama_np.weights.streaming``)
        except the first ``widened_budget`` bytes of them, which are kept widened: by default
        ``streamed_widened_budget`` when the model did not fit, 0 when ``keep_widened=False``.
        ``progress(index, count)`` is called as each decoder layer is about to run (the
        ``llama-np`` command passes a terminal bar that shows once a pass takes seconds).
        """
        dtype = check_compute_dtype(dtype)
        # config.json and the tensors' headers, in any layout: safetensors, pytorch_model*.bin, Meta's
        config, checkpoint = open_model_files(name_or_path, revision=revision, gguf_file=gguf_file)
        directory = checkpoint.directory
        prefix = cls.base_prefix
        if cls.prefix_optional and f"{prefix}embed_tokens.weight" not in checkpoint:
            prefix = ""
        _check_layer_count(config, checkpoint, prefix)
        expected = cls.expected_shapes(config, prefix)
        checkpoint.check_shapes(expected, optional=cls.optional_tensors(config))
        tensors = {name: checkpoint[name] for name in expected if name in checkpoint}
        if prefix != cls.base_prefix:
            tensors = {cls.base_prefix + name: t for name, t in tensors.items()}
        widened_bytes = sum(int(np.prod(t.shape)) for t in tensors.values()) * np.dtype(dtype).itemsize
        if widened_budget is None:
            fits = widened_bytes <= keep_widened_limit() if keep_widened is None else keep_widened
            widened_budget = 0 if fits or keep_widened is False else streamed_widened_budget(checkpoint.nbytes)
        if keep_widened is None:
            keep_widened = widened_bytes <= keep_widened_limit()
        generation_config = GenerationConfig.from_pretrained(directory, config)
        weights = Weights(tensors, dtype, keep_widened, widened_budget, checkpoint, progress)
        model = cls(config, weights, generation_config)
        model.name_or_path = str(name_or_path)
        model.checkpoint = checkpoint
        return model

    @classmethod
    def from_config(cls, config: LlamaConfig, seed: int = 0, dtype=np.float32):
        """A randomly initialised model, as Transformers initialises one.

        Linear weights ~ N(0, initializer_range²), norms = 1, biases = 0, and the embedding row
        of ``pad_token_id`` = 0 (the one place ``padding_idx`` matters, docs/reference.md §3.1).
        A config whose weights cannot fit in memory is refused before anything is allocated.
        """
        dtype = check_compute_dtype(dtype)
        parameters = parameter_count(config, cls.head_rows(config))
        check_fits(parameters * 4, f"from_config: this config's {parameters:,} parameters, in float32,",
                   f"Check vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                   f"num_hidden_layers={config.num_hidden_layers}, intermediate_size={config.intermediate_size}")
        rng = np.random.default_rng(seed)
        std = config.initializer_range
        tensors = {}
        for name, shape in cls.expected_shapes(config).items():
            if name.endswith("embed_tokens.weight"):
                tensors[name] = layers.init_embedding(*shape, config.pad_token_id, std, rng)
            elif name.endswith("norm.weight"):
                tensors[name] = np.ones(shape, np.float32)
            elif name.endswith(".bias"):
                tensors[name] = np.zeros(shape, np.float32)
            else:
                tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
        return cls(config, Weights(tensors, dtype))

    def save_pretrained(self, directory, storage_dtype=np.float32) -> None:
        """Write config.json and model.safetensors (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(value, dtype=storage_dtype)
                   for name, value in self.weights.items()}
        save_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        self.config.save_pretrained(directory)

    # -- the weights

    def num_parameters(self) -> int:
        return sum(int(np.prod(self.weights.shape(name))) for name in self.weights.tensors)

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        """(checkpoint name, array) for every trainable tensor, in the order Transformers lists them.

        Each array is the model's own weight in the compute dtype, writable: changing it in place
        (an optimizer's step) changes what the next forward pass computes. Tied embeddings appear
        once, as ``model.embed_tokens.weight``. A float16/bfloat16 checkpoint is widened here; a
        model that streams its weights from the file (``keep_widened=False``) cannot be trained.
        With a LoRA adapter enabled, the trainable parameters are the adapter's, named as in PEFT's
        file (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
        """
        if self.adapter is not None and self.adapter.enabled:
            return list(self.adapter.tensors.items())
        if not self.weights.keep_widened:
            raise InputError(
                f"{type(self).__name__} was loaded with keep_widened=False, so its weights are read "
                f"from the checkpoint file as they are used and cannot be changed; training needs "
                f"every weight widened and kept: load it with from_pretrained(..., keep_widened=True)")
        prefix, names = self.base_prefix, [f"{self.base_prefix}embed_tokens.weight"]
        for index in range(self.config.num_hidden_layers):
            layer = self.layer_tensor_names(index)
            names += [layer[field] for field in PARAMETER_ORDER if layer[field] in self.weights]
        names.append(f"{prefix}norm.weight")
        names += [name for name in self.weights.tensors if name not in names]  # the head's weight
        parameters = []
        for name in names:
            value = self.weights[name]
            if not (isinstance(value, np.ndarray) and value.flags.writeable and value.dtype == self.dtype):
                # a float32 file's tensor is a read-only view of its memory map: train a copy
                value = np.array(value, dtype=self.dtype)
            if self.weights.tensors[name] is not value:
                self.weights[name] = value  # the store now holds this very array, used as it is
            parameters.append((name, value))
        return parameters

    # -- LoRA adapters (llama_np/training/lora.py), with PEFT's semantics and files

    def add_adapter(self, config: lora.LoraConfig, seed: int = 0) -> None:
        """Put a new LoRA adapter on the config's target modules: A Kaiming-uniform, B zero, as PEFT."""
        self.adapter = lora.LoraAdapter.for_model(self, config, seed=seed)

    def load_adapter(self, directory) -> None:
        """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
        self.adapter = lora.load_adapter(self, directory)

    def save_adapter(self, directory) -> None:
        """Write the adapter as PEFT does, so that ``PeftModel.from_pretrained`` loads it."""
        if self.adapter is None:
            raise InputError("save_adapter: this model has no adapter (add_adapter or load_adapter first)")
        lora.save_adapter(self.adapter, directory, self.name_or_path)

    def merge_adapter(self) -> None:
        """Fold the adapter into the weights (W + scaling · B · A) and drop it: PEFT's merge_and_unload."""
        if self.adapter is None:
            raise InputError("merge_adapter: this model has no adapter")
        for name in self.adapter.targets:
            self.weights[name] = self.weights[name] + self.adapter.delta(name)
        for name, copy in self.adapter.saved.items():  # a weight the adapter trained in full replaces the base's
            self.weights[name] = self.adapter.tensors[copy].copy()
        self.adapter = None

    def disable_adapters(self) -> None:
        """Run (and train) the base model alone until ``enable_adapters``."""
        if self.adapter is not None:
            self.adapter.enabled = False

    def enable_adapters(self) -> None:
        if self.adapter is not None:
            self.adapter.enabled = True

    def resize_token_embeddings(self, new_num_tokens: int, pad_token_id: int | None = None) -> None:
        """Grow (or shrink) the vocabulary to ``new_num_tokens`` rows.

        New embedding (and lm_head) rows are the mean of the existing rows, so a freshly added
        token such as ``<pad>`` starts as an "average" token. ``config.vocab_size`` follows, and
        ``config.pad_token_id`` too when ``pad_token_id`` is given:

            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        """
        if not is_integer(new_num_tokens) or new_num_tokens <= 0:
            raise InputError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if pad_token_id is not None and not (is_integer(pad_token_id) and 0 <= pad_token_id < new_num_tokens):
            raise InputError(f"pad_token_id must be a token id in [0, {new_num_tokens}), got {pad_token_id!r}")
        for name in (f"{self.base_prefix}embed_tokens.weight", "lm_head.weight"):
            if name not in self.weights:
                continue
            old = np.asarray(self.weights[name], dtype=np.float32)
            if new_num_tokens <= old.shape[0]:
                new = old[:new_num_tokens].copy()
            else:
                extra = np.repeat(old.mean(axis=0, keepdims=True), new_num_tokens - old.shape[0], axis=0)
                new = np.concatenate([old, extra], axis=0)
            self.weights[name] = new
        self.config.vocab_size = int(new_num_tokens)
        if pad_token_id is not None:
            self.config.pad_token_id = int(pad_token_id)

    # -- interpretability (llama_np/interp/hooks.py)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Also compute each head's output in the residual stream, ``attn.hook_result`` (B, T, H, D).

        As in TransformerLens this costs memory (D numbers per head and position) and sums the
        heads one by one instead of in one o_proj product, so it is off by default.
        """
        self._set_hook_option("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the residual stream: ``hook_q_input`` (B, T, H, D),
        ``hook_k_input`` and ``hook_v_input`` (B, T, KV, D), each normed by ln1 on its own."""
        self._set_hook_option("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Add ``hook_mlp_in``, the residual stream as the MLP block reads it (B, T, D)."""
        self._set_hook_option("use_hook_mlp_in", use_hook_mlp_in)

    def _set_hook_option(self, name: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
        setattr(self.hook_options, name, value)

    def run_with_cache(self, input_ids, attention_mask=None, names_filter=None, **kwargs):
        """Run the model and record named activations; see ``llama_np.interp.hooks.run_with_cache``."""
        return hooks.run_with_cache(self, input_ids, attention_mask=attention_mask, names_filter=names_filter, **kwargs)

    def run_with_hooks(self, input_ids, fwd_hooks=(), attention_mask=None, **kwargs):
        """Run the model with hooks that may read or replace activations; see ``llama_np.interp.hooks``."""
        return hooks.run_with_hooks(self, input_ids, fwd_hooks=fwd_hooks, attention_mask=attention_mask, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.config!r}, dtype={self.dtype.name})"


def _check_layer_count(config: LlamaConfig, checkpoint, prefix: str) -> None:
    """Refuse a config with more layers than the checkpoint stores, before listing each tensor
    it would miss: a corrupt num_hidden_layers such as 10**30 would never finish that list."""
    layers_prefix = f"{prefix}layers."
    stored = {name[len(layers_prefix):].split(".")[0] for name in checkpoint
              if name.startswith(layers_prefix)}
    if config.num_hidden_layers > len(stored):
        raise CheckpointError(
            f"config.json has num_hidden_layers={config.num_hidden_layers}, but the checkpoint in "
            f"{checkpoint.directory} stores {len(stored)} layers ({layers_prefix}N.*)")
