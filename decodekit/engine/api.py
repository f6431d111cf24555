"""`Engine`: a model, its tokenizer and the public API (generate, stream, requests), over one `EngineCore`."""
from __future__ import annotations

import inspect
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Iterator, Sequence as Seq

import torch

from ..kv.paged import PressSpec, press_knobs
from ..constrain import BACKENDS, DEFAULT_BACKEND, ConstraintCompiler, ConstraintSpec, Grammar, constraint_spec
from ..models.tokenizer import encode_prompt
from ..sampling import SamplingConfig
from ..speculative.base import DRAFTERS, Drafter
from .core import EngineCore, Request
from .runner import ModelRunner
from .scheduler import SchedulerConfig
from .sequence import GenerationResult

SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
# Request-level options, not sampling fields.
ENGINE_OPTIONS = ("ignore_eos", "adaptive", "logprobs", "policy", "constraint_sampler", "trace")
CONSTRAINTS = ("json_schema", "regex", "grammar", "choice", "response_format")  # what the output must match


def _default_kv_tokens(model, max_context: int, ring_entries: int = 0) -> int:
    """KV pool size: on a GPU half the free memory (up to a million tokens); on the CPU room for two full-length
    sequences (memory is only touched where sequences write). `ring_entries`: slots the rings of sliding-window
    layers take in all (those layers then cost nothing per token of the full pool)."""
    if model.device.type == "cuda":
        c = model.config
        per_layer = 2 * c.num_kv_heads * c.head_dim * torch.tensor([], dtype=model.dtype).element_size()
        ring_layers = sum(c.layer_window(i) is not None for i in range(c.num_layers)) if ring_entries else 0
        budget = int(0.5 * torch.cuda.mem_get_info(model.device)[0]) - ring_entries * ring_layers * per_layer
        per_token = max(c.num_layers - ring_layers, 1) * per_layer
        return max(min(budget // per_token, 1 << 20), max_context + 4096)
    return max(2 * max_context, 16384)


def _ring_count(model, per_ring: int, max_running: int) -> int:
    """Rings to make room for: one per sequence that may run, on a GPU at most what a quarter of the KV budget holds
    (more sequences wait, as when the pool is full; on the CPU untouched memory costs nothing)."""
    if model.device.type != "cuda":
        return max_running
    c = model.config
    per_entry = 2 * c.num_kv_heads * c.head_dim * torch.tensor([], dtype=model.dtype).element_size() * \
        sum(c.layer_window(i) is not None for i in range(c.num_layers))
    budget = 0.25 * 0.5 * torch.cuda.mem_get_info(model.device)[0]
    return max(1, min(max_running, int(budget // (per_ring * per_entry))))


def _ring_pass(model, window_ring: bool, ring_pass: int) -> int | None:
    """The widest pass written into a ring when the pool gives sliding-window layers rings, else None."""
    from ..models.transformer import Transformer

    if not window_ring or not isinstance(model, Transformer) or not model.windows:
        return None  # models without window layers; the transformers fallback and tensor parallelism: full pools
    if ring_pass < 16:  # a fused greedy chunk (16 steps) writes that far past the committed entries
        raise ValueError(f"ring_pass must be >= 16, got {ring_pass}")
    return ring_pass


class Engine:
    """A model, its tokenizer, and generation. Build one with `decodekit.load(...)`.

    Every path runs on one batched core (`engine.core`): `generate` of one prompt or a list, `n` samples of a
    prompt, `stream`, and callers that add requests while others run (`add_request` + `step`, as the server does).
    `kv_tokens` sizes the KV pool (default: half the free GPU memory, or two context windows on the CPU);
    `max_running` caps the sequences of one pass, `max_step_tokens` its tokens (the prefill chunk budget);
    `cuda_graphs` replays passes as CUDA graphs (native models on a GPU).
    `window_ring` (default on): sliding-window layers (Gemma 3's local layers) keep only their window, in a ring of
    window + 2 x `ring_pass` entries per sequence (`models/kv_cache.py`): a decode pass (root + draft) must fit in
    `ring_pass` (prefill chunks need not: their ring layers read through); such sequences do not use the prefix
    cache. Off: every layer keeps every entry (as models without window layers always do).
    """

    def __init__(self, model, tokenizer, name: str = "model", max_context: int | None = None,
                 kv_tokens: int | None = None, block_size: int = 16, max_running: int = 256,
                 max_step_tokens: int = 2048, prefix_caching: bool = True, cuda_graphs: bool = False,
                 window_ring: bool = True, ring_pass: int = 256) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.source_folder = None  # the HF-format folder the weights came from, if any
        self.generation_defaults: dict[str, Any] = {}  # sampling values of the model's generation_config.json
        self.max_context = min(max_context or model.config.max_position_embeddings,
                               model.config.max_position_embeddings)
        self.eos_ids = set(model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        if hasattr(model, "ensure_rope"):
            model.ensure_rope(self.max_context)
        ring = _ring_pass(model, window_ring, ring_pass)
        if ring is None:
            kv_tokens = kv_tokens or _default_kv_tokens(model, self.max_context)
            pool = model.make_pool(-(-kv_tokens // block_size) + 1, block_size)
        else:  # rings for the sequences that may run at once, at most what the full pool could hold
            from ..models.transformer import ring_capacity

            per_ring = max(ring_capacity(w, ring, block_size) for w in model.windows)
            rings = _ring_count(model, per_ring, max_running)
            kv_tokens = kv_tokens or _default_kv_tokens(model, self.max_context, rings * per_ring)
            num_blocks = -(-kv_tokens // block_size) + 1
            ring_blocks = min(num_blocks, rings * per_ring // block_size + 1)
            pool = model.make_pool(num_blocks, block_size, ring_pass=ring, ring_blocks=ring_blocks)
        if cuda_graphs:
            from .graphs import GraphRunner

            # A tensor-parallel model brings the runner that replays its passes on every rank.
            runner: ModelRunner = getattr(model, "graph_runner", GraphRunner)(model, pool)
        else:
            runner = ModelRunner(model, pool)
        config = SchedulerConfig(max_running, max_step_tokens, prefix_caching)
        self.core = EngineCore(model, tokenizer, self.eos_ids, self.max_context, runner, config)
        self.core._engine = self
        self.compilers: dict[str, ConstraintCompiler] = {}  # per grammar backend; each caches what it compiled

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string (raw, with the tokenizer's own special tokens, or as one user turn when
        `chat`), chat messages, or ids."""
        return encode_prompt(self.tokenizer, prompt, chat)

    # ---- constraints ---------------------------------------------------------------------------------------
    def compile_constraint(self, spec: ConstraintSpec, backend: str | None = None) -> Grammar:
        """`spec` compiled for this model's tokenizer by `backend` (default llguidance; or xgrammar), cached.
        Raises ValueError (one line) for an invalid or unsupported schema, regex or grammar."""
        name = backend or DEFAULT_BACKEND
        if name not in self.compilers:
            self.compilers[name] = ConstraintCompiler(self.tokenizer, sorted(self.eos_ids),
                                                      self.model.config.vocab_size, backend=name)
        return self.compilers[name].compile(spec)

    def _constraint(self, options: dict[str, Any]) -> Grammar | None:
        """Pop the constraint arguments from `options`: the compiled grammar they ask for, or None."""
        given = {k: options.pop(k) for k in CONSTRAINTS if k in options}
        backend = options.pop("constraint_backend", None)
        grammar = options.pop("constraint", None)
        if grammar is not None and given:
            raise ValueError(f"give at most one constraint, got constraint and {' and '.join(given)}")
        if isinstance(grammar, ConstraintSpec):
            return self.compile_constraint(grammar, backend)
        if grammar is not None and not isinstance(grammar, Grammar):
            raise ValueError(f"constraint must be a ConstraintSpec or a compiled Grammar, got {type(grammar).__name__}")
        spec = constraint_spec(**given)
        if spec is not None:
            return self.compile_constraint(spec, backend)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown grammar backend {backend!r}; available: {', '.join(BACKENDS)}")
        return grammar

    # ---- requests ------------------------------------------------------------------------------------------
    def make_request(self, prompt, max_new_tokens: int = 128, *, method: str | Drafter = "plain",
                     sampling: SamplingConfig | None = None, stop: Seq[str] | None = None, chat: bool = False,
                     verifier: str | None = None, n: int = 1, method_options: dict[str, Any] | None = None,
                     press: str | None = None, compression_ratio: float = 0.0,
                     press_options: dict[str, Any] | None = None, **options) -> Request:
        """A validated request. `options`: sampling fields (temperature, top_p, seed, ...), `ignore_eos`,
        `adaptive`, `logprobs` (k: record each output token's logprob and k alternatives, in `Sequence.logprobs`),
        `trace` (True: every decode step's shape in `result.stats.trace`; engine/trace.py, bench/trace_replay.py),
        a constraint on the output (`json_schema` (dict or JSON text), `regex`, `grammar` (Lark), `choice` (list
        of strings), OpenAI's `response_format`, or `constraint` (a ConstraintSpec or compiled Grammar); with
        `constraint_backend` "llguidance" (default) or "xgrammar", `constraint_sampler` "mask" (default) or
        "awrs"), and the method's own knobs and the press's; `method_options` / `press_options` hold knobs only
        (for names that are also a sampling field or the other's knob). `press`: a KV press by name
        (`decodekit.kv.PRESSES`) with `compression_ratio` R, the fraction of the KV cache removed (0.75 keeps a
        quarter); see `kv/paged`. Raises ValueError for bad input, an invalid schema, regex or grammar included,
        before anything is queued."""
        options = dict(options)
        if "search" in options or "return_all" in options:
            raise ValueError("search strategies run through generate(..., search=NAME)")
        constraint = self._constraint(options)
        engine_kw = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
        knobs = self._knobs(method)
        press_kw = dict(press_options or {})
        if press is not None:
            if not hasattr(self.model, "layers"):  # presses act through the native decoder's attention hook
                raise ValueError(f"KV presses need a natively supported model; {self.name} runs through transformers")
            if getattr(self.model, "world", 1) > 1:  # a press reads and compacts one rank's pool only
                raise ValueError("KV presses do not run under tensor parallelism yet")
            pk = press_knobs(press)
            both = sorted(pk & knobs & set(options))
            if both:
                raise ValueError(f"option {both[0]!r} is a knob of method {method!r} and of press {press!r}: pass it "
                                 "in method_options or press_options (CLI: -O or -P)")
            press_kw.update({k: options.pop(k) for k in list(options) if k in pk and k not in SAMPLING_FIELDS})
        elif press_kw or compression_ratio:
            raise ValueError("press options and compression_ratio need a press (press=NAME)")
        press_spec = PressSpec(press, float(compression_ratio), press_kw) if press is not None else None
        sampling_kw = {k: options.pop(k) for k in list(options) if k in SAMPLING_FIELDS}
        ambiguous = sorted(set(sampling_kw) & knobs)
        if ambiguous:
            k = ambiguous[0]
            raise ValueError(f"option {k!r} is both a sampling setting and a knob of method {method!r}: pass "
                             f"sampling=SamplingConfig({k}=...) for the target, or method_options={{{k!r}: ...}} "
                             "(CLI: -O) for the method")
        if sampling is None:  # the model's generation_config.json defaults, under what the caller gave
            sampling = SamplingConfig.with_defaults(self.generation_defaults, sampling_kw)
        else:
            sampling = SamplingConfig(**{**asdict(sampling), **sampling_kw})
        sampling.validate()
        method_kw = {**options, **(method_options or {})}
        if isinstance(method, str) and method not in DRAFTERS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(DRAFTERS))}")
        unknown = sorted(set(method_kw) - knobs) if isinstance(method, str) else []
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for method {method!r}"
                             + (f"; its knobs: {', '.join(sorted(knobs))}" if knobs else " (it has no knobs)"))
        return Request(self.encode(prompt, chat), max_new_tokens, sampling, method, method_kw,
                       list(stop or []), n, verifier=verifier, press=press_spec, constraint=constraint,
                       **engine_kw)

    @staticmethod
    def _knobs(method) -> set[str]:
        cls = method if isinstance(method, type) else DRAFTERS.get(method) if isinstance(method, str) else type(method)
        if cls is None or not is_dataclass(cls):
            return set()
        return {f.name for f in fields(cls)}

    def add_request(self, prompt, max_new_tokens: int = 128, **kwargs) -> Request:
        """Queue a request while others may be running; drive it with `step()`."""
        return self.core.add(self.make_request(prompt, max_new_tokens, **kwargs))

    def step(self) -> list:
        """One step of the core: every running sequence advances; returns the sequences that changed."""
        return self.core.step()

    def _run_until(self, requests: list[Request]) -> None:
        try:
            while not all(r.finished for r in requests):
                if not self.core.has_work():
                    raise RuntimeError("the engine has no work left but requests are unfinished")
                self.core.step()
        except BaseException:
            for r in requests:
                self.core.abort(r)
            raise

    # ---- public API ----------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, *, search: str | None = None,
                 search_options: dict[str, Any] | None = None, return_all: bool = False, **kwargs):
        """Generate from one prompt (a `GenerationResult`; with `n` > 1 a list of `n`), or from a list of prompts
        (one entry per prompt, in order), all as one batch on the core. See `make_request` for the options.

        `search=NAME` runs a search strategy (`decodekit/search/`: beam, contrastive, best_of_n, ...) per prompt,
        all prompts as one batch: the result is the sequence it chose, its score in `stats.score`; with
        `return_all=True` a `SearchResult(chosen, candidates)` (candidates best first, the chosen one included).
        Its knobs come in `search_options={...}`, or as keywords when the name is no sampling field, engine option or
        method knob (`n` is the strategy's own when it has one)."""
        many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list, tuple)) and \
            not isinstance(prompt[0], dict)
        prompts = prompt if many else [prompt]
        strategy = None
        if search is not None:
            strategy, kwargs = self._search(search, search_options, kwargs)
        elif search_options or return_all:
            raise ValueError("search_options and return_all need search=NAME")
        requests = [self.make_request(p, max_new_tokens, **kwargs) for p in prompts]  # all valid, or none queued
        if strategy is not None:
            for r in requests:
                strategy.prepare(self, r)
        self.core.add_all(requests)
        self._run_until(requests)
        results = []
        for r in requests:
            self.core.requests.pop(r.id, None)
            if strategy is not None:
                found = strategy.select(self, r)
                results.append(found if return_all else found.chosen)
                continue
            out = [s.result() for s in sorted(r.sequences, key=lambda s: s.index)]
            results.append(out if r.n > 1 else out[0])
        return results if many else results[0]

    def _search(self, name: str, search_options: dict[str, Any] | None, kwargs: dict[str, Any]):
        """The strategy `name` with its knobs (from `search_options`, and keywords that name only a knob of it), and
        the keywords left for `make_request`."""
        from ..search import SEARCHES, make_search, search_knobs

        if name not in SEARCHES:
            raise ValueError(f"unknown search {name!r}; available: {', '.join(sorted(SEARCHES))}")
        knobs = search_knobs(name)
        kwargs, options = dict(kwargs), dict(search_options or {})
        method_knobs = self._knobs(kwargs.get("method", "plain"))
        for key in [k for k in kwargs if k in knobs]:
            other = ("a sampling setting" if key in SAMPLING_FIELDS else "an engine option" if key in ENGINE_OPTIONS
                     else "a knob of the method" if key in method_knobs else None)
            if other is not None:
                raise ValueError(f"option {key!r} is both a knob of search {name!r} and {other}: pass "
                                 f"search_options={{{key!r}: ...}} (CLI: -S) for the search")
            options[key] = kwargs.pop(key)
        if "n" in kwargs:
            raise ValueError(f"search {name!r} returns one sequence per prompt; it takes no n")
        named = set(inspect.signature(self.make_request).parameters)
        unknown = sorted(k for k in kwargs if k not in named and k not in SAMPLING_FIELDS and k not in ENGINE_OPTIONS
                         and k not in method_knobs)
        if unknown:  # name both owners a keyword could have meant, not only the method's
            raise ValueError(f"unknown option {unknown[0]!r} for search {name!r} (its knobs: "
                             f"{', '.join(sorted(knobs))}) or method {kwargs.get('method', 'plain')!r}")
        return make_search(name, options), kwargs

    def stream(self, prompt, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are committed; the final GenerationResult is the generator's return value.

        Text that might still become a stop string is held back until it is known not to be one."""
        request = self.core.add(self.make_request(prompt, max_new_tokens, **kwargs))
        shown = 0
        try:
            while not request.finished:
                self.core.step()
                seq = request.sequences[0]
                text = seq.stopper.text if seq.finished else seq.stopper.visible()
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
        finally:
            if not request.finished:
                self.core.abort(request)
            self.core.requests.pop(request.id, None)
        return request.sequences[0].result()


__all__ = ["Engine", "GenerationResult"]
