"""OpenAI response objects from the engine thread's events: whole responses, and stream chunks.

`CompletionFormat` writes `text_completion` objects (logprobs as tokens / token_logprobs / top_logprobs /
text_offset); `ChatFormat` writes `chat.completion` and `chat.completion.chunk` objects (logprobs as a `content`
list, the first chunk of each choice carrying the assistant role). Each instance serves one HTTP request.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from .worker import Delta, Done, TokenLogprob


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class _Format:
    object = chunk_object = prefix = ""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage  # streaming: every chunk says `usage: null`, a last chunk has it
        self.texts: dict[int, str] = {}
        self.logprobs: dict[int, list[TokenLogprob]] = {}
        self.finish: dict[int, str] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def add(self, delta: Delta) -> None:
        """Accumulate a delta (whole responses)."""
        self.texts[delta.index] = self.texts.get(delta.index, "") + delta.text
        if delta.logprobs is not None:
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.finish_reason:
            self.finish[delta.index] = delta.finish_reason

    def response(self, done: Done, n_choices: int) -> dict[str, Any]:
        choices = [self._choice(i, self.texts.get(i, ""), self.logprobs.get(i), self.finish.get(i, "stop"))
                   for i in range(n_choices)]
        return {**self._head(self.object), "choices": choices, "usage": usage(done)}

    def chunk(self, delta: Delta) -> dict[str, Any]:
        out = {**self._head(self.chunk_object), "choices": [self._chunk_choice(delta)]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(done)}

    def _choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(self, delta: Delta) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(_Format):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        super().__init__(model, include_usage)
        self.offsets: dict[int, int] = {}  # text_offset of the next token, per choice (streams)

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        offsets = []
        for e in entries:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}

    def _choice(self, index, text, logprobs, finish):
        return {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

    def _chunk_choice(self, delta):
        return self._choice(delta.index, delta.text, delta.logprobs, delta.finish_reason)


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class ChatFormat(_Format):
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        super().__init__(model, include_usage)
        self.started: set[int] = set()

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        content = [{**_token(e.token, e.logprob), "top_logprobs": [_token(t, lp) for t, lp in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}

    def _choice(self, index, text, logprobs, finish):
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    def _chunk_choice(self, delta):
        body: dict[str, Any] = {"content": delta.text}
        if delta.index not in self.started:
            self.started.add(delta.index)
            body = {"role": "assistant", **body}
        return {"index": delta.index, "delta": body, "logprobs": self._logprobs(delta.logprobs),
                "finish_reason": delta.finish_reason}
