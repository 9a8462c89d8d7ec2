"""LoRA adapters (Hu et al., 2021) with PEFT's semantics and file format.

A LoRA adapter leaves a weight W (out, in) frozen and learns a low-rank change to it:

    W' = W + scaling · B · A,    A (r, in), B (out, r),    scaling = lora_alpha / r
                                                           (lora_alpha / sqrt(r) with use_rslora)

PEFT computes ``x · Wᵀ + scaling · (x · Aᵀ) · Bᵀ``; the model here runs with W' itself (the same
numbers, rounded in another order). Its gradients follow from the gradient of W' by the chain
rule: dA = scaling · Bᵀ · dW',  dB = scaling · dW' · Aᵀ.

PEFT's directory layout: ``adapter_config.json`` (``peft_type`` "LORA", ``r``, ``lora_alpha``,
``target_modules``, …) and ``adapter_model.safetensors`` with one pair of tensors per adapted
module, named ``base_model.model.<module>.lora_A.weight`` and ``….lora_B.weight``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

On a sequence classifier (PEFT's ``task_type="SEQ_CLS"``) PEFT also trains the new ``score``
head in full: it is in the config's ``modules_to_save`` (PEFT lists ``["classifier", "score"]``,
the head's names across models; Llama's is ``score``), the model computes with the adapter's
own copy of the head's weight, and the file stores that copy as ``base_model.model.score.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_np.errors import CheckpointError, InputError
from llama_np.formats.files import atomic_write_text, is_file, read_json_object
from llama_np.formats.safetensors import Checkpoint, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # where PEFT's wrapper puts the Transformers model
# The linear layers of a decoder layer LoRA can adapt: PEFT's module name -> LayerWeights field.
TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The modules PEFT trains in full on a classifier (task_type SEQ_CLS): its heads' names across
# models. A Llama classifier's head is ``score``; "classifier" names no module here, as in PEFT.
SEQ_CLS_MODULES_TO_SAVE = ("classifier", "score")
HEAD_WEIGHT = "score.weight"
# adapter_config.json fields a LoRA adapter here must leave at PEFT's defaults.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None,
               "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
               "lora_bias": False, "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None, "exclude_modules": None}


@dataclass
class LoraConfig:
    """What a LoRA adapter adapts and how strongly: PEFT's ``LoraConfig`` fields that matter here.

    ``lora_dropout`` is kept for the file; it acts only while PEFT trains, and the passes here
    run as PEFT's eval mode (no dropout). ``task_type`` is "CAUSAL_LM" or "SEQ_CLS"; None takes
    the model's when the adapter is added. With "SEQ_CLS" the ``score`` head is trained in full
    (``modules_to_save``, as PEFT sets it).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: tuple = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    use_rslora: bool = False
    task_type: str | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            raise InputError(f"target_modules must list module names such as ('q_proj', 'v_proj'), "
                             f"got the string {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        unknown = [name for name in self.target_modules if name not in TARGETABLE]
        if unknown or not self.target_modules:
            raise InputError(f"target_modules {list(self.target_modules)}: a Llama decoder layer's "
                             f"linear layers are {list(TARGETABLE)}")
        if not (isinstance(self.r, int) and self.r > 0):
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.task_type not in (None, "CAUSAL_LM", "SEQ_CLS"):
            raise InputError(f"task_type must be 'CAUSAL_LM' (LlamaForCausalLM) or 'SEQ_CLS' "
                             f"(LlamaForSequenceClassification), got {self.task_type!r}")

    @property
    def modules_to_save(self) -> list | None:
        """The modules trained in full beside the LoRA pairs: PEFT's list for SEQ_CLS, else None."""
        return list(SEQ_CLS_MODULES_TO_SAVE) if self.task_type == "SEQ_CLS" else None

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA (use_rslora)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json as PEFT writes it (the fields PEFT's LoraConfig reads back)."""
        return {"peft_type": "LORA", "task_type": self.task_type or "CAUSAL_LM", "r": self.r,
                "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": sorted(self.target_modules), "use_rslora": self.use_rslora, "bias": "none",
                "init_lora_weights": True, "inference_mode": True,
                "base_model_name_or_path": base_model_name_or_path, **UNSUPPORTED,
                "modules_to_save": self.modules_to_save}

    @classmethod
    def from_dict(cls, fields: dict, where: str = ADAPTER_CONFIG) -> "LoraConfig":
        """Read PEFT's adapter_config.json, refusing what this adapter cannot do."""
        if fields.get("peft_type") != "LORA":
            raise CheckpointError(f"{where}: peft_type is {fields.get('peft_type')!r}; only LORA adapters load here")
        if fields.get("bias", "none") != "none":
            raise CheckpointError(f"{where}: bias={fields['bias']!r}; only bias='none' adapters load here")
        for name, default in UNSUPPORTED.items():
            if fields.get(name, default) not in (default, None, {}, False):
                raise CheckpointError(f"{where}: {name}={fields[name]!r} is not supported (expected {default!r})")
        task_type = fields.get("task_type") or "CAUSAL_LM"
        saved = fields.get("modules_to_save") or []
        if task_type == "SEQ_CLS" and set(saved) <= set(SEQ_CLS_MODULES_TO_SAVE):
            saved = []  # PEFT's own list for a classifier: the score head, trained in full
        if saved:
            raise CheckpointError(f"{where}: modules_to_save={fields['modules_to_save']!r} with task_type "
                                  f"{task_type!r} is not supported (only a SEQ_CLS adapter's "
                                  f"{list(SEQ_CLS_MODULES_TO_SAVE)})")
        try:
            return cls(r=fields["r"], lora_alpha=fields["lora_alpha"], target_modules=fields["target_modules"],
                       lora_dropout=fields.get("lora_dropout", 0.0), use_rslora=fields.get("use_rslora", False),
                       task_type=task_type)
        except KeyError as missing:
            raise CheckpointError(f"{where} lacks {missing}") from None
        except InputError as error:
            raise CheckpointError(f"{where}: {error}") from None


def peft_names(weight_name: str) -> tuple[str, str]:
    """model.layers.0.self_attn.q_proj.weight -> its lora_A and lora_B names in PEFT's file."""
    module = PEFT_PREFIX + weight_name[: -len(".weight")]
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def kaiming_uniform_a(rank: int, fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """PEFT's initial A (r, in): torch's kaiming_uniform_ with a = sqrt(5), i.e. U(−b, b) with

        b = gain · sqrt(3 / fan_in),  gain = sqrt(2 / (1 + a²)) = sqrt(1/3)   ->   b = 1 / sqrt(fan_in)
    """
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(rank, fan_in))


class LoraAdapter:
    """One LoRA adapter on a model: its config, and {PEFT tensor name: array} in the compute dtype.

    ``targets`` maps each adapted checkpoint weight (``model.layers.0.self_attn.q_proj.weight``)
    to its (lora_A, lora_B) names; ``saved`` each weight trained in full (a classifier's
    ``score.weight``) to the name of the adapter's copy. ``enabled`` is False after
    ``disable_adapters``.
    """

    def __init__(self, config: LoraConfig, tensors: dict, targets: dict, saved: dict | None = None):
        self.config, self.tensors, self.targets, self.saved = config, tensors, targets, saved or {}
        self.enabled = True

    @classmethod
    def for_model(cls, model, config: LoraConfig, tensors: dict | None = None, seed: int = 0) -> "LoraAdapter":
        """An adapter on every targeted linear layer of ``model``; new tensors (A Kaiming-uniform,
        B zero, as PEFT initialises them) unless ``tensors`` gives them, checked against the model."""
        config = check_trainable(model, config)
        rng = np.random.default_rng(seed)
        targets, arrays, saved = {}, {}, {}
        for index in range(model.config.num_hidden_layers):
            names = model.layer_tensor_names(index)
            for module in config.target_modules:
                weight_name = names[module]
                out_features, in_features = model.weights.shape(weight_name)
                a_name, b_name = targets[weight_name] = peft_names(weight_name)
                expected = {a_name: (config.r, in_features), b_name: (out_features, config.r)}
                for name, shape in expected.items():
                    if tensors is None:
                        value = kaiming_uniform_a(config.r, in_features, rng) if name == a_name else np.zeros(shape)
                    elif name not in tensors:
                        raise CheckpointError(f"the adapter lacks {name} for target module {module!r}")
                    else:
                        value = tensors[name]
                        if tuple(value.shape) != shape:
                            raise CheckpointError(f"adapter tensor {name} has shape {tuple(value.shape)}; this "
                                                  f"model with r={config.r} expects {shape}: an adapter for another "
                                                  f"base model?")
                    arrays[name] = np.array(value, dtype=model.dtype)
        if config.task_type == "SEQ_CLS":  # the head trained in full: a copy, as PEFT's ModulesToSaveWrapper
            name = saved[HEAD_WEIGHT] = PEFT_PREFIX + HEAD_WEIGHT
            shape = model.weights.shape(HEAD_WEIGHT)
            value = model.weights[HEAD_WEIGHT] if tensors is None else tensors.get(name)
            if value is None:
                raise CheckpointError(f"the SEQ_CLS adapter lacks {name}, the score head PEFT trains in full")
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"adapter tensor {name} has shape {tuple(value.shape)}; this model's "
                                      f"score head is {tuple(shape)}: an adapter for another base model?")
            arrays[name] = np.array(value, dtype=model.dtype)
        if tensors is not None:
            extra = sorted(set(tensors) - set(arrays))
            if extra:
                raise CheckpointError(f"the adapter holds tensors this model has no place for: {extra[:4]}")
        return cls(config, arrays, targets, saved)

    def delta(self, weight_name: str) -> np.ndarray:
        """scaling · B · A (out, in), the change this adapter makes to one weight."""
        a_name, b_name = self.targets[weight_name]
        return self.tensors[b_name] @ self.tensors[a_name] * self.tensors[a_name].dtype.type(self.config.scaling)

    def weight(self, weight_name: str, base: np.ndarray) -> np.ndarray:
        """The weight the model computes with: the adapter's copy of a weight it trains in full
        (while enabled), else ``base``."""
        return self.tensors[self.saved[weight_name]] if self.enabled and weight_name in self.saved else base

    def adapt(self, tensors: dict, names: dict) -> dict:
        """A decoder layer's tensors (LayerWeights field -> array) with W + scaling · B · A."""
        if not self.enabled:
            return tensors
        return {field: (value + self.delta(names[field]) if names.get(field) in self.targets else value)
                for field, value in tensors.items()}

    def gradients(self, weight_grads: dict) -> dict:
        """{PEFT name: gradient} from the gradients of the adapted weights W' (chain rule):

            dA = scaling · Bᵀ · dW',   dB = scaling · dW' · Aᵀ
        """
        grads = {}
        for weight_name, (a_name, b_name) in self.targets.items():
            a, b, grad = self.tensors[a_name], self.tensors[b_name], weight_grads[weight_name]
            scaling = a.dtype.type(self.config.scaling)
            grads[a_name] = (b.T @ grad) * scaling
            grads[b_name] = (grad @ a.T) * scaling
        for weight_name, name in self.saved.items():  # trained in full: its own gradient
            grads[name] = weight_grads[weight_name]
        return {name: grads[name] for name in self.tensors}


def check_trainable(model, config: LoraConfig) -> LoraConfig:
    """The config with the model's task type, once the model is known to take an adapter."""
    if not model.weights.keep_widened:
        raise InputError(f"{type(model).__name__} was loaded with keep_widened=False; an adapter changes "
                         f"the weights it computes with, which needs them widened and kept: load it with "
                         f"from_pretrained(..., keep_widened=True)")
    if model.main_output != "logits":
        raise InputError(f"LoRA adapters here are for LlamaForCausalLM and LlamaForSequenceClassification; "
                         f"{type(model).__name__} has no head to train")
    task_type = "CAUSAL_LM" if model.has_lm_head else "SEQ_CLS"
    if config.task_type not in (None, task_type):
        raise InputError(f"a task_type={config.task_type!r} adapter does not fit {type(model).__name__} "
                         f"(task_type {task_type!r})")
    return dataclasses.replace(config, task_type=task_type)


def load_adapter(model, directory) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    if not is_file(directory / ADAPTER_CONFIG):
        raise CheckpointError(f"{directory} holds no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    config = LoraConfig.from_dict(read_json_object(directory / ADAPTER_CONFIG), str(directory / ADAPTER_CONFIG))
    if not is_file(directory / ADAPTER_WEIGHTS):
        raise CheckpointError(f"{directory} holds no {ADAPTER_WEIGHTS}")
    stored = Checkpoint.open(directory / ADAPTER_WEIGHTS)
    tensors = {name: stored[name].numpy(model.dtype) for name in stored}
    return LoraAdapter.for_model(model, config, tensors)


def save_adapter(adapter: LoraAdapter, directory, base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter`` as PEFT does: adapter_config.json and float32 adapter_model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in adapter.tensors.items()}
    save_safetensors(directory / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    text = json.dumps(adapter.config.to_dict(base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / ADAPTER_CONFIG, text)
