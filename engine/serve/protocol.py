"""OpenAI's request and response shapes, and the checks that turn a request into a Job's arguments.

Requests are pydantic models (FastAPI validates the body against them); unknown fields are
ignored, as OpenAI's own server ignores fields it does not know of an older client. What the
schema cannot say (n > 1, a prompt longer than the context, a stop string that is empty) is checked
by `generation_args`, which raises ApiError: app.py turns every one into OpenAI's error body,
{"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.sampling import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: status, message, type, param (the field at fault), code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # null is accepted wherever OpenAI's API allows it, and means the default
    model: str | None = None  # one model is served: any name is accepted, as llama-server does
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # what newer OpenAI clients send for chat
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # default 1.0 (OpenAI's); 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # default 1.0 (OpenAI's): off
    top_k: int | None = Field(None, ge=0)  # llama-server's extensions, default the engine's (40, 0.05, 1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Union[str, list[str], None] = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    # asked for, but not what this server does: refused rather than silently ignored
    logprobs: Union[bool, int, None] = None
    tools: list | None = None


_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=40, min_p=0.05, repeat_penalty=1.0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[int]]


def message_text(m: ChatMessage, i: int) -> str:
    """A message's content as text: a string, or OpenAI's list of parts of which only text ones are read."""
    if isinstance(m.content, str) or m.content is None:
        return m.content or ""
    texts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported, got type "
                                f"{part.get('type')!r}", param=f"messages[{i}].content")
        texts.append(part["text"])
    return "".join(texts)


def generation_args(req: _Request, n_prompt: int, n_ctx: int, default_max: int) -> dict:
    """The Job's max_tokens, stop and sampling for req, whose prompt is n_prompt tokens on a model
    of n_ctx; default_max: max_tokens when the request gives none (None: what the context leaves)."""
    if req.n not in (None, 1):
        raise ApiError(400, f"n must be 1 (this server generates one choice per request), got {req.n}", param="n")
    if req.logprobs:
        raise ApiError(400, f"logprobs are not supported by this server, got logprobs={req.logprobs!r}", param="logprobs")
    if req.tools:
        raise ApiError(400, f"tools are not supported by this server (got {len(req.tools)})", param="tools")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, f"stop must be up to 4 non-empty strings, got {req.stop!r}", param="stop")
    room = n_ctx - n_prompt
    if room <= 0:
        raise ApiError(400, f"the prompt is {n_prompt} tokens: this model's context of {n_ctx} tokens leaves no room "
                            f"for a reply (serve -c/--ctx-size sets it); shorten the prompt", param="messages"
                       if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = asked if asked is not None else min(default_max or room, room)
    if n_prompt + max_tokens > n_ctx:
        raise ApiError(400, f"this model's context is {n_ctx} tokens, but {n_prompt + max_tokens} were asked for "
                            f"({n_prompt} in the prompt, max_tokens {max_tokens}): at most {room} can be generated",
                       param="max_tokens", code="context_length_exceeded")
    sampling = {k: d if getattr(req, k) is None else getattr(req, k) for k, d in _DEFAULTS.items()}
    sampling["seed"] = req.seed
    try:
        SamplingParams(**sampling)  # the engine's own checks, before the request waits in the queue
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None
    return dict(max_tokens=max_tokens, stop=stop, sampling=sampling)


# ---- responses ---------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_generated: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
