"""Render a bundle's chat template with jinja2, exactly as transformers' apply_chat_template.

Same environment as transformers (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, its
``tojson`` and ``raise_exception``, ``strftime_now``), same variables (messages,
add_generation_prompt, and the special-token strings from tokenizer_config.json), so the
text is identical without importing transformers.
"""

from __future__ import annotations

import datetime as _dt
import json
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_agent.bundle import Bundle

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
            "mask_token")


class TemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render."""


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source = source
        self.special_tokens = special_tokens
        self.template = _compile(source)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ChatTemplate | None:
        """The bundle's template (chat_template.jinja, else tokenizer_config's), or None."""
        config = {}
        if bundle.has_file("tokenizer_config.json"):
            config = json.loads(bundle.file("tokenizer_config.json").read_text())
        name = bundle.manifest.get("chat_template")
        if name and bundle.has_file(name):
            source = bundle.file(name).read_text()
        elif bundle.has_file("chat_template.jinja"):
            source = bundle.file("chat_template.jinja").read_text()
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: take "default"
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        special = {}
        for key in _SPECIAL:
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken serialised
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **kwargs)
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(str(exc)) from exc
