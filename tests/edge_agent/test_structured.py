"""Output plans (``serving.structured``) and grammars (``engine.grammar``): what a request asks
its output to be, checked and compiled, and the per-sequence token masks. Tables, plus
llguidance on the test tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.engine.base import SamplingParams, SequenceState
from edge_agent.engine.grammar import (
    LOOP_TOKENS,
    MAX_DIGIT_RUN,
    TokenVocabulary,
    lark_grammar,
)
from edge_agent.engine.sampling import pick
from edge_agent.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResult,
    validation_error,
)
from edge_agent.serving.structured import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    arguments_schema,
    bounded_formats,
    closed_objects,
    compile_output,
    plan_output,
)

MSG = [{"role": "user", "content": "hi"}]
OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": OBJ}}


def fmt(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def plan(**body):
    cls = CompletionRequest if "prompt" in body else ChatCompletionRequest
    try:
        req = cls.model_validate({"messages": MSG, **body} if cls is ChatCompletionRequest
                                 else body)
    except ValidationError as exc:
        return validation_error(exc)
    return plan_output(req)


@pytest.mark.parametrize("body, param, code", [
    ({"response_format": fmt({"type": "foo"})}, "response_format.json_schema.schema",
     "invalid_schema"),
    ({"response_format": fmt({"type": "object", "minProperties": "two"})},
     "response_format.json_schema.schema", "invalid_schema"),
    ({"response_format": fmt({"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)})},
     "response_format.json_schema.schema", "schema_too_large"),
    ({"response_format": fmt(deep(MAX_SCHEMA_DEPTH))}, "response_format.json_schema.schema",
     "schema_too_deep"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools.0.function.name", "invalid_value"),
    ({"tools": [TOOL, TOOL]}, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters", "invalid_schema"),
    ({"tools": [TOOL] * 129}, "tools", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"logprobs": "yes"}, "logprobs", "invalid_value"),
    ({"n": 17}, "n", "invalid_value"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
])
def test_bad_output_requests_are_400s_naming_the_parameter(body, param, code):
    result = plan(**body)
    assert isinstance(result, ErrorResult), result
    assert (result.status, result.body["error"]["param"], result.body["error"]["code"]) == (
        400, param, code)


def test_a_json_schema_plan_embeds_the_closed_schema():
    p = plan(response_format=fmt(OBJ))
    assert p.tools is None and p.tool_mode is None
    assert p.schemas == [("response_format.json_schema.schema",
                          {**OBJ, "additionalProperties": False})]
    assert p.grammar.startswith("start: %json ")
    # strict: false keeps the schema as written
    loose = plan(response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": OBJ, "strict": False}})
    assert loose.schemas[0][1] == OBJ


def test_tool_plans_follow_tool_choice():
    auto = plan(tools=[TOOL])
    assert auto.tool_mode == "auto" and auto.grammar.startswith("start: TEXT | calls")
    assert "calls: call\n" in auto.grammar + "\n"           # one call unless asked
    parallel = plan(tools=[TOOL], parallel_tool_calls=True, tool_choice="required")
    assert parallel.tool_mode == "required" and 'calls: call ("\\n" call)*' in parallel.grammar
    named = plan(tools=[TOOL, {"type": "function", "function": {"name": "g"}}],
                 parallel_tool_calls=True,
                 tool_choice={"type": "function", "function": {"name": "g"}})
    assert "call: call_1\n" in named.grammar and "calls: call\n" in named.grammar
    assert plan(tools=[TOOL], tool_choice="none").grammar is None
    assert plan(tools=[TOOL], tool_choice="none").tools is None


@pytest.mark.parametrize("schema, closed", [
    ({"type": "object", "properties": {"a": {}}},
     {"type": "object", "properties": {"a": {}}, "additionalProperties": False}),
    ({"type": "object", "properties": {}, "additionalProperties": True},
     {"type": "object", "properties": {}, "additionalProperties": True}),
    ({"type": "object", "properties": {}, "patternProperties": {"^x": {}}},
     {"type": "object", "properties": {}, "patternProperties": {"^x": {}}}),
    ({"$defs": {"p": {"properties": {"b": {}}}}, "items": {"properties": {}}},
     {"$defs": {"p": {"properties": {"b": {}}, "additionalProperties": False}},
      "items": {"properties": {}, "additionalProperties": False}}),
    ({"anyOf": [{"properties": {}}, {"type": "null"}]},
     {"anyOf": [{"properties": {}, "additionalProperties": False}, {"type": "null"}]}),
    ({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
     {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}),
    ({"type": "string"}, {"type": "string"}),
])
def test_objects_are_closed_unless_they_say_otherwise(schema, closed):
    assert closed_objects(schema) == closed


EMAIL = {"type": "string", "format": "email", "maxLength": 254, "pattern": "^[^@]{1,64}@"}


@pytest.mark.parametrize("schema, bounded", [
    ({"type": "string", "format": "email"}, EMAIL),
    ({"type": "string", "format": "email", "maxLength": 40},
     {**EMAIL, "maxLength": 40}),
    ({"type": "string", "format": "email", "pattern": "@corp[.]example$"},   # kept as written
     {"type": "string", "format": "email", "pattern": "@corp[.]example$", "maxLength": 254}),
    ({"type": "string", "format": "hostname"},
     {"type": "string", "format": "hostname", "maxLength": 253}),
    ({"$defs": {"p": {"properties": {"e": {"format": "idn-email"}}}},
      "items": {"anyOf": [{"format": "email"}, {"type": "null"}]}},
     {"$defs": {"p": {"properties": {"e": {"format": "idn-email", "maxLength": 254,
                                          "pattern": "^[^@]{1,64}@"}}}},
      "items": {"anyOf": [{"format": "email", "maxLength": 254, "pattern": "^[^@]{1,64}@"},
                          {"type": "null"}]}}),
    ({"type": "string", "format": "date-time"}, {"type": "string", "format": "date-time"}),
])
def test_emails_and_host_names_keep_their_standards_length_limits(schema, bounded):
    assert bounded_formats(schema) == bounded


def test_an_email_reaches_its_at_sign_within_64_characters(vocab, bpe_tokenizer):
    """A model that never wants to write ``@`` (SmolLM2 writing an email like a URL): the
    grammar brings it within the local part's 64 characters, and the answer ends."""
    scores = np.zeros(bpe_tokenizer.get_vocab_size(), dtype=np.float32)
    scores[bpe_tokenizer.token_to_id("a")] = 10.0
    schema = {"type": "object", "properties": {"e": {"type": "string", "format": "email"}},
              "required": ["e"]}
    grammar = lark_grammar(plan(response_format=fmt(schema)).grammar)
    email = json.loads(run_constrained(vocab, grammar, scores, steps=400))["e"]
    local, _, domain = email.partition("@")
    assert domain and 1 <= len(local) <= 64 and len(email) <= 254


@pytest.mark.parametrize("parameters, schema", [
    (None, {"type": "object", "properties": {}, "additionalProperties": False}),
    ({}, {"type": "object", "properties": {}, "additionalProperties": False}),
    ({"properties": {"a": {}}}, {"properties": {"a": {}}, "type": "object"}),
    (OBJ, OBJ),
])
def test_arguments_are_always_an_object(parameters, schema):
    assert arguments_schema(parameters) == schema


@pytest.fixture(scope="module")
def vocab(bpe_tokenizer):
    return TokenVocabulary(bpe_tokenizer, frozenset({2}))


def test_llguidance_reads_the_tokenizer_as_it_decodes(bpe_tokenizer, vocab):
    text = 'Hello wörld\n  {"a": 1}'
    ids = bpe_tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(vocab.token_bytes(i) for i in ids) == text.encode()


def test_a_keyword_llguidance_cannot_enforce_is_a_400_naming_the_schema(vocab):
    p = plan(tools=[TOOL, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}])
    result = compile_output(p, vocab)
    assert isinstance(result, ErrorResult)
    err = result.body["error"]
    assert (err["param"], err["code"]) == ("tools.1.function.parameters", "unsupported_schema")
    assert "not" in err["message"]


GREEDY = SamplingParams(max_tokens=200, temperature=0.0)


def run_constrained(vocab, grammar: str, scores: np.ndarray, steps: int = 200) -> str:
    """Pick tokens greedily from fixed ``scores`` under ``grammar`` until EOS; the text."""
    seq = SequenceState(prompt_ids=[1], params=GREEDY, constraint=vocab.constraint(grammar))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        token = pick(seq, scores, rng)
        if token == 2:
            break
        seq.generated.append(token)
    return b"".join(vocab.token_bytes(t) for t in seq.generated).decode()


def test_the_mask_holds_any_scores_to_the_schema(vocab, bpe_tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    grammar = lark_grammar(plan(response_format=fmt(schema)).grammar)
    rng = np.random.default_rng(1)
    for _ in range(5):   # random "models": the text parses and validates every time
        text = run_constrained(vocab, grammar, rng.normal(size=bpe_tokenizer.get_vocab_size()))
        value = json.loads(text)
        assert set(value) == {"n", "ok"} and isinstance(value["ok"], bool)


def test_a_run_of_digits_ends_where_the_grammar_allows(vocab, bpe_tokenizer):
    """A model that always prefers a digit writes a number of MAX_DIGIT_RUN digits, then the
    grammar's next best (not digits until max_tokens)."""
    scores = np.zeros(bpe_tokenizer.get_vocab_size(), dtype=np.float32)
    for digit in "123456789":
        scores[bpe_tokenizer.token_to_id(digit)] = 10.0
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    value = json.loads(run_constrained(vocab, lark_grammar(plan(response_format=fmt(schema))
                                                           .grammar), scores))
    digits = str(value["n"]).replace(".", "").replace("e+", "")
    assert len(digits) <= 2 * MAX_DIGIT_RUN
    # a pattern of only digits keeps its digits
    only = {"type": "string", "pattern": f"^[1-9]{{{MAX_DIGIT_RUN + 4}}}$"}
    text = run_constrained(vocab, lark_grammar(plan(response_format=fmt(only)).grammar), scores)
    assert len(json.loads(text)) == MAX_DIGIT_RUN + 4


def test_copies_of_a_constraint_move_independently(vocab, bpe_tokenizer):
    grammar = lark_grammar(plan(response_format=fmt({"enum": ["yes", "no"]})).grammar)
    first = vocab.constraint(grammar)
    second = first.copy()
    quote = bpe_tokenizer.token_to_id('"')
    first.advance(quote)
    size = bpe_tokenizer.get_vocab_size()
    first.fill()
    second.fill()
    assert first.allowed(size)[quote] == np.False_ and second.allowed(size)[quote]
    assert not first.allows(quote) and second.allows(quote)


def test_a_loop_is_left_where_the_grammar_allows(vocab, bpe_tokenizer):
    """A model that prefers "a" forever and the end of the string next writes LOOP_TOKENS
    a's and then ends the string, instead of repeating until max_tokens."""
    scores = np.zeros(bpe_tokenizer.get_vocab_size(), dtype=np.float32)
    scores[bpe_tokenizer.token_to_id("a")] = 10.0
    scores[bpe_tokenizer.token_to_id('"')] = 5.0
    grammar = lark_grammar(plan(response_format=fmt({"type": "string"})).grammar)
    assert json.loads(run_constrained(vocab, grammar, scores, steps=400)) == "a" * LOOP_TOKENS
