"""OpenAI's API as the server speaks it: requests checked field by field,
responses, stream chunks and error bodies in OpenAI's shapes, plus
llama-server's extensions (`top_k`, `repeat_penalty` in requests, a
`timings` object in responses). docs/design.md §11.

Nothing here knows HTTP or the ranks: the HTTP layer hands in parsed JSON
and gets dicts back.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from netp.runtime.generate import Generation
from netp.runtime.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON; NaN and Infinity are not JSON and are refused."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request ({str(e)[:200]}). "
                            "The body must be a JSON object.") from None


# -- requests ------------------------------------------------------------------------


class _Request(BaseModel):
    # strict: "1" is not a number and true is not an int, as OpenAI's API answers;
    # unknown fields are ignored (clients send options other servers know).
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: StrictStr | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = None  # llama-server's extension: <= 0 means all
    repeat_penalty: float | None = Field(None, gt=0)  # llama-server's extension
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    tools: Any = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: bool = False
    suffix: StrictStr | None = None


def _field_error(e: ValidationError) -> ApiError:
    """The first bad field by its name (pydantic's union-member tags such as `str` or
    `list[int]` left out); a value no member of a union accepts is named as such."""
    errors = e.errors()

    def field(loc: tuple[Any, ...]) -> str:
        names = []
        for x in loc:
            if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x):
                break
            names.append(str(x))
        return ".".join(names)

    param = field(errors[0]["loc"])
    same = [err for err in errors if field(err["loc"]) == param]
    if len(same) > 1:  # every member of a union refused it
        message = f"{param}: not a valid value here (got {type(errors[0]['input']).__name__})"
    else:
        message = f"{param}: {errors[0]['msg']}" if param else errors[0]["msg"]
    return ApiError(400, message, param=param or None)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def parse_request(kind: type[ChatRequest] | type[CompletionRequest], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        raise _field_error(e) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: _Request) -> None:
    """Options this server cannot honour are refused by name rather than ignored."""
    if req.n not in (None, 1):
        raise ApiError(400, "n: only 1 choice per request is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name}: not supported (use repeat_penalty)", param=name)
    if req.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs: not supported", param="logprobs")
    if req.tools:
        raise ApiError(400, "tools: not supported", param="tools")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo: not supported", param="echo")
        if req.suffix:
            raise ApiError(400, "suffix: not supported", param="suffix")


def check_model(req: _Request, served: str) -> None:
    if req.model is not None and req.model != served:
        raise ApiError(400, f"The model `{req.model}` does not exist; this server serves `{served}`.",
                       param="model", code="model_not_found")


def max_tokens(req: _Request, default: int) -> int:
    """Tokens to generate: max_completion_tokens or max_tokens, else `default` (-1: until EOS or a full context)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"{name}: must be at least 1, got {value}", param=name)
            return int(value)
    return default


def stop_strings(req: _Request) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: each string at most {MAX_STOP_CHARS} characters", param="stop")
    return [s for s in stop if s]


def sampling(req: _Request) -> SamplingParams:
    """The request's sampling settings over ne-run's defaults (docs/design.md §5)."""
    base = SamplingParams()
    top_k = base.top_k if req.top_k is None else max(int(req.top_k), 0)
    seed = -1 if req.seed is None or req.seed < 0 else int(req.seed)
    return SamplingParams(top_k=top_k, top_p=base.top_p if req.top_p is None else float(req.top_p),
                          temp=base.temp if req.temperature is None else float(req.temperature),
                          repeat_penalty=base.repeat_penalty if req.repeat_penalty is None else
                          float(req.repeat_penalty), seed=seed)


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; text parts of a content list joined."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content if content is not None else ""})
    return out


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """One prompt: a string or a list of token ids (a batch of several is refused)."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise ApiError(400, "prompt: one prompt per request (a list of several is not supported)", param="prompt")
        return str(p[0])
    if all(isinstance(x, int) for x in p):
        return [int(x) for x in p]  # type: ignore[arg-type]
    if len(p) != 1:
        raise ApiError(400, "prompt: one prompt per request (a list of several is not supported)", param="prompt")
    return [int(x) for x in p[0]]  # type: ignore[union-attr]


def include_usage(req: _Request) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


# -- responses ------------------------------------------------------------------------

Kind = Literal["chat", "completion"]


@dataclass
class Reply:
    """The ids and names every chunk and response of one request repeats."""

    kind: Kind
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = self.created or int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed event: a text delta, or the last one with finish_reason."""
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out.update(extra or {})
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """stream_options.include_usage: one last chunk with no choices and the usage."""
        out = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        out["choices"] = []
        out["usage"] = usage
        return out

    def response(self, text: str, finish: str, usage: dict[str, int], timings: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = self._head(self.object)
        out.update(choices=[choice], usage=usage, timings=timings)
        return out


def usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": len(gen.prompt), "completion_tokens": len(gen.tokens),
            "total_tokens": len(gen.prompt) + len(gen.tokens)}


def timings(gen: Generation) -> dict[str, Any]:
    """llama-server's `timings`: prompt (prefill) and predicted (decode) counts, ms and rates.
    predicted_per_second is the decode rate ne-run's timing line reports (one-token forwards
    over the decode time)."""
    prompt_ms, predicted_ms = gen.prompt_seconds * 1e3, gen.decode_seconds * 1e3
    n_prompt, n_pred = len(gen.prompt), len(gen.tokens)
    return {"prompt_n": n_prompt, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
            "prompt_per_second": gen.prompt_tok_s,
            "predicted_n": n_pred, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / gen.decode_steps if gen.decode_steps else 0.0,
            "predicted_per_second": gen.decode_tok_s}


def finish_reason(gen: Generation, stopped_by_string: bool) -> str:
    """OpenAI's finish_reason: "stop" at EOS or a stop string, "length" at max_tokens or a full context."""
    return "stop" if stopped_by_string or gen.stop == "eos" else "length"


__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Reply", "error_body", "parse_json_body",
           "parse_request", "check_model", "max_tokens", "stop_strings", "sampling", "chat_messages",
           "completion_prompt", "include_usage", "usage", "timings", "finish_reason"]
