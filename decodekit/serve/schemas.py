"""Request bodies of the OpenAI API (completions, chat completions), and their mapping onto `Engine.make_request`.

Fields follow OpenAI's reference; decodekit's own (the decoding method and its options, the sampling rules OpenAI
does not have) are extra body fields, what the `openai` client sends as `extra_body`. Types are strict (a string is
not a number) and unknown fields are refused, so a typo is a 400, not a silently ignored setting.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..speculative.base import DRAFTERS
from ..speculative.verify import VERIFIERS

INT64 = 2**63


class APIError(Exception):
    """An error the client caused or must know about, rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted for compatibility; there is nothing to obfuscate here


class GenerationFields(Strict):
    """Fields shared by both endpoints: OpenAI's, then decodekit's extra body fields."""

    model: str
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(max_length=1000)] | Annotated[list[Annotated[str, Field(max_length=1000)]],
                                                              Field(max_length=16)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # only empty: decodekit has no logit bias
    user: str | None = None
    # decodekit's own (extra_body)
    method: str | None = None
    method_options: dict[str, Any] | None = None
    verifier: str | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    epsilon_cutoff: float | None = Field(None, ge=0, lt=1)
    eta_cutoff: float | None = Field(None, ge=0, lt=1)
    top_h: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool | None = None
    adaptive: bool | None = None  # the draft budget (default: the engine's, on unless a seeded sampled run)


SAMPLING_NAMES = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                  "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "repetition_penalty")


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class JsonSchemaFormat(Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow a pydantic method
    strict: bool | None = None  # decodekit's output always follows the schema


class ResponseFormat(Strict):
    """OpenAI's structured output: the engine compiles it as `generate(response_format=...)` does, so an invalid
    or unsupported schema is a 400 before any decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


@dataclass
class Defaults:
    """What the server adds to every request: its model's name, its default method and that method's options."""

    model: str
    method: str = "plain"
    method_options: dict[str, Any] = field(default_factory=dict)
    verifier: str | None = None
    vocab_size: int = 0
    max_context: int = 0


@dataclass
class Work:
    """One HTTP request in the engine's terms: prompts (each yields `n` choices) and `make_request`'s keywords."""

    prompts: list[Any]
    max_new_tokens: int
    kwargs: dict[str, Any]
    n: int
    chat: bool


@lru_cache(maxsize=None)
def _knob_types(method: str) -> dict[str, TypeAdapter]:
    """Validators for a method's knobs, from its dataclass annotations (knobs whose type cannot be resolved are
    left to the method)."""
    cls = DRAFTERS[method]
    if not is_dataclass(cls):
        return {}
    namespace = vars(sys.modules[cls.__module__])
    adapters = {}
    for f in fields(cls):
        try:
            hint = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 - the class's own
            adapters[f.name] = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot check: the method checks it
            continue
    return adapters


def _method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options as their knobs' types (JSON lists become tuples, ...); a value of the wrong type is a 400 here,
    not an exception inside the engine step, where it would fail every request of the batch."""
    adapters = _knob_types(method)
    out = dict(options)
    for name, value in options.items():
        if name in adapters:
            try:
                out[name] = adapters[name].validate_python(value)
            except ValidationError as e:
                raise APIError(400, f"method option {name!r} of {method!r}: {e.errors()[0]['msg']}",
                               param="method_options") from None
    return out


def _common(body: GenerationFields, defaults: Defaults) -> dict[str, Any]:
    if body.model != defaults.model:
        raise APIError(400, f"unknown model {body.model!r}; this server serves {defaults.model!r}", param="model",
                       code="model_not_found")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    method = body.method or defaults.method
    if method not in DRAFTERS:
        raise APIError(400, f"unknown method {method!r}; available: {', '.join(sorted(DRAFTERS))}", param="method")
    if body.verifier is not None and body.verifier not in VERIFIERS:
        raise APIError(400, f"unknown verifier {body.verifier!r}; available: {', '.join(VERIFIERS)}",
                       param="verifier")
    # The server's -O options go with its default method; a request's own method_options go on top.
    options = dict(defaults.method_options) if method == defaults.method else {}
    options.update(body.method_options or {})
    kwargs: dict[str, Any] = {"method": method, "method_options": _method_options(method, options), "n": body.n,
                              "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or [])}
    kwargs.update({k: v for k in SAMPLING_NAMES if (v := getattr(body, k)) is not None})
    for k in ("ignore_eos", "adaptive"):
        if (v := getattr(body, k)) is not None:
            kwargs[k] = v
    if body.verifier or defaults.verifier:
        kwargs["verifier"] = body.verifier or defaults.verifier
    return kwargs


def completion_work(body: CompletionRequest, defaults: Defaults) -> Work:
    kwargs = _common(body, defaults)
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < defaults.vocab_size for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {defaults.vocab_size})", param="prompt")
    if body.logprobs is not None:
        kwargs["logprobs"] = body.logprobs
    return Work(prompts, body.max_tokens or 16, kwargs, body.n, chat=False)


def chat_work(body: ChatCompletionRequest, defaults: Defaults) -> Work:
    kwargs = _common(body, defaults)
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.response_format is not None:
        kwargs["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "\n".join(part.text for part in m.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    # Without a limit a chat reply may run to the end of the context window (the core stops it there).
    limit = body.max_completion_tokens or body.max_tokens or defaults.max_context
    return Work([messages], limit, kwargs, body.n, chat=True)
