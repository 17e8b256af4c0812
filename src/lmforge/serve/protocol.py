"""The OpenAI API's request bodies (pydantic), its error shape, and the response / stream-chunk builders.

Parameters follow OpenAI's names, ranges and defaults. Mapped: temperature (0 = greedy), top_p, n, stop (up to
4 strings, not part of the text), seed (same seed, same output), presence/frequency penalty (OpenAI's additive
formula over the generated tokens), logprobs / top_logprobs (the model's log-probabilities). Rejected with a
clear error: echo, best_of > n, logit_bias, tools.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.serve.engine import Event, SamplingParams

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    def unsupported(self) -> None:
        """Raise APIError for parameters lmforge does not implement (rather than ignoring them silently)."""
        for name in ("logit_bias", "tools", "functions", "tool_choice", "response_format", "suffix"):
            if getattr(self, name, None):
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if getattr(self, "echo", False):
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
        best_of = getattr(self, "best_of", None)
        if best_of is not None and best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_parameter")

    def stops(self) -> tuple[str, ...]:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, f"stop must be up to 4 non-empty strings, got {self.stop!r}", param="stop")
        return stops

    def params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stops(), seed=self.seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logprobs=logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    user: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(events: list[Event]) -> dict[str, Any]:
    """The completions API's logprobs object of one choice."""
    items = [lp for e in events for lp in (e.logprobs or [])]
    return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [dict(lp.top) for lp in items], "text_offset": []}


def chat_logprobs(events: list[Event]) -> dict[str, Any]:
    """The chat API's logprobs object of one choice."""
    items = [lp for e in events for lp in (e.logprobs or [])]
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                          for t, v in lp.top]} for lp in items]}


def completion_choice(index: int, events: list[Event], chat: bool, logprobs: bool) -> dict[str, Any]:
    text = "".join(e.text for e in events)
    finish = next((e.finish_reason for e in events if e.finish_reason), None)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": chat_logprobs(events) if logprobs else None}
    return {"index": index, "text": text, "finish_reason": finish,
            "logprobs": completion_logprobs(events) if logprobs else None}


def response(id_: str, model: str, choices: list[dict[str, Any]], chat: bool, prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id_: str, model: str, created: int, chat: bool, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    out = {"id": id_, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chunk_choice(index: int, event: Event, chat: bool, logprobs: bool, first: bool) -> dict[str, Any]:
    """One choice of a stream chunk for an engine event."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if event.text or first:
            delta["content"] = event.text
        return {"index": index, "delta": delta, "finish_reason": event.finish_reason,
                "logprobs": chat_logprobs([event]) if logprobs else None}
    return {"index": index, "text": event.text, "finish_reason": event.finish_reason,
            "logprobs": completion_logprobs([event]) if logprobs else None}
