"""A response's choices as they are generated, and the response and chunks built from them.

A choice reads its sequence's text as content or, when the request offered tools, as tool
calls (``tool_calls.ToolCallParser``); it keeps the logprobs of its tokens in OpenAI's
shapes. ``RequestMeta`` builds the whole response (non-streamed) and each stream chunk from
choices, so both carry exactly the same content, calls and logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.engine.base import TokenLogprob
from edge_agent.engine.grammar import TokenVocabulary
from edge_agent.serving.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    PromptTokensDetails,
    TokenLogprobInfo,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
    dump_chunk,
)
from edge_agent.serving.tool_calls import CallStart, ToolCallParser


class Outcome:
    """What a choice's generation learnt by its end: finish reason, tokens, error."""

    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Piece:
    """Text a choice's sequence produced, with the logprobs of the tokens that made it."""

    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Delta:
    """What one piece adds to a choice, ready for a chunk."""

    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.logprobs)


class ChoiceOutput:
    """One choice: its content, tool calls and logprobs so far."""

    def __init__(self, index: int, parser: ToolCallParser | None,
                 vocab: TokenVocabulary | None):
        self.index = index
        self.parser = parser
        self.vocab = vocab
        self.content: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.outcome: Outcome | None = None
        self.text_offset = 0   # where a completion stream's next token starts

    def read(self, piece: Piece) -> Delta:
        events = self.parser.feed(piece.text) if self.parser else [piece.text]
        self.logprobs.extend(piece.logprobs)
        return self._delta(events, piece.logprobs)

    def end(self, outcome: Outcome) -> Delta:
        """The choice is done: what the parser still held."""
        self.outcome = outcome
        return self._delta(self.parser.finish() if self.parser else [], [])

    @property
    def finish_reason(self) -> str | None:
        reason = self.outcome.finish_reason if self.outcome else None
        if reason == "stop" and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return reason

    def message(self) -> AssistantMessage:
        calls = None
        if self.parser is not None and self.parser.calls:
            calls = [ToolCallOut(id=i, function=FunctionCallOut(name=n, arguments=a))
                     for i, n, a in self.parser.calls]
        text = "".join(self.content)
        return AssistantMessage(content=text if text or not calls else None, tool_calls=calls)

    def _delta(self, events: list, logprobs: list[TokenLogprob]) -> Delta:
        delta = Delta(logprobs=logprobs or None)
        for event in events:
            if isinstance(event, str):
                if event:
                    self.content.append(event)
                    delta.content = (delta.content or "") + event
                continue
            call = (DeltaToolCall(index=event.index, id=event.id, type="function",
                                  function=DeltaFunction(name=event.name, arguments=""))
                    if isinstance(event, CallStart) else
                    DeltaToolCall(index=event.index, function=DeltaFunction(arguments=event.text)))
            delta.tool_calls = [*(delta.tool_calls or []), call]
        return delta

    # -- logprobs in OpenAI's shapes ---------------------------------------------------------

    def chat_logprobs(self, logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if logprobs is None:
            return None
        return ChoiceLogprobs(content=[TokenLogprobInfo(
            **self._top(lp.token_id, lp.logprob),
            top_logprobs=[TopLogprob(**self._top(t, v)) for t, v in lp.top]) for lp in logprobs])

    def completion_logprobs(self, logprobs: list[TokenLogprob] | None, offset: int
                            ) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        tokens = [self.vocab.token_text(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self.vocab.token_text(t): v for t, v in lp.top} for lp in logprobs],
            text_offset=offsets)

    def _top(self, token_id: int, logprob: float) -> dict:
        return {"token": self.vocab.token_text(token_id), "logprob": logprob,
                "bytes": list(self.vocab.token_bytes(token_id))}


@dataclass
class RequestMeta:
    endpoint: str
    id: str
    created: int
    model: str
    prompt_tokens: int
    started: float
    chat: bool
    logprobs: bool = False
    continued: int = 0   # tokens generated earlier, elsewhere (a resumed stream)

    def usage(self, outcomes: list[Outcome]) -> UsageInfo:
        """The prompt counts once, as OpenAI counts it; generated tokens of every choice."""
        completion = self.continued + sum(o.completion_tokens for o in outcomes)
        return UsageInfo(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=outcomes[0].cached_tokens))

    def envelope(self) -> dict:
        """The fields every response object and chunk of this request shares."""
        return {"id": self.id, "created": self.created, "model": self.model}

    def response(self, choices: list[ChoiceOutput]) -> dict:
        usage = self.usage([c.outcome for c in choices])
        logprobs = [c.logprobs if self.logprobs else None for c in choices]
        if self.chat:
            return ChatCompletionResponse(**self.envelope(), usage=usage, choices=[
                ChatCompletionChoice(index=c.index, message=c.message(),
                                     logprobs=c.chat_logprobs(lp), finish_reason=c.finish_reason)
                for c, lp in zip(choices, logprobs)]).model_dump()
        return CompletionResponse(**self.envelope(), usage=usage, choices=[
            CompletionChoice(index=c.index, text="".join(c.content),
                             logprobs=c.completion_logprobs(lp, 0), finish_reason=c.finish_reason)
            for c, lp in zip(choices, logprobs)]).model_dump()

    def chunk(self, choice: ChoiceOutput, delta: Delta, finish: str | None, with_usage: bool,
              *, role: bool = False) -> dict:
        logprobs = delta.logprobs if self.logprobs else None
        if self.chat:
            message = DeltaMessage(role="assistant" if role else None, content=delta.content,
                                   tool_calls=delta.tool_calls)
            chunk = ChatCompletionChunk(**self.envelope(), choices=[ChatCompletionStreamChoice(
                index=choice.index, delta=message, finish_reason=finish,
                logprobs=choice.chat_logprobs(logprobs))])
        else:
            shaped = choice.completion_logprobs(logprobs, choice.text_offset)
            if shaped is not None and shaped.tokens:
                choice.text_offset = shaped.text_offset[-1] + len(shaped.tokens[-1])
            chunk = CompletionResponse(**self.envelope(), choices=[CompletionChoice(
                index=choice.index, text=delta.content or "", finish_reason=finish,
                logprobs=shaped)])
        return dump_chunk(chunk, with_usage)

    def usage_chunk(self, outcomes: list[Outcome]) -> dict:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return dump_chunk(cls(**self.envelope(), choices=[], usage=self.usage(outcomes)), True)
