"""Fewer MQTT messages for a stream: chunks are merged into one message per batch of tokens
or per time window. Pure: the caller passes the time and publishes what is returned."""

from __future__ import annotations

import copy


def _tokens(chunk: dict) -> int:
    return sum(1 for c in chunk.get("choices") or ()
               if (c.get("delta") or {}).get("content") or (c.get("delta") or {}).get("tool_calls"))


def _merge_tool_calls(into: list[dict], pieces: list[dict]) -> None:
    """Pieces of streamed tool calls folded per call ``index``: the first piece's id, type and
    name, the arguments concatenated (so the calls still reassemble the same way)."""
    for piece in pieces:
        same = next((c for c in into if c.get("index") == piece.get("index")), None)
        if same is None:
            into.append(copy.deepcopy(piece))
            continue
        arguments = (piece.get("function") or {}).get("arguments")
        if arguments:
            function = same.setdefault("function", {})
            function["arguments"] = function.get("arguments", "") + arguments


def merge_chunks(chunks: list[dict]) -> dict:
    """Fold consecutive ``chat.completion.chunk`` dicts into one: contents and tool-call
    arguments concatenated per choice, the first role, the last finish_reason, the last
    non-null usage."""
    out = copy.deepcopy(chunks[0])
    out.pop("usage", None)
    by_index: dict[int, dict] = {}
    order: list[int] = []
    usage = None
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            idx = choice.get("index", 0)
            if idx not in by_index:
                by_index[idx] = {"index": idx, "delta": {}, "finish_reason": None}
                order.append(idx)
            acc = by_index[idx]
            delta = choice.get("delta") or {}
            for key, value in delta.items():
                if key == "content" and isinstance(value, str):
                    acc["delta"]["content"] = acc["delta"].get("content", "") + value
                elif key == "tool_calls" and isinstance(value, list):
                    _merge_tool_calls(acc["delta"].setdefault("tool_calls", []), value)
                elif value is not None and key not in acc["delta"]:
                    acc["delta"][key] = value
            if choice.get("finish_reason") is not None:
                acc["finish_reason"] = choice["finish_reason"]
            if choice.get("logprobs") is not None:
                acc.setdefault("logprobs", {"content": []})["content"].extend(
                    choice["logprobs"].get("content") or [])
    out["choices"] = [by_index[i] for i in order]
    if usage is not None:
        out["usage"] = usage
    return out


class ChunkCoalescer:
    """Decides when streamed chunks become an MQTT message. The first text goes out at once
    (time to first token is what a user feels); after that, a message every ``max_tokens``
    tokens or ``max_delay`` seconds after the oldest unsent chunk, whichever comes first. From
    the first chunk with a finish_reason on, everything is held for one final message (with
    usage).

    Pure: the caller passes the time and publishes what is returned.
    """

    def __init__(self, max_tokens: int, max_delay: float):
        self.max_tokens = max(1, max_tokens)
        self.max_delay = max(0.0, max_delay)
        self._pending: list[dict] = []
        self._tokens = 0
        self._since: float | None = None
        self._finishing = False
        self._template: dict | None = None   # id, model, created of the stream
        self._first_text_sent = False

    def add(self, chunk: dict, now: float) -> dict | None:
        """Take one chunk; return a message to send now, if one is due."""
        if self._since is None:
            self._since = now
        if self._template is None:
            self._template = {k: chunk[k] for k in ("id", "object", "created", "model")
                              if k in chunk}
        self._pending.append(chunk)
        self._tokens += _tokens(chunk)
        if any(c.get("finish_reason") is not None for c in chunk.get("choices") or ()):
            self._finishing = True
        if self._finishing:
            return None
        if self._tokens and not self._first_text_sent:
            self._first_text_sent = True
            return self._take()
        if self._tokens >= self.max_tokens or self.due(now):
            return self._take()
        return None

    def deadline(self) -> float | None:
        """When the pending chunks must go out even if no more arrive (None: nothing waits)."""
        if self._since is None or self._finishing:
            return None
        return self._since + self.max_delay

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def flush(self) -> dict | None:
        """What is pending, as one message (None if nothing is)."""
        return self._take() if self._pending else None

    def finish(self, usage: dict | None = None) -> dict | None:
        """The stream ended: the final message, carrying usage (always non-null, so that
        ``is_final`` recognises it). None only if the stream never produced a chunk."""
        if self._pending:
            final = self._take()
        elif self._template is not None:
            final = {**self._template, "choices": []}
        else:
            return None
        if final.get("usage") is None:
            final["usage"] = usage or {}
        return final

    def _take(self) -> dict:
        merged = merge_chunks(self._pending)
        self._pending, self._tokens, self._since = [], 0, None
        return merged
