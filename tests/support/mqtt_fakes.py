"""A fake OpenAI serving object with the real one's signature, and a helper that runs an
``MqttBridge`` on its own event loop in a thread, so synchronous tests can talk to it over a
real broker."""

from __future__ import annotations

import asyncio
import threading
import time

from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.bridge import MqttBridge
from edge_agent.serving.protocol import ErrorResult, error
from edge_agent.settings import AgentSettings


def rate_limited() -> ErrorResult:
    return error(429, "the agent's queue is full, retry later", code="rate_limited",
                 headers={"Retry-After": "1"})


class FakeServing:
    """Answers with the words of the last user message, one chunk per word.

    ``gate`` (a threading.Event) holds every request until set; ``full`` answers every request
    with the rate-limited error value; ``received`` counts requests that reached serving.
    Model "unknown" is a 404 error value, model "crash" raises; the word FAIL in a streamed
    answer ends the stream with an error chunk.
    """

    def __init__(self, *, gate: threading.Event | None = None, token_delay: float = 0.0):
        self.gate = gate
        self.token_delay = token_delay
        self.full = False
        self.received = 0
        self.calls: list[tuple[dict, str]] = []
        self.metrics = AgentMetrics()     # the bridge registers its metrics here, as in the agent

    async def create_chat_completion(self, body: dict, *, source: str = "rest"):
        self.received += 1
        self.calls.append((body, source))
        if self.full:
            return rate_limited()
        if body.get("model") == "crash":
            raise RuntimeError("a bug in serving")
        if body.get("model") == "unknown":
            return error(404, "model 'unknown' is not served here", param="model",
                         code="model_not_found")
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.01)
        words = str(body["messages"][-1].get("content", "")).split()
        usage = {"prompt_tokens": 3, "completion_tokens": len(words),
                 "total_tokens": 3 + len(words)}
        if body.get("stream"):
            return self._stream(words, usage, body.get("stream_options") or {})
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": "fake", "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": " ".join(words)}}],
                "usage": usage}

    async def _stream(self, words, usage, options):
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": "fake"}
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
        for i, word in enumerate(words):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            if word == "FAIL":       # a failure after the stream began, as serving reports it
                yield error(500, "generation failed: boom").body
                return
            text = word if i == 0 else " " + word
            yield {**base, "choices": [{"index": 0, "delta": {"content": text},
                                        "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if options.get("include_usage"):
            yield {**base, "choices": [], "usage": usage}


class BridgeThread:
    """An MqttBridge on an event loop of its own thread; ``stop()`` stops both."""

    def __init__(self, settings: AgentSettings, serving, **bridge_kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.bridge = MqttBridge(settings, serving, **bridge_kwargs)
        self.call(self.bridge.start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def metric(self, name: str, **labels) -> float | None:
        return self.bridge.metrics.registry.get_sample_value(name, labels)

    def requests(self, status: str) -> float:
        return self.bridge.metrics.value(status)

    def wait_connected(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.bridge.subscribed:
            if time.monotonic() > deadline:
                raise TimeoutError("the MQTT bridge did not connect and subscribe")
            time.sleep(0.02)

    def stop(self) -> None:
        try:
            self.call(self.bridge.stop(timeout=5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
