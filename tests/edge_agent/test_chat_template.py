"""The jinja2 renderer equals transformers' apply_chat_template, on the bundle's own template
and on a template using loopcontrols, tojson and raise_exception."""

from __future__ import annotations

import pytest

from edge_agent.text.chat_template import ChatTemplate, TemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! ✨"},
     {"role": "user", "content": "Tell me a joke\nwith two lines"}],
]

OTHER = (
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "{% if loop.index > 5 %}{% break %}{% endif %}"
    "<{{ m.role }}>{{ m.content | tojson }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_genai_bundle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_genai_bundle.path)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_bundle_template_equals_transformers(tiny_genai_bundle, hf_tokenizer, messages,
                                             add_generation_prompt):
    template = ChatTemplate.from_bundle(tiny_genai_bundle)
    assert template is not None
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_other_template_features_equal_transformers(tiny_genai_bundle, hf_tokenizer, messages):
    template = ChatTemplate(OTHER, ChatTemplate.from_bundle(tiny_genai_bundle).special_tokens)
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=OTHER, tokenize=False,
                                                add_generation_prompt=True)
    assert template.render(messages) == expected


def test_raise_exception_becomes_template_error():
    with pytest.raises(TemplateError, match="no tools"):
        ChatTemplate(OTHER, {}).render([{"role": "tool", "content": "x"}])
