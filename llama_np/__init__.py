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
from llama_np.formats.convert import convert_meta_checkpoint  # noqa: E402
from llama_np.training.model_backward import value_and_grad  # noqa: E402
from llama_np.training.loop import train  # noqa: E402
from llama_np.training import optim  # noqa: E402  (llama_np.optim.AdamW, as the training API names it)
from llama_np.text.tokenizer_fast import LlamaTokenizerFast  # noqa: E402  (tokenizers is loaded on use)

try:
    from llama_np.text.tokenizer import LlamaTokenizer  # noqa: E402
except ModuleNotFoundError as _missing:  # sentencepiece has no wheel for some platforms
    if _missing.name is None or _missing.name.partition(".")[0] == "llama_np":
        raise
    # The model still imports and runs; asking for the tokenizer says what to install.
    _tokenizer_missing = _missing

    def __getattr__(name):
        if name == "LlamaTokenizer":
            package = _tokenizer_missing.name.partition(".")[0]
            raise ImportError(
                f"LlamaTokenizer needs the {package!r} package, which cannot be imported "
                f"({_tokenizer_missing}); install it with: pip install {package}"
            ) from _tokenizer_missing
        raise AttributeError(f"module 'llama_np' has no attribute {name!r}")

__all__ = [
    "LlamaConfig", "LlamaTokenizer", "LlamaTokenizerFast", "LlamaModel", "LlamaForCausalLM",
    "LlamaForSequenceClassification", "LlamaNPError", "ConfigError", "CheckpointError",
    "TokenizerError", "InputError", "convert_meta_checkpoint", "value_and_grad",
    "train", "optim",
]
