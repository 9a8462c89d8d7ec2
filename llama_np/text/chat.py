"""Chats as text: a checkpoint's own chat template (Jinja, ``llama-np[chat]``) and the Llama 2
chat format ``[INST] … [/INST]`` for checkpoints without one.
"""

from __future__ import annotations
import functools
import json
from datetime import datetime
from llama_np.errors import TokenizerError

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
    with ``raise_exception``, is a TokenizerError.
    """
    jinja2 = _import_jinja2()
    if not isinstance(messages, (list, tuple)) or not messages or not all(
        isinstance(message, dict) for message in messages
    ):
        raise TokenizerError(
            "messages must be a non-empty list of {'role', 'content'} dicts, "
            f"got {messages!r:.80}"
        )
    try:
        compiled = _compile_chat_template(template)
        return compiled.render(messages=list(messages), tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the chat template cannot render these messages: {error}") from None


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

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
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
