"""What a request asks its output to be, as a grammar: JSON (``response_format``) or tool
calls (``tools``), checked before the request is admitted.

``plan_output`` is pure: it checks what a client can get wrong (an invalid JSON Schema, one
too large or too deep, ``tool_choice`` naming no tool, ``top_logprobs`` without
``logprobs``) and writes the Lark grammar llguidance enforces. ``compile_output`` then asks
llguidance whether it can enforce it: a schema keyword it cannot enforce is a 400 naming
it, never unconstrained text.

Objects are closed unless a schema says otherwise: an object with ``properties`` and no
``additionalProperties`` gets ``additionalProperties: false``, as OpenAI's ``strict: true``
requires and xgrammar's strict mode (vLLM's default) assumes. Left open, a small model fills
an answer with keys nobody asked for (measured: SmolLM2 copies the tool's schema into its
arguments). ``"strict": false`` on the format or function keeps the schema as written.
Email addresses and host names keep their standards' length limits (``bounded_formats``).

Limits: a schema is at most ``MAX_SCHEMA_BYTES`` of JSON, nested at most
``MAX_SCHEMA_DEPTH`` levels (objects and arrays).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import jsonschema
import jsonschema.validators

from edge_agent.engine.grammar import (
    GrammarError,
    TokenVocabulary,
    json_schema_grammar,
    lark_grammar,
    lark_json,
)
from edge_agent.serving.protocol import ErrorResult, NamedToolChoice, error
from edge_agent.serving.tool_calls import call_prefix, call_suffix

MAX_SCHEMA_BYTES = 32 * 1024
MAX_SCHEMA_DEPTH = 32
ANY_OBJECT = {"type": "object"}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# Free text in "auto" mode: anything that does not open a tool call.
_TEXT = "TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/"


@dataclass(frozen=True)
class OutputPlan:
    """The grammar (Lark source) a request's output must follow, None for free text; the
    tools to show the model; and how to read its output."""

    grammar: str | None = None
    tools: list[dict] | None = None
    tool_mode: Literal["auto", "required"] | None = None
    # (parameter, schema): each schema in the grammar, to name the one llguidance refuses
    schemas: list[tuple[str, dict]] = field(default_factory=list)


def plan_output(req) -> OutputPlan | ErrorResult:
    """The output plan of a chat or completion request, or the 400 that says what is wrong."""
    if getattr(req, "top_logprobs", None) is not None and not req.logprobs:
        return error(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                     code="invalid_value")
    text_schema, schemas = None, []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        param = "response_format"
        text_schema = ANY_OBJECT
        if fmt.type == "json_schema":
            param, text_schema = "response_format.json_schema.schema", fmt.json_schema.schema_
            problem = check_schema(text_schema, param)
            if problem is not None:
                return problem
            if fmt.json_schema.strict is not False:
                text_schema = closed_objects(text_schema)
            text_schema = bounded_formats(text_schema)
        schemas.append((param, text_schema))
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools and choice != "none":
        return error(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if not tools or choice == "none":
        grammar = None if text_schema is None else f"start: {lark_json(text_schema)}"
        return OutputPlan(grammar=grammar, schemas=schemas)

    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        return error(400, "tools must have distinct function names", param="tools",
                     code="invalid_value")
    chosen = list(range(len(tools)))
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            return error(400, f"tool_choice names {choice.function.name!r}, which is not in "
                         f"tools ({', '.join(names)})", param="tool_choice", code="invalid_value")
        chosen = [names.index(choice.function.name)]
    calls = []
    for i in chosen:
        param = f"tools.{i}.function.parameters"
        arguments = arguments_schema(tools[i].function.parameters)
        problem = check_schema(arguments, param)
        if problem is not None:
            return problem
        if tools[i].function.strict is not False:
            arguments = closed_objects(arguments)
        arguments = bounded_formats(arguments)
        schemas.append((param, arguments))
        calls.append(f"call_{i}: {_literal(call_prefix(names[i]))} {lark_json(arguments)} "
                     f"{_literal(call_suffix())}")
    mode = "auto" if choice == "auto" else "required"
    # One call unless the client asks for parallel calls, as llama.cpp's server defaults: a
    # small model offered more repeats its call until max_tokens (measured with SmolLM2).
    # A named function is called once, as OpenAI does.
    parallel = bool(req.parallel_tool_calls) and not isinstance(choice, NamedToolChoice)
    lines = [
        "start: calls" if mode == "required" else
        ("start: TEXT | calls" if text_schema is None else "start: answer | calls"),
        'calls: call ("\\n" call)*' if parallel else "calls: call",
        "call: " + " | ".join(f"call_{i}" for i in chosen),
        *calls,
    ]
    if mode == "auto":
        lines.append(_TEXT if text_schema is None else f"answer: {lark_json(text_schema)}")
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    return OutputPlan(grammar="\n".join(lines), tools=rendered, tool_mode=mode, schemas=schemas)


def arguments_schema(parameters: dict | None) -> dict:
    """A function's parameters as the schema of its arguments: always a JSON object (OpenAI's
    ``arguments`` is one), no arguments when it declares none."""
    if not parameters:
        return NO_ARGUMENTS
    if "type" not in parameters:
        return {**parameters, "type": "object"}
    return parameters


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def _rewrite(schema: dict, visit) -> dict:
    """A copy of ``schema`` where ``visit(node, in_all_of)`` has changed every subschema (each
    a fresh dict), members of ``allOf`` told so."""
    def walk(node, in_all_of=False):
        if isinstance(node, list):
            return [walk(item, in_all_of) for item in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        visit(out, in_all_of)
        for key in _SCHEMA_LISTS:
            if isinstance(out.get(key), list):
                out[key] = walk(out[key])
        if isinstance(out.get("allOf"), list):
            out["allOf"] = walk(out["allOf"], in_all_of=True)
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(sub) for name, sub in out[key].items()}
        for key in _SCHEMA_VALUES:
            if isinstance(out.get(key), dict):
                out[key] = walk(out[key])
        return out
    return walk(schema)


def closed_objects(schema: dict) -> dict:
    """A copy of ``schema`` whose objects with ``properties`` allow no other keys unless they
    say so. Members of ``allOf`` are left open: closing each would forbid the others' keys."""
    def close(node: dict, in_all_of: bool) -> None:
        if "properties" in node and not in_all_of and not any(k in node for k in _OPEN_KEYS):
            node["additionalProperties"] = False
    return _rewrite(schema, close)


# The length limits the standards put on these formats (RFC 5321 4.5.3.1: a mailbox's local
# part at most 64 octets, the address at most 254 characters; RFC 1035: a host name at most
# 253), which llguidance's format grammars leave out: (maxLength, pattern).
_EMAIL = (254, "^[^@]{1,64}@")
FORMAT_LIMITS = {"email": _EMAIL, "idn-email": _EMAIL, "hostname": (253, None),
                 "idn-hostname": (253, None)}


def bounded_formats(schema: dict) -> dict:
    """A copy of ``schema`` whose email and host name strings keep their standards' length
    limits. Unbounded, a small model that starts an email like a URL never reaches the ``@``
    and writes until max_tokens (measured: SmolLM2, "www.example.com/john-john-..."); bounded,
    the grammar brings the ``@`` within 64 characters. A pattern the schema has is kept."""
    def bound(node: dict, _in_all_of: bool) -> None:
        limits = FORMAT_LIMITS.get(node.get("format"))
        if limits is None:
            return
        length, pattern = limits
        node["maxLength"] = min(node.get("maxLength", length), length)
        if pattern is not None and "pattern" not in node:
            node["pattern"] = pattern
    return _rewrite(schema, bound)


def check_schema(schema, param: str) -> ErrorResult | None:
    """A 400 naming ``param`` if ``schema`` is not a valid JSON Schema within the limits."""
    if not isinstance(schema, dict):
        return error(400, f"{param} must be a JSON Schema object", param=param,
                     code="invalid_schema")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        return error(400, f"{param} is {size} bytes of JSON; this server takes schemas of at "
                     f"most {MAX_SCHEMA_BYTES}", param=param, code="schema_too_large")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        return error(400, f"{param} is nested deeper than {MAX_SCHEMA_DEPTH} levels",
                     param=param, code="schema_too_deep")
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return error(400, f"{param} is not a valid JSON Schema"
                     f"{f' at {where}' if where else ''}: {exc.message}", param=param,
                     code="invalid_schema")
    return None


def compile_output(plan: OutputPlan, vocab: TokenVocabulary):
    """The grammar of ``plan`` compiled for this model (a ``grammar.Constraint``), or a 400
    naming the schema llguidance cannot enforce and why."""
    try:   # compiling is the check: llguidance refuses what it cannot enforce
        return vocab.constraint(lark_grammar(plan.grammar))
    except GrammarError as exc:
        problem = str(exc)
    param = plan.schemas[0][0] if plan.schemas else "tools"
    for name, schema in plan.schemas:  # which schema it is
        try:
            refused = vocab.check(json_schema_grammar(schema))
        except GrammarError as exc:
            refused = str(exc)
        if refused is not None:
            param, problem = name, refused
            break
    return error(400, f"{param} cannot be enforced by this server: {problem}", param=param,
                 code="unsupported_schema")


def _literal(text: str) -> str:
    """A Lark string literal (Lark reads JSON's escapes)."""
    return json.dumps(text)


def _depth(value) -> int:
    """Nesting of objects and arrays, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in
                         (item.values() if isinstance(item, dict) else item))
    return deepest
