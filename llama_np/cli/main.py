"""The ``llama-np`` command line (also ``python -m llama_np``).

    llama-np generate PROMPT    stream a continuation; tokens/s for the new tokens on stderr
    llama-np chat               talk to a chat checkpoint in the Llama 2 chat format
    llama-np classify TEXT...   label and probabilities from a sequence classifier
    llama-np logits PROMPT      the most likely next tokens; --out saves the full logits
    llama-np compare REF.npz    run the model on stored input ids and check stored logits
    llama-np perplexity FILE    perplexity of a text file, Transformers' or llama.cpp's recipe
    llama-np inspect            config, parameter count, dtypes, sizes and memory
    llama-np dump PROMPT        save every named activation (golden activations) to an .npz
    llama-np diff A.npz B.npz   the first activation where two dumps part ways
    llama-np attention PROMPT   save a figure of one head's or one layer's attention
    llama-np convert META OUT   Meta's consolidated.NN.pth checkpoint -> a Hugging Face directory
    llama-np quantize MODEL OUT.gguf --type Q4_0   any checkpoint -> a GGUF file for llama.cpp

Every verb takes ``--model NAME_OR_PATH`` (a checkpoint directory in Hugging Face's or Meta's
layout, a bundled model name, or a repo id such as ``meta-llama/Llama-2-7b-hf`` already in the
local Hugging Face cache) and defaults to the bundled ``tiny-shakespeare``
(``tiny-shakespeare-genre`` for classify). A PROMPT of ``-`` is read from stdin.

User mistakes (a missing path, a corrupt file, a bad argument) end with one line
``llama-np: error: ...`` on stderr and exit status 2, never a traceback. ``compare`` and ``diff``
exit with 1 when the numbers differ by more than the tolerance (``compare`` also when nothing
was compared). Ctrl-C exits with 130. Characters stdout's encoding cannot hold are written as
Python escapes (é as \\xe9).

This module runs one command and turns what ends it into an exit status. The parser is in
``parser.py``, and each verb runs in its own module: ``generate.py`` (generate, chat),
``classify.py`` (classify, logits), ``compare.py`` (compare, dump, diff, attention),
``perplexity.py``, and ``checkpoints.py`` (inspect, convert, quantize); ``common.py`` holds what they
share.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from llama_np.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from llama_np.cli.parser import parse_arguments
from llama_np.weights.memory import available_memory, human_bytes
from llama_np.errors import LlamaNPError


def _warning_printer():
    """showwarning that prints ``llama-np: warning: ...`` once per place in the code.

    A warning raised at every generation step (e.g. "the sequence reaches position N, past
    max_position_embeddings") would otherwise fill the terminal with one line per token.
    """
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if (filename, lineno) not in seen:
            seen.add((filename, lineno))
            print(f"llama-np: warning: {message}", file=sys.stderr)

    return show


def main(argv=None) -> int:
    """Run one ``llama-np`` command; returns the exit status."""
    with escapes_for_unencodable_output():
        return _run(argv)


@contextlib.contextmanager
def escapes_for_unencodable_output():
    """Write what stdout's encoding cannot hold as Python escapes (é -> \\xe9), as Python
    already does on stderr, instead of failing.

    With an ASCII-only stdout (PYTHONIOENCODING=ascii, a C locale, some pipes) a prompt or a
    generated word with an accent would otherwise end the command in UnicodeEncodeError half
    way through its output. The stream's own setting is restored afterwards: ``main`` can be
    called from Python.
    """
    stream = sys.stdout
    if getattr(stream, "errors", None) != "strict" or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        try:
            stream.reconfigure(errors="strict")
        except (OSError, ValueError):  # a closed or broken stream: nothing left to write anyway
            pass


def _run(argv) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer()
            args = parse_arguments(argv)
            return args.run(args)
    except SystemExit as exit_request:  # --help and --version
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # piped into `head`, which has read what it wanted: a normal end
        _silence_stdout()
        return EXIT_OK
    except (UsageError, LlamaNPError) as error:
        return _fail(str(error))
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}")
    except MemoryError as error:  # what the checks before each allocation did not foresee
        wanted = f" ({error})" if str(error) else ""
        room = available_memory()
        left = f"; {human_bytes(room)} are available to this process" if room is not None else ""
        return _fail(f"out of memory{wanted}{left}: try a shorter input, or a machine or limit "
                     "(ulimit -v, a container's memory limit) with more memory")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str) -> int:
    first_line = " ".join(message.split())  # one line, whatever the message held
    print(f"llama-np: error: {first_line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
