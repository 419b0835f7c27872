"""The jinja2 renderer equals transformers' apply_chat_template, on a bundle's own template
(ChatML, as SmolLM2's) and on a template using loopcontrols, tojson and raise_exception.

No exported model: the bundle holds the small BPE of ``bpe_tokenizer_dir`` and the ChatML
template below, which is all ``ChatTemplate.from_bundle`` reads.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edge_agent.bundle import staging_dir, write_bundle
from edge_agent.text.chat_template import ChatTemplate, TemplateError
from tests.support.fake_engine import write_fake_bundle

# SmolLM2's template: ChatML, with a default system message when the conversation has none.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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
def chatml_bundle(bpe_tokenizer_dir, tmp_path_factory):
    return write_fake_bundle(bpe_tokenizer_dir, tmp_path_factory.mktemp("chatml-store"),
                             name="chatml", chat_template=CHATML)


@pytest.fixture(scope="module")
def hf_tokenizer(chatml_bundle):
    transformers = pytest.importorskip("transformers")  # the reference; an export extra
    return transformers.AutoTokenizer.from_pretrained(chatml_bundle.path)


def test_bundle_template_renders_chatml(chatml_bundle):
    template = ChatTemplate.from_bundle(chatml_bundle)
    assert template is not None and template.source == CHATML
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    assert template.render(CONVERSATIONS[1]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert template.render(CONVERSATIONS[0], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_bundle_template_equals_transformers(chatml_bundle, hf_tokenizer, messages,
                                             add_generation_prompt):
    template = ChatTemplate.from_bundle(chatml_bundle)
    assert template is not None
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_other_template_features_equal_transformers(chatml_bundle, hf_tokenizer, messages):
    template = ChatTemplate(OTHER, ChatTemplate.from_bundle(chatml_bundle).special_tokens)
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=OTHER, tokenize=False,
                                                add_generation_prompt=True)
    assert template.render(messages) == expected


def test_raise_exception_becomes_template_error():
    with pytest.raises(TemplateError, match="no tools"):
        ChatTemplate(OTHER, {}).render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("stored", [OTHER, [{"name": "tool_use", "template": "unused"},
                                            {"name": "default", "template": OTHER}]])
def test_a_template_in_tokenizer_config_is_read_with_its_special_tokens(bpe_tokenizer_dir,
                                                                        tmp_path, stored):
    """Without chat_template.jinja, tokenizer_config.json's template (or its "default")."""
    store = tmp_path / "store"
    stage = staging_dir(store)
    shutil.copy2(bpe_tokenizer_dir / "tokenizer.json", stage / "tokenizer.json")
    config = json.loads((bpe_tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = stored
    config["eos_token"] = {"content": "<|im_end|>", "special": True}  # an AddedToken
    (stage / "tokenizer_config.json").write_text(json.dumps(config))
    bundle = write_bundle(stage, {
        "name": "in-config", "task": "text-generation", "runtime": "onnxruntime",
        "exporter": "test", "source": {}, "precision": "fp32", "signature": {},
        "context_length": 64, "validation": {}}, store)
    template = ChatTemplate.from_bundle(bundle)
    assert template is not None and template.source == OTHER
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    assert template.render(CONVERSATIONS[1]) == (
        '<system>"You are terse."<|im_end|>\n<user>"Hi"<|im_end|>\n<assistant>')
