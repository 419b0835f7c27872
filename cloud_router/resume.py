"""Continuing a chat stream on another endpoint when the edge serving it dies mid-way.

Pure logic on plain data, no I/O: the forwarder feeds a ``Transcript`` every whole SSE event
it passes to the client, and, when the upstream breaks, sends the next endpoint the request
``continuation`` makes and passes that endpoint's events through ``rewrite``. Two ways on:

- **replay**, for a greedy or seeded request, whose text is a function of the request: the
  next endpoint generates the answer again from the start, and the text the client already
  has is checked against it and cut away. The client gets exactly the text, ``finish_reason``
  and usage of an uninterrupted run; it waits while the next endpoint catches up (decode
  steps, not a prefill: a prefill of the partial answer computes the same logits in another
  order, and near-ties then go the other way; measured on SmolLM2 int4).
- **continue**, for a sampled request without a seed, which no replay would reproduce: the
  agent continues the assistant message the client has (vLLM's ``continue_final_message``)
  with ``RESUME_HEADER``, which makes it count that message's tokens as this request's own,
  so the budget (``max_tokens``) and the usage are those of one generation.

Either way ``rewrite`` drops the new stream's opening role chunk (the client has one) and
gives every chunk the id and ``created`` of the first stream: the client sees one stream.

Only plain-text streams of one choice are resumed: a tool call or a constrained (JSON) answer
would need its parser or grammar state carried over, ``n`` > 1 interleaves choices, and a
replay's chunks may cut tokens otherwise than the first stream did, so their logprobs would
repeat some the client already has.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

RESUME_HEADER = "x-edgegen-resume"   # the wire contract with the agent (same copy there)
CHAT_PATH = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def resumable(path: str, payload: Any) -> bool:
    """Whether a broken stream of this request may be continued elsewhere."""
    if path != CHAT_PATH or not isinstance(payload, dict) or payload.get("stream") is not True:
        return False
    fmt = payload.get("response_format")
    return (payload.get("n") in (None, 1) and not payload.get("tools")
            and not payload.get("logprobs")
            and (fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"))
            and isinstance(payload.get("messages"), list))


def split_events(block: bytes) -> list[bytes]:
    """The whole SSE events of ``block`` (which ends at an event's end), each with its end."""
    events, start = [], 0
    for m in _EVENT_END.finditer(block):
        events.append(block[start:m.end()])
        start = m.end()
    return events


def _data(event: bytes) -> bytes:
    return b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                      if line.startswith(b"data:"))


class Diverged(Exception):
    """A replay wrote other text than the client already has: the stream cannot go on."""


def replays_exactly(payload: dict) -> bool:
    """Greedy (temperature 0) or seeded: generating again gives the same text."""
    temperature, seed = payload.get("temperature"), payload.get("seed")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) \
        and math.isfinite(temperature) and temperature == 0
    return greedy or (isinstance(seed, int) and not isinstance(seed, bool))


class Transcript:
    """What the client has been sent of one streamed chat completion."""

    def __init__(self, payload: dict):
        self.payload = payload
        self.replay = replays_exactly(payload)
        self.id: str | None = None
        self.created: int | None = None
        self.pieces: list[str] = []
        self.finished = False      # a chunk with a finish_reason went out
        self.done = False          # ``[DONE]`` went out
        self.migrations = 0
        self._skip = ""            # what a replay must write before the client sees more

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def record(self, event: bytes) -> None:
        """Note one event the client is sent."""
        chunk = self._chunk(event)
        if chunk is None:
            return
        if self.id is None:
            self.id, self.created = chunk.get("id"), chunk.get("created")
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.pieces.append(delta["content"])
            if choice.get("finish_reason"):
                self.finished = True

    def _chunk(self, event: bytes) -> dict | None:
        """The event's JSON object, if it holds one (noting ``[DONE]``)."""
        data = _data(event)
        if data == b"[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        return chunk if isinstance(chunk, dict) else None

    def continuation(self) -> tuple[dict, dict[str, str]]:
        """The body, and the extra headers, that continue this stream on another endpoint."""
        text = self.text
        if self.replay or not text:   # the whole request again (nothing went out: no skip)
            self._skip = text
            return self.payload, {}
        messages = list(self.payload["messages"])
        if self.payload.get("continue_final_message"):   # the client was continuing one
            last = dict(messages[-1])
            last["content"] = (last.get("content") or "") + text
            messages[-1] = last
        else:
            messages.append({"role": "assistant", "content": text})
        self._skip = ""
        return {**self.payload, "messages": messages, "continue_final_message": True,
                "add_generation_prompt": False}, {RESUME_HEADER: "1"}

    def rewrite(self, event: bytes) -> bytes:
        """A continuation's event as part of the client's stream (b"" to drop it)."""
        chunk = self._chunk(event)
        if chunk is None or "choices" not in chunk:
            return event   # [DONE], an error event: as it is
        if _opens_message(chunk):
            return b""
        if self._skip and not self._replayed(chunk):
            return b""
        chunk["id"], chunk["created"] = self.id, self.created
        out = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        self.record(out)
        return out


    def _replayed(self, chunk: dict) -> bool:
        """Cut from a replayed chunk the text the client already has (``Diverged`` if it
        differs); whether anything of the chunk is left to send."""
        choices = chunk.get("choices") or [{}]
        delta = choices[0].get("delta") or {}
        content = delta.get("content") or ""
        n = min(len(content), len(self._skip))
        if content[:n] != self._skip[:n]:
            raise Diverged(f"the replay wrote {content[:n]!r} where the client has "
                           f"{self._skip[:n]!r}")
        self._skip = self._skip[n:]
        if n:
            delta["content"] = content[n:]
        ends = bool(choices[0].get("finish_reason")) or not chunk.get("choices")
        if self._skip and ends:
            raise Diverged("the replay ended before it wrote what the client has")
        return ends or bool(delta.get("content"))


def _opens_message(chunk: dict) -> bool:
    """The role chunk a stream starts with: a role and no text."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta") or {}
    return bool(delta.get("role")) and not delta.get("content") and not delta.get("tool_calls") \
        and not choices[0].get("finish_reason")
