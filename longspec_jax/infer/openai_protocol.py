"""The OpenAI wire format the server speaks: request bodies (validated, unknown fields refused),
error bodies, and response / stream chunk builders for `/v1/completions` and `/v1/chat/completions`
(and vLLM's `/tokenize` and `/detokenize` bodies).

Fields follow OpenAI's API plus the extensions clients of vLLM and SGLang send (`top_k`,
`ignore_eos`, `stop_token_ids`) and `session_id` (pin an agent's context to a slot). Fields that
would change what is sampled and are not implemented (`logprobs`, penalties, `echo`, `best_of`,
`logit_bias`, tools) are refused with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=-1)  # -1 or 0: off (vLLM uses -1)
    n: StrictInt = Field(default=1, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    session_id: str | None = None
    return_token_ids: bool = False  # vLLM's extension: choices carry the generated token ids
    # Not implemented: accepted only at the value that changes nothing.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    def refuse_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server; leave it out or set it to 0", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(self.stop)}", param="stop")

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self):
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", param="echo")
        if self.best_of not in (None, 1) or self.suffix:
            raise ApiError(400, "best_of and suffix are not supported by this server", param="best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through to the chat template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ApiError(400, f"message content of type {part.get('type')!r} is not supported (text only)",
                                   param="messages")
                parts.append(part.get("text", ""))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def refuse_unsupported(self):
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "response_format other than text is not supported", param="response_format")


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` body: a prompt as `/v1/completions` encodes it, or chat messages as
    `/v1/chat/completions` renders them (so an agent can count what its next turn will cost)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn, as the chat endpoint does

    def check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send either prompt (text) or messages (a chat), not both or neither",
                           param="prompt" if self.prompt is not None else "messages")


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize` body: token ids to decode."""

    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[StrictInt]


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 naming the first invalid field (pydantic's errors), as OpenAI answers."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", param=None)
    return ApiError(400, f"invalid value for {param}: {first.get('msg', 'invalid')}", param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


FINISH_REASONS = {"eos": "stop", "max_new_tokens": "length", "cache_full": "length", "stop_string": "stop",
                  "cancelled": "abort", "error": "error"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _ids(c: dict) -> dict:
    return {"token_ids": c["token_ids"]} if c.get("token_ids") is not None else {}


def completion_body(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"], **_ids(c)} for c in choices], "usage": usage_}


def chat_body(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"], **_ids(c)} for c in choices],
            "usage": usage_}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     usage_: dict | None = None, token_ids: list | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                         **_ids({"token_ids": token_ids})}], "usage": usage_}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               usage_: dict | None = None, token_ids: list | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                         **_ids({"token_ids": token_ids})}], "usage": usage_}


def usage_chunk(rid: str, model: str, obj: str, usage_: dict) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage_}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"
