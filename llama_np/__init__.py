"""llama_np: Llama 2 in plain, readable NumPy, matching Hugging Face Transformers' numbers."""

__version__ = "0.1.0"

from llama_np.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    InputError,
    LlamaNPError,
    TokenizerError,
)
from llama_np.config import LlamaConfig  # noqa: E402
from llama_np.model import (  # noqa: E402
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from llama_np.convert import convert_meta_checkpoint  # noqa: E402

try:  # the tokenizer module lands separately
    from llama_np.tokenizer import LlamaTokenizer  # noqa: E402
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "LlamaConfig", "LlamaTokenizer", "LlamaModel", "LlamaForCausalLM",
    "LlamaForSequenceClassification", "LlamaNPError", "ConfigError", "CheckpointError",
    "TokenizerError", "InputError", "convert_meta_checkpoint",
]
