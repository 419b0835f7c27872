"""Structured outputs, tools, logprobs and ``n`` on the real SmolLM2-135M int4 bundle, driven
by clients nobody here wrote: the official ``openai`` client (directly and through the
router), LangChain's ``ChatOpenAI`` through the router, and a device over MQTT.

Real processes: the embedded registry, an agent (also on a real Mosquitto) and the router.
The validity suite sends ``tests/data/structured_schemas.json`` (69 schemas of real-world
shapes) and checks every answer with ``jsonschema``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from edge_agent.mqtt.contract import AGENT_USER, answer_text
from edge_agent.mqtt.device_client import MqttChatClient
from tests.e2e.agent_support import agent_behind_router
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.smollm2, pytest.mark.timeout(600)]

CASES = json.loads((Path(__file__).parents[1] / "data" / "structured_schemas.json").read_text())
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), locked=True) as b:
        yield b


@pytest.fixture(scope="module")
def stack(smollm2_int4_bundle, broker, tmp_path_factory):
    with agent_behind_router(tmp_path_factory.mktemp("structured"), smollm2_int4_bundle, "smol",
                             "--max-concurrency", "4", "--mqtt", broker.url,
                             "--mqtt-username", AGENT_USER, threads=2,
                             env={"EDGEGEN_MQTT_PASSWORD": broker.creds.agent_password()}) as s:
        yield s


@pytest.fixture(scope="module")
def model(smollm2_int4_bundle):
    return smollm2_int4_bundle.name


@pytest.fixture(scope="module", params=["agent", "router"])
def client(request, stack):
    url = stack.agent_url if request.param == "agent" else stack.router_url
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="module")
def router_client(stack):
    return openai.OpenAI(base_url=stack.router_url + "/v1", api_key="unused", timeout=300)


def test_parse_returns_a_parsed_object(client, model):
    r = client.chat.completions.parse(
        model=model, temperature=0, max_tokens=60, response_format=City,
        messages=[{"role": "user", "content": "What is the capital of Italy? Answer in JSON."}])
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.country


def test_json_object_answers_parse(client, model):
    for question in ("Describe a cat as a JSON object.", "Describe a dog as a JSON object."):
        r = client.chat.completions.create(
            model=model, temperature=0, max_tokens=120, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": question}])
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def streamed_calls(stream) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or piece.id
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice, name", [
    ("required", "get_weather"),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
])
def test_tool_calls_streamed_reassemble_to_the_non_streamed_call(client, model, choice, name):
    kwargs = dict(model=model, temperature=0, max_tokens=80, messages=ASK_WEATHER,
                  tools=[WEATHER, CLOCK], tool_choice=choice)
    r = client.chat.completions.create(**kwargs)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == name
    spec = WEATHER if name == "get_weather" else CLOCK
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    streamed, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [(name, call.function.arguments)]
    assert streamed[0]["id"].startswith("call_")


def test_a_tool_result_goes_back_to_the_model(client, model):
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=80,
                                       messages=ASK_WEATHER, tools=[WEATHER],
                                       tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    follow = client.chat.completions.create(
        model=model, temperature=0, max_tokens=40, tools=[WEATHER],
        messages=[*ASK_WEATHER, r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}])
    assert follow.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_logprobs_in_openai_shapes(client, model):
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3, messages=ASK_WEATHER)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # greedy: the chosen token is the likeliest
    assert all(t.top_logprobs[0].token == t.token for t in content)
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.top_logprobs) == len(lp.tokens)


def test_n_choices_sampled_with_a_seed(client, model):
    question = [{"role": "user", "content": "Name an animal."}]
    one = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                         messages=question)
    r = client.chat.completions.create(model=model, max_tokens=12, temperature=1.0, seed=11, n=3,
                                       messages=question)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens          # counted once
    assert 3 <= r.usage.completion_tokens <= 36


def test_langchain_structured_output_in_each_method(stack, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=stack.router_url + "/v1", api_key="unused", model=model,
                     temperature=0, max_tokens=100, timeout=300)
    city = [("user", "What is the capital of Italy? Answer in JSON.")]
    assert isinstance(llm.with_structured_output(City, method="json_schema").invoke(city), City)
    assert isinstance(llm.with_structured_output(City, method="function_calling").invoke(city),
                      City)
    # json_mode sends no schema: the prompt names the keys, as LangChain's docs ask
    person = llm.with_structured_output(Person, method="json_mode").invoke([
        ("system", 'Reply with a JSON object with the keys "name" and "age".'),
        ("user", "Bob is 42 years old.")])
    assert person == Person(name="Bob", age=42)


def test_langchain_bind_tools_returns_a_tool_call(stack, model):
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=stack.router_url + "/v1", api_key="unused", model=model,
                     temperature=0, max_tokens=100, timeout=300)
    for choice in ("any", "get_weather"):
        message = llm.bind_tools([get_weather], tool_choice=choice).invoke(
            "What is the weather in Paris?")
        [call] = message.tool_calls
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


def answer(case: dict, url: str) -> tuple[str, dict]:
    # 600 tokens: the longest answer (five attendees with digit-heavy emails, a digit per
    # token) needs about 400
    body = {"model": "smollm2-int4", "temperature": 0, "max_tokens": 600,
            "messages": [{"role": "user", "content": case["prompt"]}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": case["name"][:64], "schema": case["schema"], "strict": True}}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return case["name"], r.json()["choices"][0]


def test_the_validity_suite(stack):
    """Every answer finishes, parses and validates against its schema (formats too)."""
    with ThreadPoolExecutor(4) as pool:   # decoded together: masks per sequence in a batch
        answers = list(pool.map(lambda c: answer(c, stack.router_url), CASES))
    assert len(CASES) >= 50
    for case, (name, choice) in zip(CASES, answers):
        assert choice["finish_reason"] == "stop", (name, choice["message"]["content"][-200:])
        value = json.loads(choice["message"]["content"])
        jsonschema.Draft202012Validator(case["schema"], format_checker=jsonschema.FormatChecker()
                                        ).validate(value)
    print(f"validity suite: {len(CASES)}/{len(CASES)} answers finished and valid")


def test_concurrent_sampled_requests_each_follow_their_own_schema(stack):
    cases = CASES[:8]
    bodies = [{"messages": [{"role": "user", "content": c["prompt"]}], "temperature": 0.7,
               "seed": i, "max_tokens": 300, "n": 2, "response_format": {
                   "type": "json_schema", "json_schema": {"name": "s", "schema": c["schema"]}}}
              for i, c in enumerate(cases)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: httpx.post(stack.agent_url + "/v1/chat/completions",
                                                     json=b, timeout=300).json(), bodies))
    for case, result in zip(cases, results):
        for choice in result["choices"]:
            if choice["finish_reason"] == "stop":
                jsonschema.validate(json.loads(choice["message"]["content"]), case["schema"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_device_gets_the_json_object_over_mqtt(stack, broker, stream):
    with MqttChatClient(broker.url, **broker.device_login()) as device:
        for case in CASES[:3]:
            body = {"messages": [{"role": "user", "content": case["prompt"]}], "temperature": 0,
                    "max_tokens": 300, "stream": stream, "response_format": {
                        "type": "json_schema", "json_schema": {"name": "s",
                                                               "schema": case["schema"]}}}
            replies = list(device.chat(body, node="smol", timeout=300))
            text = "".join(answer_text(r) for r in replies)
            jsonschema.validate(json.loads(text), case["schema"])
            assert text == answer(case, stack.agent_url)[1]["message"]["content"]
