"""Chats as text: a checkpoint's own chat template (Jinja, ``llama-np[chat]``) and the Llama 2
chat format ``[INST] … [/INST]`` for checkpoints without one.

A chat template comes with a downloaded ``tokenizer_config.json``: it is a program, and it is
run as one from a stranger. Jinja's sandbox keeps it from files and from changing the messages;
here it is also bounded (``MAX_CHAT_TEXT_CHARACTERS``, ``MAX_RENDER_SECONDS``,
``MAX_TEMPLATE_NUMBER``), and whatever goes wrong while it renders is one TokenizerError.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime

from llama_np.errors import TokenizerError

# What rendering one chat may take. Real templates write a few kilobytes in a millisecond.
MAX_CHAT_TEXT_CHARACTERS = 4 * 1024 * 1024
MAX_RENDER_SECONDS = 5.0
# The largest number a template may pass to a function or filter, or repeat a string or list
# by ('a' * n, center(n), indent(n), lipsum(n), tojson(indent=n)): beyond it, one call could
# allocate gigabytes before the output is ever counted.
MAX_TEMPLATE_NUMBER = 100_000

# Meta's Llama 2 chat markers (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _chat_template_of(value, path) -> str:
    """tokenizer_config.json's chat_template: a string, or a list of named templates of which
    the one named "default" is used (Transformers' rule when no name is asked for)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(
            f"{path}: chat_template holds the templates {sorted(map(str, named))} and none named "
            "'default', the one llama_np would use"
        )
    raise TokenizerError(f"{path}: chat_template must be a Jinja template string, got {value!r:.80}")


def render_chat_template(template: str, messages, add_generation_prompt: bool,
                         special_tokens: dict) -> str:
    """Render a Jinja ``chat_template`` the way Transformers 4.45's ``apply_chat_template`` does.

    The environment is Transformers': Jinja's ``ImmutableSandboxedEnvironment`` (a template
    cannot touch files or change the messages) with ``trim_blocks`` and ``lstrip_blocks``, the
    ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML, the globals
    ``raise_exception(message)`` and ``strftime_now(format)``, and a ``{% generation %}`` tag
    that renders its body. The template sees ``messages``, ``add_generation_prompt`` and the
    special tokens (``bos_token``, ``eos_token``, …). A template error, including one raised
    with ``raise_exception``, is a TokenizerError, as is anything else that goes wrong while it
    renders: a TypeError, a recursion too deep, more than MAX_CHAT_TEXT_CHARACTERS of text, more
    than MAX_RENDER_SECONDS, a number beyond MAX_TEMPLATE_NUMBER.
    """
    jinja2 = _import_jinja2()
    if not isinstance(messages, (list, tuple)) or not messages or not all(
        isinstance(message, dict) for message in messages
    ):
        raise TokenizerError(
            "messages must be a non-empty list of {'role', 'content'} dicts, "
            f"got {messages!r:.80}"
        )
    compiled = _compile_chat_template(template)
    try:
        with _deadline(MAX_RENDER_SECONDS):
            pieces, length = [], 0
            for piece in compiled.generate(messages=list(messages), tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **special_tokens):
                length += len(piece)
                if length > MAX_CHAT_TEXT_CHARACTERS:
                    raise _TemplateTooCostly(f"it writes more than {MAX_CHAT_TEXT_CHARACTERS:,} characters")
                pieces.append(piece)
        return "".join(pieces)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the chat template cannot render these messages: {error}") from None
    except _TemplateTooCostly as error:
        raise TokenizerError(f"the chat template (tokenizer_config.json's chat_template) was stopped: {error}; a chat template writes a "
                             "few kilobytes in a few milliseconds") from None
    except (Exception, RecursionError, MemoryError) as error:  # a template is someone else's program
        raise TokenizerError(f"the chat template (tokenizer_config.json's chat_template) failed while rendering these messages: "
                             f"{type(error).__name__}: {str(error)[:200]}") from None


class _TemplateTooCostly(Exception):
    """Rendering went past one of the bounds of this module."""


class _deadline:
    """Stop the template's own code (Jinja compiles it to Python, in frames of "<template>")
    once it has run ``seconds``, or once one of its variables holds more than
    MAX_CHAT_TEXT_CHARACTERS items (a string doubled by ``~`` in a loop): each line of a template
    frame checks both.

    Only template frames are traced, so the library code a template calls runs at full speed;
    a single call that runs long is kept short by MAX_TEMPLATE_NUMBER instead.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.stop_at = time.monotonic() + self.seconds
        self.previous = sys.gettrace()
        sys.settrace(self._trace_calls)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)
        return False

    def _trace_calls(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename == "<template>":
            return self._trace_lines
        return None

    def _trace_lines(self, frame, event, arg):
        if event == "line":
            if time.monotonic() > self.stop_at:
                raise _TemplateTooCostly(f"it ran for more than {self.seconds:g} seconds")
            for value in frame.f_locals.values():
                # a jinja2 namespace() keeps its attributes in a dict of its own
                for held in (value, *getattr(value, "_Namespace__attrs", {}).values()):
                    if isinstance(held, (str, list, tuple, dict)) and len(held) > MAX_CHAT_TEXT_CHARACTERS:
                        raise _TemplateTooCostly(f"a variable holds more than {MAX_CHAT_TEXT_CHARACTERS:,} items")
        return self._trace_lines


def _bounded(function):
    """``function`` refusing numbers beyond MAX_TEMPLATE_NUMBER among its arguments."""
    @functools.wraps(function)
    def bounded(*args, **kwargs):
        _check_numbers(args, kwargs, getattr(function, "__name__", "a function"))
        return function(*args, **kwargs)
    return bounded


def _check_numbers(args, kwargs, what: str) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_NUMBER:
            raise _TemplateTooCostly(f"it passes {_describe_number(value)} to {what} (at most "
                                     f"{MAX_TEMPLATE_NUMBER:,})")


def _describe_number(value: int) -> str:
    return str(value) if value.bit_length() < 64 else f"a number of {value.bit_length()} bits"


def _import_jinja2():
    try:
        import jinja2  # optional extra llama-np[chat]: only chat templates need it
        import jinja2.sandbox  # noqa: F401  (the sandboxed environment lives in a submodule)
    except ImportError:
        raise TokenizerError(
            "this tokenizer has a chat_template (Jinja), and rendering it needs the jinja2 "
            "package: pip install 'llama-np[chat]'"
        ) from None
    return jinja2


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """The compiled template, in Transformers' environment (see ``render_chat_template``)."""
    jinja2 = _import_jinja2()
    from jinja2.ext import Extension  # optional extra llama-np[chat], as in _import_jinja2

    class GenerationTag(Extension):
        """``{% generation %}…{% endgeneration %}`` marks the assistant's text for Transformers'
        assistant-token mask; llama_np has no such mask, so the tag renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """Transformers' sandbox, with every call, filter and repetition held to MAX_TEMPLATE_NUMBER."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and \
                            len(sequence) * count > MAX_CHAT_TEXT_CHARACTERS:
                        raise _TemplateTooCostly(f"it repeats a {type(sequence).__name__} of "
                                                 f"{len(sequence):,} items {_describe_number(count)} times")
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and \
                    isinstance(left, int) and abs(left) > 1:
                raise _TemplateTooCostly(f"it raises a number to the power {_describe_number(right)}")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            _check_numbers(args, kwargs, getattr(__obj, "__name__", "a function"))
            return super().call(__context, __obj, *args, **kwargs)

    environment = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.filters = {name: _bounded(f) for name, f in environment.filters.items()}
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(
            f"the chat template is not valid Jinja (line {error.lineno}): {error.message}"
        ) from None


def llama2_chat_text(messages, bos_token, eos_token, add_generation_prompt=True) -> str:
    """A dialog as text in Meta's Llama 2 chat format.

    ``messages`` is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an
    optional system message first, then user and assistant turns alternating, starting with
    the user. Following Meta's ``chat_completion`` (docs/reference.md §5.6):

        system  -> put inside the first user turn: "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"
        each finished exchange -> <s>[INST] {user} [/INST] {answer} </s>
        the open user turn     -> <s>[INST] {user} [/INST]

    with user and answer texts stripped. With ``add_generation_prompt=True`` (the default) the
    dialog must end with a user turn, as Meta's code requires; with False it may also end with
    an answer, which is written as a finished exchange (for scoring or training on whole
    dialogs). Encoded with legacy=True, the text gives exactly Meta's ids (each segment gets
    its own dummy prefix).
    """
    dialog = _llama2_dialog(messages)
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    for name in tokens:
        if tokens[name] is None:
            raise TokenizerError(f"the Llama 2 chat format needs a {name}, and this "
                                 f"tokenizer's {name} is null")
    if add_generation_prompt and dialog[-1]["role"] != "user":
        raise TokenizerError(
            f"the dialog ends with a {dialog[-1]['role']!r} turn; the Llama 2 chat format "
            "ends with the user turn the model answers (pass add_generation_prompt=False to "
            "write a finished dialog)"
        )
    parts = []
    for i in range(0, len(dialog), 2):
        user = dialog[i]["content"].strip()
        if i + 1 < len(dialog):
            answer = dialog[i + 1]["content"].strip()
            parts.append(f"{bos_token}{B_INST} {user} {E_INST} {answer} {eos_token}")
        else:
            parts.append(f"{bos_token}{B_INST} {user} {E_INST}")
    return "".join(parts)


def _llama2_dialog(messages) -> list[dict]:
    """Validate a chat and fold a leading system message into the first user turn (Meta's rule)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(
            "messages must be a non-empty list of {'role', 'content'} dicts, "
            f"got {messages!r:.80}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TokenizerError(
                f"message {i} must be a dict with a string 'content', got {message!r:.80}"
            )
        if message.get("role") not in ("system", "user", "assistant"):
            raise TokenizerError(
                f"message {i} has role {message.get('role')!r}; expected 'system', 'user' or "
                "'assistant'"
            )
    dialog = [dict(role=m["role"], content=m["content"]) for m in messages]
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise TokenizerError("a system message must be followed by a user message")
        first = dialog[1]
        dialog = [
            dict(
                role=first["role"], content=B_SYS + dialog[0]["content"] + E_SYS + first["content"]
            )
        ] + dialog[2:]
    for i, message in enumerate(dialog):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TokenizerError(
                f"roles must alternate user/assistant/user/... (after an optional first system "
                f"message); turn {i} is {message['role']!r} where {expected!r} was expected"
            )
    return dialog
