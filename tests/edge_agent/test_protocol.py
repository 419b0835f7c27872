import pytest
from pydantic import ValidationError

from edge_agent.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error,
    validation_error,
)

MSG = [{"role": "user", "content": "hi"}]


def _param(cls, body):
    with pytest.raises(ValidationError) as exc:
        cls.model_validate(body)
    err = validation_error(exc.value)
    assert err.status == 400 and err.type == "invalid_request_error"
    return err.body["error"]["param"]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": MSG, "temperature": -0.1}, "temperature"),
    ({"messages": MSG, "top_p": 1.01}, "top_p"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_chat_requests_name_the_parameter(body, param):
    assert _param(ChatCompletionRequest, body) == param


@pytest.mark.parametrize("body,param", [({"prompt": ""}, "prompt"), ({}, "prompt"),
                                        ({"prompt": ["a", "b"]}, "prompt")])
def test_bad_completion_requests(body, param):
    assert _param(CompletionRequest, body) == param


def test_embedding_input_must_not_be_empty():
    assert _param(EmbeddingRequest, {"input": [""]}) == "input"


@pytest.mark.parametrize("extra,param", [
    ({"logit_bias": {"42": 10}}, "logit_bias"), ({"best_of": 2}, "best_of"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"suffix": "x"}, "suffix"), ({"echo": True}, "echo"),
])
def test_meaning_changing_parameters_are_unsupported(extra, param):
    assert ChatCompletionRequest.model_validate({"messages": MSG, **extra}).unsupported() == param


def test_harmless_fields_pass():
    req = ChatCompletionRequest.model_validate({
        "messages": MSG, "n": 1, "logprobs": False, "response_format": {"type": "text"},
        "tool_choice": "none", "function_call": "none", "best_of": 1, "echo": False,
        "frequency_penalty": 0, "whatever": {"x": 1}})
    assert req.unsupported() is None


def test_content_parts_are_joined_and_images_refused():
    m = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert m.messages[0].text() == "ab"
    m = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValueError, match="image_url"):
        m.messages[0].text()


def test_error_value_shape():
    e = error(429, "full", headers={"Retry-After": "1"})
    assert e.body == {"error": {"message": "full", "type": "rate_limited", "param": None,
                                "code": None}}
    assert e.headers["Retry-After"] == "1"
