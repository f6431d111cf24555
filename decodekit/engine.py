"""The engine: prompt -> tokens through one propose -> verify -> commit loop (plain decoding = empty draft)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Sequence

import torch

from .models.kv_cache import EMPTY
from .sampling import LogitsProcessor, SamplingConfig
from .speculative.base import DraftTree, Drafter, StepResult, make_drafter
from .speculative.budget import DraftBudget
from .speculative.verify import pick_verifier

Prompt = "str | list[dict[str, str]] | list[int]"
SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0
    tokens_per_s: float = 0.0  # generated tokens / decode time (time after the first token)
    forward_passes: int = 0  # target forward passes, prefill included
    decode_steps: int = 0  # target forward passes after prefill
    tau: float = 1.0  # mean tokens committed per decode step (accepted draft tokens + 1)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accepted_by_position: list[float] = field(default_factory=list)  # acceptance rate of draft depth 1, 2, ...
    method: str = "plain"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    stats: GenerationStats
    prompt_ids: list[int] = field(default_factory=list, repr=False)


class _StopChecker:
    """EOS ids and stop strings; a stop string ends the text just before it."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] | None) -> None:
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, [s for s in (stop or []) if s]

    def stopped(self, tokens: list[int], n_new: int) -> bool:
        """Cheap per-step check: did the last `n_new` tokens bring an EOS or complete a stop string?"""
        if any(t in self.eos_ids for t in tokens[-n_new:]):
            return True
        if self.stop:  # a stop string ending in the new tokens lies within this many tokens of the end
            tail = self.tokenizer.decode(tokens[-(n_new + max(map(len, self.stop)) + 2):], skip_special_tokens=True)
            return any(s in tail for s in self.stop)
        return False

    def cut(self, tokens: list[int]) -> tuple[list[int], str, bool]:
        """Tokens up to the first stop, their text, and whether a stop was hit."""
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                return tokens[:i + 1], self.tokenizer.decode(tokens[:i], skip_special_tokens=True), True
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            return tokens, text[:min(hits)], True
        return tokens, text, False


def fused_plan(sizes: tuple[int, ...], tokens: int) -> tuple[int, int]:
    """(steps per chunk, chunks) of the longest fused greedy chunk that fits in `tokens`; (0, 0): single steps."""
    for steps in sizes:
        if steps <= tokens:
            return steps, tokens // steps
    return 0, 0


class Engine:
    """A model, its tokenizer, and generation. Build one with `decodekit.load(...)`."""

    def __init__(self, model, tokenizer, name: str = "model", max_context: int | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.source_folder = None  # the HF-format folder the weights came from, if any
        self._budgets: dict[str, DraftBudget] = {}
        self.max_context = max_context or model.config.max_position_embeddings
        self.eos_ids = set(model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string (raw, or as one user turn when `chat`), chat messages, or ids."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; pass a plain string prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- public API ----------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, *, method: str | Drafter = "plain",
                 sampling: SamplingConfig | None = None, stop: Sequence[str] | None = None, chat: bool = False,
                 verifier: str | None = None, **options) -> GenerationResult | list[GenerationResult]:
        """Generate from one prompt, or from a list of prompts (a batch).

        `options` holds sampling fields (temperature, top_p, seed, ...) and the method's own knobs.
        """
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and \
                not isinstance(prompt[0], dict):
            if method == "plain":
                return self._generate_batch(prompt, max_new_tokens, sampling, stop, chat, options)
            return [self.generate(p, max_new_tokens, method=method, sampling=sampling, stop=stop, chat=chat,
                                  verifier=verifier, **options) for p in prompt]
        result = None
        for result in self._run(prompt, max_new_tokens, method, sampling, stop, chat, verifier, options, False):
            pass
        return result

    def stream(self, prompt, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are committed; the final GenerationResult is the generator's return value."""
        printed = ""
        result = None
        for result in self._run(prompt, max_new_tokens, kwargs.pop("method", "plain"), kwargs.pop("sampling", None),
                                kwargs.pop("stop", None), kwargs.pop("chat", False), kwargs.pop("verifier", None),
                                kwargs, True):
            # Hold back a trailing replacement char: a multi-byte character may still be incomplete.
            text = result.text.rstrip("\ufffd") if result.finish_reason == "running" else result.text
            if len(text) > len(printed) and text.startswith(printed):
                yield text[len(printed):]
                printed = text
        return result

    # ---- the loop ------------------------------------------------------------------------------------------
    def _split_options(self, sampling: SamplingConfig | None, options: dict[str, Any]):
        sampling_kw = {k: options.pop(k) for k in list(options) if k in SAMPLING_FIELDS}
        if sampling is None:
            sampling = SamplingConfig(**sampling_kw)
        elif sampling_kw:
            sampling = SamplingConfig(**{**asdict(sampling), **sampling_kw})
        return sampling.validate(), options

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n_prompt == 0:
            raise ValueError("empty prompt")
        if n_prompt >= self.max_context:
            raise ValueError(f"prompt has {n_prompt} tokens; {self.name}'s context window is {self.max_context}")

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, chunk: int = 2048,
                 hidden_layers: tuple[int, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Last-position logits after writing the prompt to the cache, `chunk` tokens per forward pass; with
        `hidden_layers`, also the features `[B, T, F]` of every prompt position."""
        logits, hidden = None, []
        for s in range(0, ids.shape[1], chunk):
            if hidden_layers:
                logits, h = self.model(ids[:, s:s + chunk], positions[:, s:s + chunk], hidden_layers=hidden_layers)
                hidden.append(h)
            else:
                logits = self.model(ids[:, s:s + chunk], positions[:, s:s + chunk], num_logits=1)
        if hidden_layers:
            return logits[:, -1].float(), torch.cat(hidden, dim=1)
        return logits[:, -1].float()

    def _penalty_inputs(self, sampling: SamplingConfig, prompt: list[int], output: list[int], tree: DraftTree):
        """Per-node repetition context: committed tokens plus each node's draft ancestors."""
        if not sampling.has_penalties:
            return None, None
        vocab = self.model.config.vocab_size
        dev = self.device
        out_counts = torch.bincount(torch.tensor(output, device=dev, dtype=torch.long), minlength=vocab).float()
        prompt_seen = torch.zeros(vocab, device=dev, dtype=torch.bool)
        prompt_seen[torch.tensor(prompt, device=dev, dtype=torch.long)] = True
        n = len(tree) + 1
        counts = out_counts.expand(n, vocab).clone()
        if len(tree):
            anc = tree.ancestor_mask()[:, 1:].float().to(dev)  # draft ancestors of each node, root excluded
            onehot = torch.nn.functional.one_hot(torch.tensor(tree.tokens, device=dev), vocab).float()
            counts += anc @ onehot
        return prompt_seen[None] | (counts > 0), counts

    def _run(self, prompt, max_new_tokens, method, sampling, stop, chat, verifier_name, options, streaming: bool
             ) -> Iterator[GenerationResult]:
        """The loop. Yields a "running" result after each step when `streaming`, and the final result last."""
        sampling, options = self._split_options(sampling, dict(options))
        # The draft budget decides from wall-clock times, and a different draft consumes the random stream
        # differently: a seeded sampled run keeps every draft (same distribution, reproducible tokens).
        adaptive = options.pop("adaptive", None)
        if adaptive is None:
            adaptive = sampling.greedy or sampling.seed is None
        ignore_eos = options.pop("ignore_eos", False)  # benchmarks: always generate max_new_tokens
        drafter = make_drafter(method, options).bind(self)
        # The budget (acceptance and step cost per width) persists across calls: cost is a property of the machine.
        budget = self._budgets.setdefault(drafter.name, DraftBudget()) if adaptive and drafter.name != "plain" else None
        prompt_ids = self.encode(prompt, chat)
        self._check_length(len(prompt_ids), max_new_tokens)
        processor = LogitsProcessor(sampling)
        generator = self._generator(sampling.seed)
        stopper = _StopChecker(self.tokenizer, set() if ignore_eos else self.eos_ids, stop)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), method=drafter.name)
        headroom = drafter.max_draft_tokens() + 1
        self.model.setup_cache(1, min(self.max_context, len(prompt_ids) + max_new_tokens + headroom))
        cache = self.model.cache
        dev = self.device

        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=dev)
            features = drafter.feature_layers  # trained heads read the target's hidden states: prefill and verify
            logits = self._prefill(ids, torch.arange(len(prompt_ids), device=dev)[None], hidden_layers=features)
            if features:
                logits, prompt_features = logits
            seen, counts = self._penalty_inputs(sampling, prompt_ids, [], DraftTree())
            first = int(processor.sample(processor.probs(logits, seen, counts), generator)[0])
            stats.forward_passes = 1
            context, output = prompt_ids + [first], [first]
            t_first = time.perf_counter()
            stats.time_to_first_token_s = t_first - t0
            drafter.reset(prompt_ids)
            if features:
                drafter.prefill_features(prompt_features[0])
            accepted_at: list[int] = []
            proposed_at: list[int] = []
            new = [first]
            # Greedy steps without a draft on a graph-captured model: several steps per replay, argmax on the device.
            fused = getattr(self.model, "greedy_sizes", ()) if sampling.greedy and not sampling.has_penalties else ()
            fused = () if features else fused  # a fused chunk returns no features: such drafters verify every step
            while not stopper.stopped(output, len(new)) and len(output) < max_new_tokens \
                    and cache.length + headroom <= cache.max_len:
                if streaming:
                    text = self.tokenizer.decode(output, skip_special_tokens=True)
                    yield GenerationResult(text, list(output), "running", stats, prompt_ids)

                t_draft = time.perf_counter()
                refused = budget is not None and not budget.should_draft()
                proposed = DraftTree() if refused else drafter.propose(context)
                tree = budget.trim(proposed) if budget is not None and len(proposed) else proposed
                t_verify = time.perf_counter()
                stats.draft_time_s += t_verify - t_draft
                # Plain decoding runs long chunks back to back, and so does a drafter the budget holds back, up to
                # its next probe; a drafter that found nothing to draft gets one short chunk (a match may start a
                # few tokens later), or a verified step if it learns from the target's logits.
                chunk_tokens = min(max_new_tokens - len(output), cache.max_len - headroom - cache.length)
                if not fused or len(tree):
                    chunk_tokens = 0
                elif refused:
                    chunk_tokens = min(chunk_tokens, fused[0] * (1 + budget.quiet_steps()))
                elif not len(proposed) and drafter.learns_from_steps:
                    chunk_tokens = 0
                elif drafter.name != "plain":  # the budget cut the draft away (long chunk) or there was none
                    chunk_tokens = min(chunk_tokens, fused[0] if len(proposed) else fused[-1])
                steps, chunks = fused_plan(fused, chunk_tokens)
                if chunks:
                    n0 = len(output)
                    run = self.model.greedy_chunks(context[-1], cache.length, chunks, steps)
                    with contextlib.closing(run):  # closing: rolls back a chunk launched ahead, unused
                        for i, new in enumerate(run):
                            if refused and i:
                                budget.skip(1)
                            context += new
                            output += new
                            stats.decode_steps += len(new)
                            if stopper.stopped(output, len(new)):
                                break
                            if streaming:
                                yield GenerationResult(self.tokenizer.decode(output, skip_special_tokens=True),
                                                       list(output), "running", stats, prompt_ids)
                    new = output[n0:]
                    t_done = time.perf_counter()
                    stats.verify_time_s += t_done - t_verify
                    if budget is not None:  # the plain rate a draft must beat: per token, fused
                        budget.record(tree, 0, 1, (t_done - t_draft) / len(new))
                    continue
                start = cache.length
                n = len(tree)
                step_ids = torch.tensor([[context[-1], *tree.tokens]], device=dev)
                positions = (start + torch.tensor(tree.depths(), device=dev))[None]
                tree_mask = None if tree.is_chain() else tree.ancestor_mask().to(dev)
                step_hidden = None
                if features:
                    step_logits, step_hidden = self.model(step_ids, positions, tree_mask=tree_mask,
                                                          hidden_layers=features)
                    step_logits, step_hidden = step_logits[0].float(), step_hidden[0]
                else:
                    step_logits = self.model(step_ids, positions, tree_mask=tree_mask)[0].float()
                if sampling.greedy and not sampling.has_penalties:
                    probs = step_logits  # greedy verification needs only the argmax: skip building one-hots
                else:
                    seen, counts = self._penalty_inputs(sampling, prompt_ids, output, tree)
                    probs = processor.probs(step_logits, seen, counts)
                verify = pick_verifier(verifier_name, sampling.greedy, tree)
                accepted, next_token = verify(tree, probs, generator)
                cache.keep_path(start, [0, *accepted])
                new = [tree.tokens[i - 1] for i in accepted] + [next_token]
                context += new
                output += new
                stats.decode_steps += 1
                t_done = time.perf_counter()
                stats.verify_time_s += t_done - t_verify
                if budget is not None:
                    budget.record(tree, len(accepted), n + 1, t_done - t_draft)
                depths = tree.depths()
                for d in range(1, max(depths, default=0) + 1):
                    if d > len(proposed_at):
                        proposed_at.append(0)
                        accepted_at.append(0)
                    proposed_at[d - 1] += 1
                    accepted_at[d - 1] += int(len(accepted) >= d)
                drafter.observe(context, StepResult(tree, accepted, next_token, step_logits, step_hidden))

        output, text, stopped = stopper.cut(output[:max_new_tokens])
        finish = "stop" if stopped else "length"
        stats.forward_passes = 1 + stats.decode_steps
        stats.total_time_s = time.perf_counter() - t0
        stats.generated_tokens = len(output)
        decode_time = stats.total_time_s - stats.time_to_first_token_s
        committed_by_steps = len(context) - len(prompt_ids) - 1
        stats.tau = committed_by_steps / stats.decode_steps if stats.decode_steps else 1.0
        stats.tokens_per_s = (len(output) - 1) / decode_time if decode_time > 0 and len(output) > 1 else 0.0
        stats.accepted_by_position = [a / p for a, p in zip(accepted_at, proposed_at)]
        yield GenerationResult(text, list(output), finish, stats, prompt_ids)

    # ---- batched plain decoding ----------------------------------------------------------------------------
    def _generate_batch(self, prompts, max_new_tokens, sampling, stop, chat, options) -> list[GenerationResult]:
        """Plain decoding of several prompts in lockstep; shorter prompts are left-padded (masked slots)."""
        sampling, options = self._split_options(sampling, dict(options))
        ignore_eos = options.pop("ignore_eos", False)
        options.pop("adaptive", None)
        if options:
            raise ValueError(f"unknown options for plain decoding: {', '.join(options)}")
        encoded = [self.encode(p, chat) for p in prompts]
        for ids in encoded:
            self._check_length(len(ids), max_new_tokens)
        b, width = len(encoded), max(len(ids) for ids in encoded)
        processor = LogitsProcessor(sampling)
        generator = self._generator(sampling.seed)
        stopper = _StopChecker(self.tokenizer, set() if ignore_eos else self.eos_ids, stop)
        self.model.setup_cache(b, min(self.max_context, width + max_new_tokens + 1))
        dev = self.device
        pad = [width - len(ids) for ids in encoded]
        ids = torch.tensor([[0] * p + e for p, e in zip(pad, encoded)], device=dev)
        positions = torch.arange(width, device=dev)[None] - torch.tensor(pad, device=dev)[:, None]
        positions = positions.clamp_min(EMPTY)  # padding slots hold position EMPTY: no real query attends to them
        outputs: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        stats = [GenerationStats(prompt_tokens=len(e)) for e in encoded]
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self._prefill(ids, positions)
            t_first = time.perf_counter()
            steps = 0
            pos = positions[:, -1:] + 1
            while True:
                seen = counts = None
                if sampling.has_penalties:
                    pairs = [self._penalty_inputs(sampling, e, o, DraftTree()) for e, o in zip(encoded, outputs)]
                    seen, counts = torch.cat([s for s, _ in pairs]), torch.cat([c for _, c in pairs])
                nxt = processor.sample(processor.probs(logits, seen, counts), generator).tolist()
                for i, t in enumerate(nxt):
                    if not done[i]:
                        outputs[i].append(t)
                        _, _, stopped = stopper.cut(outputs[i])
                        done[i] = stopped or len(outputs[i]) >= max_new_tokens
                if all(done):
                    break
                logits = self.model(torch.tensor(nxt, device=dev)[:, None], pos)[:, -1].float()
                pos = pos + 1
                steps += 1
        total = time.perf_counter() - t0
        results = []
        for i, out in enumerate(outputs):
            tokens, text, stopped = stopper.cut(out)
            st = stats[i]
            st.time_to_first_token_s, st.total_time_s = t_first - t0, total
            st.generated_tokens, st.forward_passes, st.decode_steps = len(tokens), 1 + steps, steps
            st.tokens_per_s = (len(tokens) - 1) / (total - st.time_to_first_token_s) if steps else 0.0
            results.append(GenerationResult(text, tokens, "stop" if stopped else "length", st, encoded[i]))
        return results
