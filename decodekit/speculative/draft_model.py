"""Draft-model speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"), with a
dynamic token tree (DySpec, Xiong et al. 2024; Sequoia, Chen et al. 2024) and an adaptive draft length
(SpecDec++, Huang et al. 2024).

A smaller model with the target's tokenizer drafts. It keeps its own KV cache, synchronized with the committed
text at every step by rolling back to the common prefix and feeding only what it has not seen (the accepted
tokens it did not draft itself, plus the target's bonus token): the context is prefilled once, never again.

- Chain (`tree_width=1`): up to `num_draft` tokens, one draft forward pass each.
- Dynamic tree (`tree_width>1`): grown best-first by cumulative draft probability (the draft's estimate of the
  probability that the target accepts the whole path) up to `max_nodes` nodes, each node offering up to
  `tree_width` children. A round is one tree-masked forward pass over the tree so far; it expands every node
  added since the last one, so the tree costs at most `num_draft` draft passes, like the chain.
- Adaptive length (SpecDec++): stop extending as soon as the predicted acceptance of the next token -- the
  path's cumulative draft probability times the draft's top-1 probability -- falls under `stop_threshold`.

Drafting is greedy and deterministic (`draft_probs=None`, lossless under every verifier) unless a drafting
temperature applies: `temperature>0`, or `temperature=None` and the sequence samples (then the draft samples from
its own logits under the sequence's temperature and warpers, and the tree's siblings are drawn without replacement
for the RSD verifier). Every shape decision is made before the token it concerns is drawn, which keeps stochastic
trees lossless.
"""
from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..models.kv_cache import PoolFull, SeqKV
from .base import DraftTree, Drafter, register

PREFILL_CHUNK = 2048


def native_model(obj: Any):
    """The native `Transformer` behind an Engine, a CUDA-graph wrapper, or a model (drafting runs it eagerly)."""
    start = obj
    for _ in range(4):
        if hasattr(obj, "make_pool") and hasattr(obj, "layers"):
            return obj
        obj = getattr(obj, "model", None)
        if obj is None:
            break
    raise ValueError(f"a model-based drafter needs a native decodekit model, got {type(start).__name__}")


DRAFT_POOL_TOKENS = 1 << 16  # KV entries of a draft model's own pool, shared by the sequences of one engine


class ModelDrafter(Drafter):
    """Shared machinery of drafters that run a transformer: its KV memory, chain drafting, draft distributions.

    Subclasses set `self.net` (a native Transformer), `self.skip` (layers it skips) and `self.draw` (None = greedy
    drafting, else a callable logits `[V]` -> distribution `[V]` to sample from), and call `_open_cache(shared)` in
    `reset`. A shared cache is the target's own memory of the sequence (`self.kv`): it holds exactly the committed
    context but the root; drafts are written after it and rolled back (Draft & Verify's KV reuse). Otherwise the
    drafter keeps the sequence in a pool of its own (one per engine and method), and `self.cached` lists the
    tokens whose keys and values it holds, entry by entry.
    """

    num_draft: int
    stop_threshold: float

    # ---- cache ---------------------------------------------------------------------------------------------
    def _own_pool(self):
        """The pool of the drafters' own caches: made once, in a holder the sequences' copies share."""
        if not self.pool_holder:
            target = self.engine.core.pool
            tokens = min(target.num_slots, DRAFT_POOL_TOKENS)
            self.pool_holder.append(self.net.make_pool(-(-tokens // target.block_size) + 1, target.block_size))
        return self.pool_holder[0]

    def _open_cache(self, shared: bool) -> None:
        self.shared = shared
        self.cached: list[int] = []
        self.committed = 0  # length of the context at the last propose: a prefix of every later context
        self.vocab = self.engine.model.config.vocab_size
        self.generator = None
        self.cache = self.kv if shared else SeqKV(self._own_pool())
        self.base: int | None = None  # entries of a shared cache before this step's root

    def finish(self, tokens: list[int]) -> None:
        if not self.shared:
            self.cache.free()

    def _observer(self, positions: list[int]):
        """A KV press's part in a drafting pass over the drafter's own cache (self-speculation); None: none."""
        return None

    def _feed(self, tokens: list[int], positions: list[int], tree_mask: torch.Tensor | None = None,
              last_only: bool = False) -> torch.Tensor:
        """Append `tokens` at `positions` to the drafting cache; logits `[T, V]` (or `[1, V]`), target vocabulary."""
        layers = self.net.config.num_layers
        self.note_pass("target" if self.net is native_model(self.engine.model) else "draft_model", len(tokens),
                       self.cache.length, layers=layers - len(self.skip), of=layers, tree=tree_mask is not None)
        with torch.inference_mode():
            logits = self.net.forward_seq(self.cache, tokens, positions, tree_mask, "last" if last_only else "all",
                                          skip_layers=self.skip, observer=self._observer(positions))
        logits = logits.to(self.engine.device, torch.float32)
        v = logits.shape[-1]
        if v > self.vocab:  # padding rows of a larger embedding table
            logits = logits[:, :self.vocab]
        elif v < self.vocab:
            logits = torch.nn.functional.pad(logits, (0, self.vocab - v), value=float("-inf"))
        return logits

    def _sync(self, context: list[int]) -> torch.Tensor | None:
        """Bring the cache to `context[:-1]`, feed the root; its logits `[V]`, or None if the cache cannot follow."""
        root = len(context) - 1
        if self.shared:
            self.base = None
            # The target's memory holds the context but the root (a KV press may have evicted entries: they are
            # fewer than the tokens). Quantized blocks held outside the pool cannot be read without the press.
            if self.cache.written != root or self.cache.virtual:
                return None
            self.base = self.cache.length
            return self._feed([context[-1]], [root])[-1]
        n = self.committed if self.cached[:self.committed] == context[:self.committed] else 0
        limit = min(len(self.cached), root)
        n = min(n, limit)
        while n < limit and self.cached[n] == context[n]:
            n += 1
        self.cache.rollback(n)
        self.cached = self.cached[:n]
        logits = None
        for s in range(n, len(context), PREFILL_CHUNK):
            part = context[s:s + PREFILL_CHUNK]
            logits = self._feed(part, list(range(s, s + len(part))), last_only=True)[-1]
        self.cached += context[n:]
        self.committed = len(context)
        return logits

    def _release(self, root: int) -> None:
        """After drafting: a shared cache gives back every entry from the root on (the target writes there next);
        an own cache keeps its memory to what it holds."""
        if self.shared:
            if self.base is not None:  # None: nothing was written this step
                self.cache.rollback(self.base)
        else:
            self.cache.trim()

    # ---- drafting ------------------------------------------------------------------------------------------
    def _predicted(self, path_prob: float, top1: float) -> float:
        """Predicted acceptance of the next draft token (compared with `stop_threshold`); SpecDec++ by default."""
        return path_prob * top1

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """What the next token is drawn from (sampling) or how sure the draft is (greedy): `[V]` float."""
        if self.draw is not None:
            return self.draw(logits)
        return logits.softmax(-1)

    def _seed_generator(self, seed: int | None) -> None:
        if self.draw is None:
            return
        self.generator = torch.Generator(device=self.engine.device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def _chain(self, context: list[int], logits: torch.Tensor) -> DraftTree:
        root = len(context) - 1
        tokens, rows, path = [], [], 1.0
        for i in range(self.num_draft):
            q = self._distribution(logits)
            if self.draw is None:
                top1, tok = q.max(-1)
                top1, tok = float(top1), int(tok)
            else:  # decide whether to draft from q's shape, then draw: the decision never sees the draw
                top1 = float(q.max())
            if tokens and self._predicted(path, top1) < self.stop_threshold:
                break
            if self.draw is not None:
                tok = int(torch.multinomial(q, 1, generator=self.generator))
                rows.append(q)
                path *= float(q[tok])
            else:
                path *= top1
            tokens.append(tok)
            if i + 1 < self.num_draft:
                logits = self._feed([tok], [root + i + 1])[-1]
                if not self.shared:
                    self.cached.append(tok)
        return DraftTree.chain(tokens, torch.stack(rows) if rows else None)

    def propose(self, context: list[int]) -> DraftTree:
        try:
            logits = self._sync(context)
            if logits is None:
                return DraftTree()
            return self._draft(context, logits)
        except PoolFull:  # no memory left to draft in: a plain step (the drafter resynchronizes next time)
            self.cached, self.committed = [], 0
            if not self.shared:
                self.cache.rollback(0)
            return DraftTree()
        finally:
            self._release(len(context) - 1)

    def _draft(self, context: list[int], logits: torch.Tensor) -> DraftTree:
        return self._chain(context, logits)

    def max_draft_tokens(self) -> int:
        return self.num_draft


def warped_sampler(sampling, temperature: float | None):
    """Draft distribution under the target's temperature and warpers (penalties left out: any q is lossless)."""
    from ..sampling import LogitsProcessor, SamplingConfig

    fields = {k: v for k, v in vars(sampling).items() if k in SamplingConfig.__dataclass_fields__} \
        if sampling is not None else {}
    for k in ("repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        fields.pop(k, None)
    if temperature is not None:
        fields["temperature"] = temperature
    processor = LogitsProcessor(SamplingConfig(**fields))
    return lambda logits: processor.probs(logits[None])[0]


@register
@dataclass
class DraftModel(ModelDrafter):
    """Knobs (defaults): `model` ("smollm2": a source for `decodekit.load`, or an already loaded Engine or
    Transformer with the target's tokenizer), `num_draft` (6: max draft depth), `tree_width` (1 = chain; else
    children per node of the dynamic tree), `max_nodes` (16: tree size), `stop_threshold` (0.0 = off: SpecDec++
    stop when path probability x top-1 probability falls under it), `temperature` (None: greedy drafting unless
    the sequence samples; > 0: sample drafts at this temperature), `seed` (None: of the draft's
    sampling; fresh randomness per generation)."""

    name = "draft"
    model: Any = "smollm2"
    num_draft: int = 6
    tree_width: int = 1
    max_nodes: int = 16
    stop_threshold: float = 0.0
    temperature: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.num_draft < 1 or self.tree_width < 1 or self.max_nodes < 1:
            raise ValueError("draft: num_draft, tree_width and max_nodes must be >= 1")
        if not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError(f"draft: stop_threshold must be in [0, 1), got {self.stop_threshold}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"draft: temperature must be >= 0, got {self.temperature}")
        self.net = None
        self.cache = None
        self.pool_holder: list = []
        self.skip = frozenset()
        self.draw = None

    def _load(self, engine):
        if not isinstance(self.model, str):
            return native_model(self.model)
        if self.model == engine.name:  # the target itself: do not load it twice
            return native_model(engine.model)
        loaded = engine.__dict__.setdefault("draft_models", {})  # kept by the engine: loaded once per target
        key = (self.model, str(engine.device), engine.model.dtype)
        if key not in loaded:
            import decodekit

            loaded[key] = native_model(decodekit.load(self.model, device=engine.device, dtype=engine.model.dtype,
                                                       progress=False))
        return loaded[key]

    def bind(self, engine) -> "DraftModel":
        super().bind(engine)
        if self.net is None:
            self.net = self._load(engine)
            v_draft, v_target = self.net.config.vocab_size, engine.model.config.vocab_size
            if abs(v_draft - v_target) > 0.01 * max(v_draft, v_target):  # more than embedding-table padding
                raise ValueError(f"draft model vocabulary ({v_draft}) differs from the target's ({v_target}): "
                                 "the draft model must share the target's tokenizer")
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        cfg = self.sampling  # the sequence's own sampling rule
        if self.temperature is not None:
            stochastic = self.temperature > 0 and not (cfg is not None and cfg.greedy)
        else:
            stochastic = cfg is not None and not cfg.greedy
        self.draw = warped_sampler(cfg, self.temperature) if stochastic else None
        seed = self.seed
        if seed is None and cfg is not None and cfg.seed is not None:
            seed = (cfg.seed * 1_000_003 + 12_345) % (1 << 62)  # reproducible, yet not the verifier's stream
        self._seed_generator(seed)
        self._open_cache(shared=False)

    def _predicted(self, path_prob: float, top1: float) -> float:
        return path_prob * top1

    def _draft(self, context: list[int], logits: torch.Tensor) -> DraftTree:
        if self.tree_width == 1:
            return self._chain(context, logits)
        return self._tree(context, logits)

    def _tree(self, context: list[int], root_logits: torch.Tensor) -> DraftTree:
        """Best-first growth by cumulative draft probability, one tree-masked draft pass per round."""
        root, base = len(context) - 1, self.cache.length
        tokens: list[int] = []
        parents: list[int] = []
        depth, score = [0], [1.0]
        rows: list[torch.Tensor] = []
        offers: dict[int, tuple[list[float], list[int], list[float], torch.Tensor]] = {}
        heap: list[tuple[float, int, int, int]] = []  # (-priority, tiebreak, parent, rank)
        tiebreak = itertools.count()
        top1_seen: list[float] = []

        def expand(node: int, logits: torch.Tensor) -> None:
            q = self._distribution(logits)
            k = min(self.tree_width, q.shape[-1])
            top_p, top_t = q.topk(k)
            if self.draw is None:
                order = top_t
            else:  # Gumbel-top-k: the order of sampling without replacement; a child is used only once chosen
                k = min(k, int((q > 0).sum()))
                u = torch.rand(q.shape, generator=self.generator, device=q.device).clamp_min(1e-20)
                order = (q.log() - (-u.log()).log()).topk(k).indices
            estimate, chosen, chosen_p = top_p[:k].tolist(), order.tolist(), q[order].tolist()
            offers[node] = (estimate, chosen, chosen_p, q)
            top1_seen.append(estimate[0])
            heapq.heappush(heap, (-score[node] * estimate[0], next(tiebreak), node, 0))

        expand(0, root_logits)
        pending: list[int] = []  # added since the last pass: their children are not known yet
        passes = 1
        while True:
            while heap and len(tokens) < self.max_nodes:
                priority, _, parent, rank = heap[0]
                priority = -priority
                if tokens and priority < self.stop_threshold:
                    break
                if pending and passes < self.num_draft:  # a pending node's child might come first: look first
                    guess = max(score[n] for n in pending) * sum(top1_seen) / len(top1_seen)
                    if priority < guess:
                        break
                heapq.heappop(heap)
                estimate, chosen, chosen_p, q = offers[parent]
                tokens.append(chosen[rank])
                parents.append(parent)
                depth.append(depth[parent] + 1)
                score.append(score[parent] * chosen_p[rank])
                if self.draw is not None:
                    rows.append(q)
                if rank + 1 < len(chosen):
                    heapq.heappush(heap, (-score[parent] * estimate[rank + 1], next(tiebreak), parent, rank + 1))
                if depth[-1] < self.num_draft:
                    pending.append(len(tokens))
            if not pending or passes >= self.num_draft or len(tokens) >= self.max_nodes:
                break
            tree = DraftTree(tokens, parents)
            self.cache.rollback(base)
            mask = tree.ancestor_mask()[1:, 1:].to(self.net.device)
            logits = self._feed(tokens, [root + d for d in depth[1:]], tree_mask=mask)
            passes += 1
            for node in pending:
                expand(node, logits[node - 1])
            pending = []
        self.cache.rollback(base)  # the accepted path is fed again next step: a few tokens, one pass
        if self.draw is None:
            return DraftTree(tokens, parents)
        return DraftTree(tokens, parents, torch.stack(rows) if rows else None, without_replacement=True)

    def max_draft_tokens(self) -> int:
        return self.num_draft if self.tree_width == 1 else self.max_nodes
