"""lm-evaluation-harness adapter (EleutherAI, Gao et al.): decodekit as the lm_eval model `decodekit`.

    decodekit-lm-eval --model decodekit --model_args model=smollm2,method=pld --tasks gsm8k --device cpu

`decodekit-lm-eval` (or `python -m decodekit.eval.lm_harness`) is lm_eval's own command line after this module
is imported: released lm_eval (0.4.x) finds models only in its registry, which `@register_model` fills on import,
so a plain `lm_eval --model decodekit` does not know the name. From Python: `import decodekit.eval.lm_harness`,
then `lm_eval.simple_evaluate(model="decodekit", model_args=...)`.

model_args: `model` (a decodekit source), `method`, `search` (passed to generate when given), `max_length` (tokens
of context for scoring and prompts; default the model's window), `max_gen_toks` (default 256), `add_bos` (default:
what the tokenizer does with special tokens), `seed`, and any method knob (`num_draft=4`). lm_eval's `--device`,
`--batch_size` (prompts per generate call; an integer) apply.

- generate_until: engine.generate on the token ids, with the task's `until` as stop strings and its sampling
  fields (`do_sample=False` = greedy); prompts longer than max_length - max_gen_toks lose their left end.
- loglikelihood / loglikelihood_rolling: the target's forward pass (`model.forward_seq`, the native runtime) over
  context + continuation, in chunks of `SCORE_CHUNK` positions through a private KV pool (which bounds the logits
  held at once), log-softmax in float32, the continuation tokens' log-probabilities summed; is_greedy = every one
  is the argmax. One request at a time. The transformers fallback has no `forward_seq`: NotImplementedError.
- Sampling: an explicit SamplingConfig from the task's settings (greedy unless `do_sample`), so the model's
  generation_config.json does not apply, as lm_eval's own backends do not apply it either.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields, replace
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..models.kv_cache import SeqKV, private_pool
from ..sampling import SamplingConfig

SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
SCORE_CHUNK = 512  # positions per scoring forward pass
log = logging.getLogger(__name__)


@register_model("decodekit")
class DecodekitLM(TemplateLM):
    def __init__(self, model: str = "smollm2", method: str = "plain", search: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos: bool | None = None, seed: int | None = None, **options: Any) -> None:
        super().__init__()
        import decodekit

        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size must be an integer for decodekit, got {batch_size!r}")
        self.engine = decodekit.load(model, device=device, dtype=dtype, progress=False)
        self.tokenizer = self.engine.tokenizer
        self.method, self.search, self.seed, self.options = method, search, seed, options
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.engine.max_context)
        self.max_gen_toks = int(max_gen_toks)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if add_bos is None:  # the tokenizer's own habit: does encoding with special tokens start with BOS?
            add_bos = bos is not None and self.tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
        if add_bos and bos is None:
            raise ValueError(f"add_bos: {model}'s tokenizer has no BOS token")
        self.add_bos = bool(add_bos)
        self._device = self.engine.device
        self._calls = 0
        self._pool = None  # the scoring KV pool, made on first use

    # ---- tokens ----------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos if eos is not None else self.engine.model.config.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.engine.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        bos_text = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None:  # add BOS unless the text (a rendered chat template) already has it
            add_special_tokens = self.add_bos and not (bos_text and string.startswith(bos_text))
        return [self.tokenizer.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.engine.name} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # ---- scoring ---------------------------------------------------------------------------------------------
    def score_tokens(self, ids: list[int], n: int) -> tuple[float, bool]:
        """log P(ids[-n:] | ids[:-n]) under the model, and whether each of those tokens is the argmax."""
        if not 1 <= n < len(ids):
            raise ValueError(f"cannot score {n} of {len(ids)} tokens (a context token must precede them)")
        model = self.engine.model
        if not hasattr(model, "forward_seq"):
            raise NotImplementedError(f"loglikelihood needs decodekit's native runtime; {type(model).__name__} "
                                      "(the transformers fallback) has no forward_seq")
        if self._pool is None:
            self._pool = private_pool(model, self.max_length + 1)[0]
        inputs, targets = ids[:-1], torch.tensor(ids[-n:], device=self.engine.device)
        first = len(inputs) - n  # the first input position whose logits predict a scored token
        total, greedy = 0.0, True
        kv = SeqKV(self._pool)
        try:
            with torch.inference_mode():
                for start in range(0, len(inputs), SCORE_CHUNK):
                    piece = inputs[start:start + SCORE_CHUNK]
                    end = start + len(piece)
                    want = min(len(piece), end - first)  # scored positions in this piece (its last ones)
                    logits = model.forward_seq(kv, piece, list(range(start, end)), logits="all" if want > 0 else "none")
                    if want <= 0:
                        continue  # context only: the pass fills the KV memory
                    logprobs = logits[-want:].float().log_softmax(-1)
                    target = targets[end - want - first:end - first]
                    total += float(logprobs.gather(-1, target[:, None]).sum())
                    greedy = greedy and bool((logprobs.argmax(-1) == target).all())
        finally:
            kv.free()
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in tqdm(requests, disable=disable_tqdm, desc="decodekit loglikelihood"):
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            ids = (context + continuation)[-(self.max_length + 1):]
            result = self.score_tokens(ids, len(continuation))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="decodekit loglikelihood_rolling"):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False),
                                                self.prefix_token_id, self.max_length, context_len=1)
            total = 0.0
            for context, continuation in map(make_disjoint_window, windows):
                total += self.score_tokens(context + continuation, len(continuation))[0]
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ---- generation ------------------------------------------------------------------------------------------
    def generation_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """lm_eval's per-task generation settings -> (generate keyword arguments, max new tokens)."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        stop = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kw.pop("do_sample", None)
        sampling = {k: kw.pop(k) for k in list(kw) if k in SAMPLING_FIELDS}
        if not do_sample:
            sampling["temperature"] = 0.0  # lm_eval's default is greedy
        elif "temperature" not in sampling:
            sampling["temperature"] = 1.0
        if kw:
            log.warning("decodekit ignores these generation settings: %s", ", ".join(sorted(kw)))
        call = {"method": self.method, "stop": stop, "chat": False, "sampling": SamplingConfig(**sampling).validate(),
                **self.options}
        if self.search is not None:
            call["search"] = self.search
        return call, max_new

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same settings can share a generate call
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="decodekit generate_until")
        for indices in groups.values():
            call, max_new = self.generation_kwargs(requests[indices[0]].args[1])
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room in max_length {self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in chunk]
                if self.seed is not None:
                    call["sampling"] = replace(call["sampling"], seed=self.seed + self._calls)
                self._calls += 1
                for i, result in zip(chunk, self.engine.generate(prompts, max_new, **call)):
                    outputs[i] = result.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
                bar.update(len(chunk))
        bar.close()
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `decodekit` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["decodekit-lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
