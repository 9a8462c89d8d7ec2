"""The exceptions llama_np raises.

Every error a user can cause (a bad checkpoint, a wrong config, an out-of-range token id, an
unusable tokenizer file) is one of these, with a message that names the file, tensor, field or
value and says what was expected. Catch ``LlamaNPError`` to catch them all.
"""


class LlamaNPError(Exception):
    """Root of every error llama_np raises on purpose."""


class ConfigError(LlamaNPError, ValueError):
    """A config.json field is missing, has the wrong type, or contradicts another field."""


class CheckpointError(LlamaNPError, ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not match its config."""


class TokenizerError(LlamaNPError, ValueError):
    """A tokenizer file is missing or corrupt, or a text / id cannot be encoded or decoded."""


class InputError(LlamaNPError, ValueError):
    """An argument to a model call or to generate() is out of range or has the wrong shape."""
