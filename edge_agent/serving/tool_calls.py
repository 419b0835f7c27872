"""Tool calls in text: how tools and calls are shown to the model, and how its calls are read
back, as they stream.

The model writes each call as JSON inside tags, one per line-delimited block (the format of
Hermes, Qwen and most open tool-calling models)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The grammar (``structured``) holds the model to exactly this, so ``ToolCallParser`` can read
calls while they stream: a call's ``id`` and name as soon as its name is complete, then its
arguments in pieces, byte for byte as the model writes them. The non-streamed response runs
the same parser over the same text, so its calls are exactly what the pieces reassemble to.

Prompts: a bundle whose chat template reads ``tools`` gets the tools, the assistant's
``tool_calls`` and the ``tool`` messages as transformers passes them. Other templates get
the default format: the tools described in the system message, earlier calls written into
the assistant's text as above, and tool results as a user message in
``<tool_response></tool_response>`` tags.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN = "<tool_call>\n"
CLOSE = "\n</tool_call>"
_HEAD = re.compile(r'<tool_call>\n\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')

DEFAULT_TOOLS_PROMPT = """\
You can call functions to answer. Their definitions, one JSON object per line, are inside \
<tools></tools>:
<tools>
{tools}
</tools>
To call a function, write one JSON object per call inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""


def call_prefix(name: str) -> str:
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": '


def call_suffix() -> str:
    return "}" + CLOSE


def call_text(name: str, arguments: str) -> str:
    return call_prefix(name) + arguments + call_suffix()


# --- prompts ---------------------------------------------------------------------------------

class ConversationError(ValueError):
    """A conversation whose tool messages do not fit together; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def template_reads_tools(source: str) -> bool:
    return "tools" in source and "tool_calls" in source


def prompt_messages(messages: list, tools: list[dict] | None, native: bool) -> list[dict]:
    """The request's messages (protocol ``ChatMessage``) as the chat template reads them:
    ``native`` templates read tools and calls themselves, others get the default format."""
    seen: set[str] = set()
    out: list[dict] = []
    for i, message in enumerate(messages):
        text = message.text()
        if message.role == "tool":
            if message.tool_call_id not in seen:
                raise ConversationError(
                    f"messages[{i}] is a tool result for {message.tool_call_id!r}, which no "
                    "earlier assistant message called", f"messages.{i}.tool_call_id")
            if native:
                out.append({"role": "tool", "content": text,
                            "tool_call_id": message.tool_call_id})
            else:
                response = f"<tool_response>\n{text}\n</tool_response>"
                if i and messages[i - 1].role == "tool":  # one user turn per batch of results
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response})
            continue
        entry = {"role": message.role, "content": text}
        if message.role == "assistant" and message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                seen.add(call.id)
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise ConversationError(
                        f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                        f"messages.{i}.tool_calls.{j}.function.arguments") from None
                calls.append((call, arguments))
            if native:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": a}} for c, a in calls]
            else:
                written = "\n".join(call_text(c.function.name, json.dumps(a)) for c, a in calls)
                entry["content"] = f"{text}\n{written}" if text else written
        out.append(entry)
    if tools and not native:
        described = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


# --- reading calls back ----------------------------------------------------------------------

@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Event = str | CallStart | CallArguments   # str: content text


class ToolCallParser:
    """Splits a choice's text, as it streams, into content and tool calls.

    In ``auto`` mode the text is either an answer or calls, decided by whether it opens with
    ``<tool_call>``; in ``required`` mode it is calls."""

    def __init__(self, mode: str):
        self.state = "undecided" if mode == "auto" else "head"
        self.buffer = ""
        self.calls: list[list[str]] = []   # [id, name, arguments]
        self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while self.buffer and self._advance(out):
            pass
        return out

    def finish(self) -> list[Event]:
        """What is left when the text ends: text that never became a call is content."""
        out = self.feed("")
        if self.buffer and self.state in ("undecided", "head", "content"):
            out.append(self.buffer)
        self.buffer = ""
        return out

    def _advance(self, out: list[Event]) -> bool:
        """One move of the state machine; False when it needs more text."""
        buf = self.buffer
        if self.state == "undecided":
            if buf.startswith(OPEN[:len(buf)]) and len(buf) < len(OPEN):
                return False
            self.state = "head" if buf.startswith(OPEN) else "content"
            return True
        if self.state == "content":
            out.append(buf)
            self.buffer = ""
            return False
        if self.state == "head":
            match = _HEAD.match(buf)
            if match is None:
                return False
            call = [f"call_{uuid.uuid4().hex[:24]}", match.group(1), ""]
            self.calls.append(call)
            out.append(CallStart(len(self.calls) - 1, call[0], call[1]))
            self.buffer = buf[match.end():]
            self.state, self._depth = "arguments", 0
            return True
        if self.state == "arguments":
            end = self._scan(buf)
            piece = buf if end is None else buf[:end]
            if piece:
                self.calls[-1][2] += piece
                out.append(CallArguments(len(self.calls) - 1, piece))
            self.buffer = "" if end is None else buf[end:]
            if end is None:
                return False
            self.state = "tail"
            return True
        if self.state == "tail":
            return self._expect(call_suffix(), "between")
        return self._expect("\n" + OPEN, "head", keep=OPEN)  # between calls

    def _expect(self, text: str, then: str, keep: str = "") -> bool:
        buf = self.buffer
        if buf.startswith(text):
            self.buffer = keep + buf[len(text):]
            self.state = then
            return True
        if text.startswith(buf):
            return False
        self.state = "content"  # not the format: only possible without a grammar
        return True

    def _scan(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in ``text`` (None: not yet)."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None
