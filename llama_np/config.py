"""LlamaConfig: read and validate a Hugging Face ``config.json`` for the Llama family.

Two spellings of the RoPE settings exist on disk (docs/reference.md §1.2) and both load:

- 4.x, used by every Llama 2 checkpoint: top-level ``rope_theta`` and ``rope_scaling``
  (``null`` or a dict whose type is under ``rope_type`` or the older ``type``), ``torch_dtype``;
- 5.x: one dict ``rope_parameters`` holding ``rope_theta``, ``rope_type`` and the scaling fields,
  and ``dtype``.

Internally both become one dict, ``config.rope_parameters``; ``config.rope_theta`` and
``config.rope_scaling`` read from it so code written for either spelling works. ``to_dict``
writes the 5.x spelling.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

from llama_np import layers
from llama_np.formats.files import atomic_write_text, is_file, read_json_object
from llama_np.formats.locate import resolve_model_path
from llama_np.errors import ConfigError
from llama_np.inputs import is_integer

# Defaults of Transformers' LlamaConfig when a key is absent (docs/reference.md §1.1).
DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None means "= num_attention_heads"
    "head_dim": None,  # None means "= hidden_size // num_attention_heads"
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "problem_type": None,
    "torch_dtype": None,
}

# The fields each RoPE type needs besides rope_theta (docs/reference.md §3.4).
ROPE_REQUIRED_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}

# Optional yarn fields: null (Transformers' default) or a positive number (docs/reference.md §3.4).
YARN_OPTIONAL_FIELDS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")

# The settings that switch a part of the model on or off; JSON true or false, nothing else.
BOOLEAN_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")

# Every number the model computes with passes through float32: a larger one becomes inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)

# yarn multiplies cos and sin by an attention factor (1.1 to 1.5 in published models), so the
# attention scores scale with its square. Outside these bounds attention is all but uniform
# (below) or one-hot and soon inf in float32 (above, e.g. 1e28 from mscale=1e30): NaN logits.
ATTENTION_FACTOR_RANGE = (1e-2, 1e2)

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

CONFIG_FILE = "config.json"


class LlamaConfig:
    """The hyper-parameters of a Llama model, with Transformers' field names.

    Read one with ``LlamaConfig.from_pretrained(directory_or_bundled_name)`` or
    ``LlamaConfig.from_dict(d)``; build one with keyword arguments
    (``LlamaConfig(hidden_size=64, num_attention_heads=4, ...)``). Fields not listed in
    ``DEFAULTS`` (``architectures``, ``transformers_version``, ...) are kept and written back.
    """

    def __init__(self, **fields):
        self.__dict__["_extra"] = {}
        values = dict(DEFAULTS)
        values.update(_normalise_spelling(fields))
        for name, value in values.items():
            if name in DEFAULTS or name in ("rope_parameters", "id2label", "num_labels"):
                self.__dict__[name] = value
            else:
                self._extra[name] = value
        if self.num_key_value_heads is None:
            self.__dict__["num_key_value_heads"] = self.num_attention_heads
        self._set_labels(values.get("id2label"), values.get("num_labels"))
        if self.head_dim is None and _is_positive_int(self.hidden_size) \
                and _is_positive_int(self.num_attention_heads):
            self.__dict__["head_dim"] = self.hidden_size // self.num_attention_heads
            self.__dict__["_head_dim_derived"] = True
        self.validate()

    # ----------------------------------------------------------------- reading and writing

    @classmethod
    def from_dict(cls, fields: dict) -> "LlamaConfig":
        """Build a config from the contents of a config.json."""
        if not isinstance(fields, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(fields).__name__}")
        return cls(**copy.deepcopy(fields))

    @classmethod
    def from_json_file(cls, path) -> "LlamaConfig":
        fields = read_json_object(path, ConfigError)
        try:
            return cls.from_dict(fields)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None) -> "LlamaConfig":
        """Read ``config.json`` from a checkpoint directory, a bundled model name or a repo id
        in the Hugging Face cache (at ``revision``)."""
        directory = resolve_model_path(name_or_path, revision=revision)
        path = directory / CONFIG_FILE
        if not is_file(path, ConfigError):
            raise ConfigError(f"{directory} has no {CONFIG_FILE}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict:
        """The config as a config.json dict, in the 5.x spelling (rope_parameters, dtype)."""
        out = dict(self._extra)
        for name in DEFAULTS:
            out[name] = copy.deepcopy(self.__dict__[name])
        if self.__dict__.get("_head_dim_derived"):
            out["head_dim"] = self.head_dim
        out["dtype"] = out.pop("torch_dtype")
        out["rope_parameters"] = dict(self.rope_parameters)
        out["num_labels"] = self.num_labels
        if self.id2label is not None:
            out["id2label"] = {str(i): label for i, label in self.id2label.items()}
            out["label2id"] = {label: i for i, label in self.id2label.items()}
        return out

    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` into ``directory`` (atomically: a temp file, then a rename)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    # ----------------------------------------------------------------- attribute access

    def __getattr__(self, name):
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"LlamaConfig has no field {name!r}")

    def __setattr__(self, name, value):
        if name == "num_labels":
            self._set_labels(None, value)
        elif name == "id2label":
            self._set_labels(value, None)
        elif name in DEFAULTS or name == "rope_parameters":
            self.__dict__[name] = value
            if name == "head_dim":
                self.__dict__["_head_dim_derived"] = False
        elif name in ("rope_theta", "rope_scaling"):
            self.__dict__["rope_parameters"] = _normalise_spelling(
                {"rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, name: value}
            )["rope_parameters"]
        else:
            self._extra[name] = value

    def __eq__(self, other):
        return isinstance(other, LlamaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        shown = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim")
        inner = ", ".join(f"{name}={getattr(self, name)}" for name in shown)
        return f"LlamaConfig({inner}, rope={self.rope_parameters})"

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def rope_scaling(self) -> dict | None:
        """The 4.x view: None for plain RoPE, else the scaling fields with their ``rope_type``."""
        if self.rope_parameters["rope_type"] == "default":
            return None
        return {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}

    @property
    def num_key_value_groups(self) -> int:
        """How many query heads share one key/value head (H / KV)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def label2id(self) -> dict | None:
        if self.id2label is None:
            return None
        return {label: i for i, label in self.id2label.items()}

    def _set_labels(self, id2label, num_labels):
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ConfigError(f"id2label must be a dict from class index to name, got {id2label!r}")
            try:
                id2label = {int(i): str(label) for i, label in id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"id2label keys must be integers, got {list(id2label)!r}") from None
            num_labels = len(id2label)
        elif num_labels is not None:
            if not _is_positive_int(num_labels):
                raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
        else:
            num_labels = 2
        self.__dict__["num_labels"] = num_labels
        self.__dict__["id2label"] = id2label

    # ----------------------------------------------------------------- validation

    def validate(self) -> None:
        """Raise ConfigError naming the field and value when the config cannot describe a Llama."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "pretraining_tp", "head_dim"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            self.__dict__[name] = int(value)  # np.int64(64) is welcome; config.json holds ints
        if self.__dict__.get("_head_dim_derived") and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size} (give head_dim explicitly to allow this)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self._validate_pretraining_tp()
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        for name in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_positive_number(self.rms_norm_eps):
            raise ConfigError(f"rms_norm_eps must be a positive number below float32's maximum, "
                              f"got {self.rms_norm_eps!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and 0 <= value):
                raise ConfigError(f"{name} must be a non-negative integer or null, got {value!r}")
            if value is not None:
                self.__dict__[name] = int(value)
        # Transformers refuses this too: the embedding has no row for such a pad token.
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"pad_token_id={self.pad_token_id} is outside the vocabulary "
                              f"[0, vocab_size={self.vocab_size})")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        if eos is not None and not all(is_integer(e) and e >= 0 for e in eos_list):
            raise ConfigError(f"eos_token_id must be an integer, a list of integers or null, got {eos!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}")
        self._validate_rope()

    def _validate_pretraining_tp(self):
        """pretraining_tp cuts weights into equal slices (layers.linear): each size it cuts
        must divide evenly, or rows would be dropped (the logits would lose vocabulary entries)."""
        tp = self.pretraining_tp
        sliced = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_attention_heads * head_dim": self.num_attention_heads * self.head_dim,
            "num_key_value_heads * head_dim": self.num_key_value_heads * self.head_dim,
        }
        uneven = [f"{name} = {size}" for name, size in sliced.items() if size % tp]
        if uneven:
            raise ConfigError(f"pretraining_tp={tp} must divide every size it slices; it does not "
                              f"divide {', '.join(uneven)}")

    def _validate_rope(self):
        rope = self.rope_parameters
        rope_type = rope.get("rope_type")
        if not isinstance(rope_type, str) or rope_type not in ROPE_REQUIRED_FIELDS:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; known types: {sorted(ROPE_REQUIRED_FIELDS)}"
            )
        # theta is the base of the wavelengths theta^(2i/hd): at or below 1 they do not grow.
        theta = rope.get("rope_theta")
        if not (_is_positive_number(theta) and theta > 1):
            raise ConfigError(f"rope_theta must be a number above 1 and below float32's maximum, "
                              f"got {theta!r}")
        for name in ROPE_REQUIRED_FIELDS[rope_type]:
            if name not in rope or rope[name] is None:
                raise ConfigError(f"rope type {rope_type!r} needs the field {name!r} in the RoPE settings")
            if not _is_positive_number(rope[name]):
                raise ConfigError(f"RoPE field {name} must be a positive number below float32's "
                                  f"maximum, got {rope[name]!r}")
        if rope_type == "yarn":
            for name in YARN_OPTIONAL_FIELDS:
                if rope.get(name) is not None and not _is_positive_number(rope[name]):
                    raise ConfigError(f"RoPE field {name} must be a positive number or null, "
                                      f"got {rope[name]!r}")
            if not isinstance(rope.get("truncate", True), bool):
                raise ConfigError(f"RoPE field truncate must be true or false, got {rope['truncate']!r}")
        if rope_type in ("linear", "dynamic", "llama3", "yarn") and rope["factor"] < 1:
            raise ConfigError(f"RoPE field factor must be >= 1 for rope type {rope_type!r}, got {rope['factor']!r}")
        if rope_type == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise ConfigError(
                f"llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                f"{rope['high_freq_factor']!r} <= {rope['low_freq_factor']!r}"
            )
        if rope_type == "dynamic" and self.head_dim == 2:
            # its base grows with the power hd / (hd - 2)
            raise ConfigError("dynamic RoPE needs head_dim > 2, got head_dim=2")
        self._validate_rope_result()

    def _validate_rope_result(self):
        """Each RoPE field can be a fine number on its own and the frequencies or the attention
        factor they give still be inf, NaN or absurd: compute them once, as the model will."""
        rope = self.rope_parameters
        settings = ", ".join(f"{name}={value!r}" for name, value in rope.items())
        try:
            with np.errstate(all="ignore"):
                inv_freq, attention_factor = layers.rope_frequencies(
                    self.head_dim, rope, self.max_position_embeddings, self.max_position_embeddings)
        except (ArithmeticError, ValueError) as error:  # e.g. a yarn beta so small its log is inf
            raise ConfigError(
                f"the RoPE settings ({settings}) cannot be computed: {error}") from None
        if not np.isfinite(inv_freq).all():
            raise ConfigError(
                f"the RoPE settings ({settings}) give frequencies that are not finite")
        low, high = ATTENTION_FACTOR_RANGE
        if not low <= attention_factor <= high:  # also False for NaN
            if rope.get("attention_factor") is not None:
                source = f"attention_factor={rope['attention_factor']!r}"
            else:
                source = (f"mscale={rope.get('mscale')!r} and mscale_all_dim="
                          f"{rope.get('mscale_all_dim')!r} (factor={rope.get('factor')!r})")
            raise ConfigError(
                f"RoPE field {source} gives an attention factor of {attention_factor:.4g}, outside "
                f"[{low}, {high}]; cos and sin are multiplied by it, so attention scores by its "
                "square, and published yarn models use about 1.1 to 1.5"
            )


def _normalise_spelling(fields: dict) -> dict:
    """Fold the 4.x and 5.x RoPE/dtype spellings into ``rope_parameters`` and ``torch_dtype``.

    For llama3 and yarn, ``original_max_position_embeddings`` is taken from a top-level field
    when one exists (as Transformers does), else from the RoPE dict, else max_position_embeddings.
    """
    fields = dict(fields)
    if "dtype" in fields:
        dtype = fields.pop("dtype")
        fields.setdefault("torch_dtype", dtype)
    rope_theta = fields.pop("rope_theta", None)
    rope_scaling = fields.pop("rope_scaling", None)
    rope_parameters = fields.pop("rope_parameters", None)
    for name, value in (("rope_scaling", rope_scaling), ("rope_parameters", rope_parameters)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a dict or null, got {value!r}")
    rope = dict(rope_scaling or {})
    rope.update(rope_parameters or {})
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = 10000.0 if rope_theta is None else rope_theta
    if rope["rope_type"] in ("llama3", "yarn"):
        if fields.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = fields["original_max_position_embeddings"]
        rope.setdefault(
            "original_max_position_embeddings",
            fields.get("max_position_embeddings", DEFAULTS["max_position_embeddings"]),
        )
    fields["rope_parameters"] = rope
    return fields


def _is_positive_int(value) -> bool:
    return is_integer(value) and value > 0


def _is_positive_number(value) -> bool:
    """A number in (0, float32 max]: the model computes in float32, where more is inf."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value <= FLOAT32_MAX)
