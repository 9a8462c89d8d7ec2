"""One entry to every checkpoint layout llama_np reads: ``open_model_files`` looks at what a
directory holds and hands it to the reader of that format (safetensors, pickled Hugging Face
weights, Meta's original download, a GGUF file).
"""

from __future__ import annotations

from llama_np.formats.gguf import is_gguf_file, open_gguf_checkpoint
from llama_np.formats.safetensors import INDEX_FILE_NAME, SINGLE_FILE_NAME, Checkpoint
from llama_np.formats.files import is_file
from llama_np.formats.locate import resolve_model_path
from llama_np.config import CONFIG_FILE, LlamaConfig
from llama_np.errors import CheckpointError, ConfigError
from llama_np.formats.meta import PARAMS_FILE, is_meta_checkpoint, open_meta_checkpoint
from llama_np.formats.torch_pickle import has_pickled_weights, open_pickled_checkpoint


def open_model_files(name_or_path, revision: str | None = None,
                     gguf_file: str | None = None) -> tuple[LlamaConfig, Checkpoint]:
    """The config and tensors of a model directory (or bundled model name) in any layout:

    - Hugging Face with safetensors (``config.json``, ``model.safetensors`` or its index);
    - Hugging Face with pickled weights (``config.json``, ``pytorch_model.bin`` or its index),
      read without running the pickle (``torch_pickle``);
    - Meta's (``params.json``, ``consolidated.NN.pth``, ``tokenizer.model``);
    - a GGUF file of llama.cpp (``formats/gguf``): ``name_or_path`` is the file itself, or the
      directory holding the file named ``gguf_file`` (Transformers' spelling).

    When a directory holds both safetensors and pickled weights, safetensors win, as in
    Transformers. ``revision`` picks a snapshot of a repo id in the local Hugging Face cache.
    The directory found is ``checkpoint.directory``.
    """
    if gguf_file is not None:
        return open_gguf_checkpoint(resolve_model_path(name_or_path, revision=revision) / gguf_file)
    if is_gguf_file(name_or_path):
        return open_gguf_checkpoint(name_or_path)
    directory = resolve_model_path(name_or_path, revision=revision)
    if is_meta_checkpoint(directory):
        return open_meta_checkpoint(directory)
    if not is_file(directory / CONFIG_FILE) and any(directory.glob("consolidated.*.pth")):
        raise CheckpointError(f"{directory} holds consolidated.NN.pth files but no {PARAMS_FILE}; "
                              "Meta's layout needs params.json beside them")
    if not is_file(directory / CONFIG_FILE, ConfigError):
        raise ConfigError(f"{directory} has no {CONFIG_FILE}")
    config = LlamaConfig.from_json_file(directory / CONFIG_FILE)
    has_safetensors = is_file(directory / SINGLE_FILE_NAME) or is_file(directory / INDEX_FILE_NAME)
    if not has_safetensors and has_pickled_weights(directory):
        return config, open_pickled_checkpoint(directory)
    return config, Checkpoint.open(directory)
