"""Trace replay: the forward passes a recorded generation ran, run again on another model's shape, and timed.

What it measures: the wall-clock time the replay model's passes take when they have the recorded widths (a verify
pass of root + draft nodes, with tree attention when the draft was a tree; each draft pass at its cost on the
replay shape) and the KV cache grows as it did (by accepted + 1 per verified step). With the acceptance of a real
(small) model, that is the speedup a method would reach on a memory-bound large model, *assuming the large model
accepts as the small one did*. Verify passes and fused greedy chunks go through the engine's own runner (on a GPU
`GraphRunner`: the captured graphs the engine would replay); draft passes run as the drafters run them
(`forward_seq`, eagerly). Each pass's result is read on the host, as the engine and drafters do.

What it leaves out: host work of the step (planning, verifying, committing, the drafters' own host work such as
n-gram matching), and the target's prefill (the same for every method; a draft model's prompt prefill is counted).

Draft passes on the replay shape:
- "target" (self-drafting: layerskip, compressed-cache drafters): the replay model with the recorded fraction of
  its layers (`layers / of`), reading `kv` entries of a cache of its own;
- "head": `layers` decoder layers of the replay shape (EAGLE 1, a Hydra prefix 1, MLP heads 0) and its LM head over
  the pass's rows (an MLP head's own small linears are left out). Given a head engine (the replay shape cut to one
  layer, `random:llama3-8b:layers=1`), head passes go through its runner (on a GPU captured graphs, as the engine
  runs a head's draft) and only a step's last head pass is read on the host (the engine copies a head's draft to the
  host once; MLP heads' passes, 0 layers, are charged the one layer too: an upper bound); without one, they run
  eagerly on the replay model with the other layers skipped;
- "draft_model": the whole draft model given to the replayer (e.g. `random:llama3.2-1b` for an 8B target).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..models.batch import RowSpec
from ..models.kv_cache import SeqKV
from ..speculative.base import DraftTree
from ..speculative.draft_model import native_model

TOKEN = 1  # every replayed token: costs do not depend on token values
PREFILL_CHUNK = 2048


def committed(trace: dict[str, Any]) -> int:
    """Tokens the decode steps of a trace committed (the generation's tokens after the first)."""
    return sum(s["committed"] for s in trace["steps"])


def decode_steps(trace: dict[str, Any]) -> int:
    """Target decode passes (a fused chunk counts each of its single-token passes), as `stats.decode_steps`."""
    return sum(s["committed"] if "fused" in s else 1 for s in trace["steps"])


def kv_needed(trace: dict[str, Any]) -> int:
    """Entries one replay of `trace` may hold at once in its largest cache."""
    total = trace["prompt_tokens"] + sum(s["accepted"] + 1 if "fused" not in s else
                                         s["fused"]["steps"] * s["fused"]["chunks"] for s in trace["steps"])
    widest = max((d["kv"] + d["width"] * d.get("steps", 1) for s in trace["steps"] for d in s["draft_passes"]),
                 default=0)
    return max(total, widest) + max((s["verify_width"] for s in trace["steps"]), default=1) + 64


def path_nodes(parents: list[int] | bool, accepted: int) -> list[int]:
    """Root and `accepted` nodes along a path of the tree (to the first node of that depth): which entries the
    engine keeps (`SeqKV.keep_path`) after such a step."""
    if not parents:
        return list(range(accepted + 1))
    depths = DraftTree([TOKEN] * len(parents), list(parents)).depths()
    if accepted not in depths:
        raise ValueError(f"a tree {max(depths)} nodes deep has no path of {accepted} accepted nodes")
    path = [depths.index(accepted)]
    while path[-1]:
        path.append(parents[path[-1] - 1])
    return path[::-1]


@dataclass
class Replayer:
    """Replays traces on `engine`'s model (its runner and pool); `draft`: the engine of the draft model, for traces
    with draft-model passes; `head`: a one-layer engine of the replay shape for head passes (else eager passes)."""

    engine: Any
    draft: Any = None
    head: Any = None
    caches: dict[str, SeqKV] = field(default_factory=dict)  # "target" / "draft_model": the draft passes' caches
    filled: dict[str, int] = field(default_factory=dict)  # entries written in each

    def __post_init__(self) -> None:
        self.net = native_model(self.engine.model)
        self.runner, self.pool = self.engine.core.runner, self.engine.core.pool
        self.max_chunks = self.engine.core.max_chunks
        self.cuda = self.net.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.net.device)

    # ---- caches ------------------------------------------------------------------------------------------
    def _prefill(self, kv: SeqKV, net, n: int) -> None:
        """Write `n` entries (untimed): later passes read finite keys and values."""
        kv.rollback(0)
        with torch.inference_mode():
            for s in range(0, n, PREFILL_CHUNK):
                m = min(PREFILL_CHUNK, n - s)
                net.forward_seq(kv, [TOKEN] * m, list(range(s, s + m)), None, "none")

    def _aux(self, key: str, n: int) -> tuple[SeqKV, Any]:
        """The cache that draft passes read ("target": the replay model's, for self-drafting and heads;
        "draft_model": the draft model's), holding at least `n` written entries."""
        if key == "draft_model":
            if self.draft is None:
                raise ValueError("the trace has draft-model passes: give the draft model's shape (--draft-model)")
            net, pool = native_model(self.draft.model), self.draft.core.pool
        elif key == "head":
            net, pool = native_model(self.head.model), self.head.core.pool
        else:
            net, pool = self.net, self.pool
        if key not in self.caches:
            self.caches[key] = SeqKV(pool)
        kv = self.caches[key]
        if self.filled.get(key, 0) < n:
            self._prefill(kv, net, n)
            self.filled[key] = n
        return kv, net

    def release(self) -> None:
        for kv in self.caches.values():
            kv.free()
        self.caches.clear()
        self.filled.clear()

    # ---- passes ------------------------------------------------------------------------------------------
    def _cache_key(self, d: dict[str, Any]) -> str:
        """Which cache a draft pass reads: the draft model's, the head engine's, or the replay model's."""
        if d["model"] == "head" and self.head is not None:
            return "head"
        return "draft_model" if d["model"] == "draft_model" else "target"

    def _head_pass(self, kv: SeqKV, d: dict[str, Any], read: bool) -> None:
        """A head pass through the head engine's runner; `read`: the step's last one, copied to the host."""
        width, pos = d["width"], d["kv"]
        kv.length = pos
        kv.ensure(pos + width)
        logits = {0: "none", 1: "last"}.get(d.get("logits"), "all")
        out = self.head.core.runner.run([RowSpec(kv, [TOKEN] * width, list(range(pos, pos + width)), None, logits)])
        kv.length += width
        if read and out.shape[0]:
            out.argmax(-1).tolist()

    def _draft_pass(self, d: dict[str, Any], caches: dict[str, tuple[SeqKV, Any]], last: bool = True) -> None:
        key = self._cache_key(d)
        kv, net = caches[key]
        if key == "head":
            return self._head_pass(kv, d, last)
        n = net.config.num_layers
        if d["model"] == "head":
            keep = min(int(d.get("layers", 1)), n)
        elif d["model"] == "target":
            keep = max(1, round(n * d.get("layers", n) / d.get("of", n))) if d.get("layers", n) else 0
        else:
            keep = n
        skip = frozenset(range(keep, n))
        width, pos = d["width"], d["kv"]
        kv.length = pos  # entries up to `filled` are written: a shorter or longer cache is only a length
        if d.get("steps"):  # a fused greedy chunk of single-token passes (the runner's, over this cache)
            kv.ensure(pos + d["steps"])
            run = self.runner.greedy_chunks([kv], [TOKEN], [pos], d["steps"], 1)
            for _ in run:
                pass
            return
        logits = {0: "none", 1: "last"}.get(d.get("logits"), "all")
        out = net.forward_seq(kv, [TOKEN] * width, list(range(pos, pos + width)), None, logits, skip_layers=skip)
        if out.shape[0]:
            out.argmax(-1).tolist()  # drafters read each pass's tokens on the host

    def _verify(self, kv: SeqKV, step: dict[str, Any]) -> None:
        root, width, parents = kv.length, step["verify_width"], step.get("tree", False)
        if "fused" in step:
            steps, chunks = step["fused"]["steps"], step["fused"]["chunks"]
            kv.ensure(root + steps * chunks)
            run = self.runner.greedy_chunks([kv], [TOKEN], [root], steps, chunks)
            for _ in run:
                pass
            kv.rollback(root + step["committed"])
            return
        mask = None
        positions = list(range(root, root + width))
        if parents:
            tree = DraftTree([TOKEN] * (width - 1), list(parents))
            positions, mask = [root + d for d in tree.depths()], tree.ancestor_mask()
        kv.ensure(root + width)
        logits = self.runner.run([RowSpec(kv, [TOKEN] * width, positions, mask, "all")])
        logits.argmax(-1).tolist()  # the step's one host read
        kv.length += width
        kv.keep_path(root, path_nodes(parents, step["accepted"]))

    def _plain_tokens(self, kv: SeqKV, n: int, fused: bool) -> None:
        """`n` plain greedy tokens as the engine decodes them: fused chunks of the runner's sizes (up to the core's
        `max_chunks` per step) while they fit, else one width-1 pass a token (`fused=False`: always)."""
        left = n
        while left:
            sizes = [s for s in self.runner.fused_sizes if s <= left] if fused else []
            if sizes:
                steps = sizes[0]
                chunks = max(1, min(left // steps, self.max_chunks))
                self._verify(kv, {"verify_width": 1, "fused": {"steps": steps, "chunks": chunks},
                                  "committed": steps * chunks})
                left -= steps * chunks
            else:
                self._verify(kv, {"verify_width": 1, "tree": False, "accepted": 0, "committed": 1})
                left -= 1

    # ---- timing ------------------------------------------------------------------------------------------
    def time(self, trace: dict[str, Any], repeats: int = 3, plain: str | None = None) -> float:
        """Median seconds of the decode steps of `trace` (`plain`: "fused" or "single" replays plain decoding of
        the same prompt length and token count instead), after one untimed warm-up (graph captures)."""
        prompt = trace["prompt_tokens"]
        if prompt + committed(trace) + 1 > self.engine.max_context:
            raise ValueError(f"the trace needs {prompt + committed(trace) + 1} positions; "
                             f"the replay model's context window is {self.engine.max_context}")
        kv = SeqKV(self.pool)
        try:
            self._prefill(kv, self.net, prompt)
            kinds = {}
            for s in trace["steps"] if plain is None else []:
                for d in s["draft_passes"]:
                    key = self._cache_key(d)
                    kinds[key] = max(kinds.get(key, 0), d["kv"] + d["width"] * d.get("steps", 1))
            caches = {k: self._aux(k, n) for k, n in kinds.items()}

            def once() -> None:
                if plain is not None:
                    self._plain_tokens(kv, committed(trace), plain == "fused")
                    return
                for step in trace["steps"]:
                    passes = step["draft_passes"]
                    for i, d in enumerate(passes):
                        self._draft_pass(d, caches, last=i == len(passes) - 1)
                    self._verify(kv, step)

            times = []
            with torch.inference_mode():
                for r in range(repeats + 1):
                    kv.rollback(prompt)
                    self.sync()
                    t = time.perf_counter()
                    once()
                    self.sync()
                    if r:  # run 0: the warm-up
                        times.append(time.perf_counter() - t)
            return statistics.median(times)
        finally:
            kv.free()


def replay_traces(replayer: Replayer, lines: list[dict[str, Any]], repeats: int = 3,
                  progress: Callable[[str], None] | None = None, single: bool = True,
                  on_trace: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Per method: replayed seconds per generated token, speedup over plain decoding replayed on the same prompt
    lengths and token counts (the engine's fused greedy chunks, and with `single` one width-1 pass a token), mean
    tau. `on_trace` gets the figures so far after every trace (a replay cut short keeps what it measured)."""
    plain: dict[tuple[int, int, str], float] = {}
    methods: dict[str, dict[str, Any]] = {}
    for line in lines:
        trace = line["trace"]
        key = (trace["prompt_tokens"], committed(trace))
        for kind in ("fused", "single") if single else ("fused",):
            if (*key, kind) not in plain:
                plain[(*key, kind)] = replayer.time(trace, repeats, plain=kind)
        seconds = replayer.time(trace, repeats)
        m = methods.setdefault(line["method"], {"traces": 0, "tokens": 0, "steps": 0, "seconds": 0.0,
                                                "plain_s": 0.0, "plain_single_s": 0.0})
        m["traces"] += 1
        m["tokens"] += key[1]
        m["steps"] += decode_steps(trace)
        m["seconds"] += seconds
        m["plain_s"] += plain[(*key, "fused")]
        m["plain_single_s"] += plain.get((*key, "single"), 0.0)
        _derive(m)
        if progress is not None:
            progress(f"{line['method']} {line['prompt_id']}: {seconds * 1e3:.1f} ms for {key[1]} tokens")
        if on_trace is not None:
            on_trace(methods)
    replayer.release()
    return methods


def _derive(m: dict[str, Any]) -> None:
    tokens = max(m["tokens"], 1)
    m["s_per_token"] = m["seconds"] / tokens
    m["plain_s_per_token"] = m["plain_s"] / tokens
    m["speedup"] = m["plain_s"] / max(m["seconds"], 1e-12)
    m["speedup_vs_single"] = m["plain_single_s"] / max(m["seconds"], 1e-12) if m["plain_single_s"] else None
    m["tau"] = m["tokens"] / max(m["steps"], 1)


def format_table(methods: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"TRACE REPLAY on {meta['replay_model']} ({meta['device']}, {meta['dtype']}): acceptance recorded on "
            f"{meta['recorded_on']}, passes replayed; draft model {meta.get('draft_model') or '-'}")
    rows = [head, f"{'method':34s} {'traces':>6s} {'tokens':>7s} {'ms/token':>9s} {'plain ms/tok':>12s} "
                  f"{'speedup':>8s} {'vs 1-pass':>9s} {'tau':>6s}"]
    for name, m in methods.items():
        single = f"{m['speedup_vs_single']:8.2f}x" if m["speedup_vs_single"] is not None else f"{'-':>9s}"
        rows.append(f"{name:34s} {m['traces']:6d} {m['tokens']:7d} {m['s_per_token'] * 1e3:9.3f} "
                    f"{m['plain_s_per_token'] * 1e3:12.3f} {m['speedup']:7.2f}x {single} {m['tau']:6.2f}")
    return "\n".join(rows)
