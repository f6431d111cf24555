"""Long-context evals: needle in a haystack, RULER-style synthetic tasks, and fidelity to the uncompressed run.

Everything is generated here from one haystack, the Paul Graham essays of gkamradt's needle-in-a-haystack
(`long_context/PaulGrahamEssays_repo49.json` in the data folder), with prompts in the style of RULER (Hsieh et al.
2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"), written anew:
- `niah`: one needle ("One of the special magic numbers for {key} is: {value}.") at a depth (0 = the start of the
  haystack, 1 = its end) of a haystack cut to a total prompt length; the answer must contain the value.
- `niah_multikey`: the needle among `distractors` needles of other keys (RULER's multikey: the right key counts).
- `niah_multivalue`: `values` needles with the same key; the score is the fraction of values given.
- `vt` (variable tracking): a chain `VAR A = 12345. VAR B = VAR A. ...` of `hops` assignments spread over the
  haystack; which variables hold the value? The score is the fraction of the chain's names given.
- `cwe` (common words extraction): a numbered list of words, 10 of them repeated 30 times (fewer in a short
  prompt, at least twice), the others 3 times (once beside fewer than 6 repeats), as long as the length asks;
  which are the 10 most common? The score is the fraction named.
- `fidelity`: the essays themselves cut to a length; the fraction of greedy continuation tokens identical to the
  uncompressed run (position by position, and the identical prefix).
Answers are greedy, scored by string match (RULER's "string_match_all": the share of references in the output).

`run(engine, tasks, lengths, depths, presses, ...)` returns one record per (task, length, depth, press, sample);
`report(records)` writes the JSON, a markdown table, heatmaps of accuracy by length x depth per press and accuracy
against compression ratio per press. `decodekit eval-long` is the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HAYSTACK = Path("long_context") / "PaulGrahamEssays_repo49.json"
TASKS = ("niah", "niah_multikey", "niah_multivalue", "vt", "cwe", "fidelity")
RULER = ("niah_multikey", "niah_multivalue", "vt", "cwe")
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(override: str | None = None) -> Path:
    """`override`, else `$DECODEKIT_DATA`, else `../shared/data` beside the repository (the eval harness's rule)."""
    path = Path(override or os.environ.get("DECODEKIT_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not (path / HAYSTACK).is_file():
        raise FileNotFoundError(f"haystack not found: {path / HAYSTACK}; pass --data-dir or set DECODEKIT_DATA")
    return path


# ---- the haystack --------------------------------------------------------------------------------------------
@dataclass
class Haystack:
    sentences: list[str]
    tokens: list[int]  # tokens of each sentence (counted alone: the prompt's exact length is measured at the end)

    @classmethod
    def load(cls, tokenizer, folder: Path | None = None, text: str | None = None) -> "Haystack":
        if text is None:
            text = json.loads((data_dir(folder) / HAYSTACK).read_text(encoding="utf-8"))["text"]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        return cls(sentences, [len(tokenizer.encode(s, add_special_tokens=False)) for s in sentences])

    def cut(self, n_tokens: int) -> list[str]:
        """Sentences from the start (the essays again from the top if needed) adding up to about `n_tokens`."""
        out, total, i = [], 0, 0
        while total < n_tokens:
            k = i % len(self.sentences)
            if total + self.tokens[k] > n_tokens and out:
                break
            out.append(self.sentences[k])
            total += self.tokens[k] + 1
            i += 1
        return out


# ---- samples -------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    task: str
    length: int  # the prompt length asked for, in tokens
    depth: float | None
    prompt: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random, words: list[str], taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(words)}-{rng.choice(words)}"
        if k not in taken:
            taken.add(k)
            return k


def _place(sentences: list[str], inserts: list[tuple[float, str]]) -> str:
    """The haystack with each (depth, sentence) inserted at that fraction of it (between sentences)."""
    out = list(sentences)
    for depth, text in sorted(inserts, key=lambda x: -x[0]):  # deepest first: earlier indices stay valid
        out.insert(round(depth * len(sentences)), text)
    return " ".join(out)


def vocabulary(haystack: Haystack) -> list[str]:
    """Lower-case alphabetic words of the essays (4-10 letters), in order of first appearance."""
    seen: dict[str, None] = {}
    for s in haystack.sentences:
        for w in re.findall(r"[A-Za-z]{4,10}", s):
            seen.setdefault(w.lower(), None)
    return list(seen)


def make_sample(task: str, haystack: Haystack, tokenizer, length: int, depth: float | None, rng: random.Random,
                words: list[str], digits: int = 5, distractors: int = 3, values: int = 4, hops: int = 4
                ) -> Sample:
    """One sample of `task` whose prompt is about `length` tokens (RULER-style templates, answer prefixes)."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    if task.startswith("niah"):
        taken: set[str] = set()
        key = _key(rng, words, taken)
        n_values = values if task == "niah_multivalue" else 1
        answers = [_number(rng, digits) for _ in range(n_values)]
        needles = [(depth, f"One of the special magic numbers for {key} is: {v}.") for v in answers]
        if task == "niah_multivalue":  # the first at `depth`, the others spread at random
            needles = needles[:1] + [(rng.random(), t) for _, t in needles[1:]]
        if task == "niah_multikey":
            needles += [(rng.random(), f"One of the special magic numbers for {_key(rng, words, taken)} is: "
                                       f"{_number(rng, digits)}.") for _ in range(distractors)]
        plural = "numbers" if n_values > 1 else "number"
        question = (f"\nWhat {'are all the' if n_values > 1 else 'is the'} special magic {plural} for {key} "
                    f"mentioned in the provided text? The special magic {plural} for {key} mentioned in the "
                    f"provided text {'are' if n_values > 1 else 'is'}")
        budget = length - count(NIAH_INTRO + question) - sum(count(t) for _, t in needles)
        prompt = NIAH_INTRO + _place(haystack.cut(budget), needles) + question
        return Sample(task, length, depth, prompt, answers, {"key": key})
    if task == "vt":
        value = _number(rng, digits)
        taken = set()
        names = [_key(rng, words, taken).upper().replace("-", "") for _ in range(hops + 1)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
        depths = sorted(rng.random() for _ in chain)  # in order: each assignment after the one it copies
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                    f"variables are assigned the value {value}, they are:")
        budget = length - count(intro + question) - sum(count(t) for t in chain)
        prompt = intro + _place(haystack.cut(budget), list(zip(depths, chain))) + question
        return Sample(task, length, None, prompt, names, {"value": value})
    if task == "cwe":
        common = rng.sample(words, 10)
        rest = [w for w in words if w not in common]
        rng.shuffle(rest)
        intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.\n")
        question = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
                    "appear most often in the list are:")
        per_word = max(count(f"\n{length // 8}. {w}") for w in common)
        lines = (length - count(intro + question)) // per_word
        # RULER: the common words 30 times, the others 3; a short list repeats the common ones less (and the others
        # once when the common ones come fewer than 6 times).
        freq = min(30, lines // 30)
        rare_freq = 3 if freq >= 6 else 1
        if freq < 2:
            raise ValueError(f"cwe needs a longer prompt than {length} tokens with this tokenizer")
        n_rare = (lines - 10 * freq) // rare_freq
        listed = common * freq + rest[:n_rare] * rare_freq
        rng.shuffle(listed)
        body = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
        return Sample(task, length, None, intro + body + question, common, {"rare_words": n_rare, "freq": freq})
    if task == "fidelity":
        return Sample(task, length, None, " ".join(haystack.cut(length)), [])
    raise ValueError(f"unknown long-context task {task!r}; available: {', '.join(TASKS)}")


def score(sample: Sample, output: str) -> float:
    """The share of the sample's answers found in the output (words: case-insensitive, whole words)."""
    if not sample.answers:
        return 0.0
    found = 0
    for a in sample.answers:
        if a.isdigit():
            found += a in output
        else:
            found += re.search(rf"\b{re.escape(a)}\b", output, re.IGNORECASE) is not None
    return found / len(sample.answers)


# ---- presses to compare ------------------------------------------------------------------------------------
@dataclass
class PressConfig:
    """`none`, or `name[:ratio[:k=v,k=v]]` (e.g. `snapkv:0.75`, `kivi::bits=2`)."""

    name: str | None
    ratio: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "PressConfig":
        parts = text.split(":")
        if parts[0] in ("none", ""):
            return cls(None)
        from ..cli import parse_options  # the CLI's KEY=VALUE rule (imported here: the CLI imports this module)

        ratio = float(parts[1]) if len(parts) > 1 and parts[1] else 0.0
        pairs = parts[2].split(",") if len(parts) > 2 and parts[2] else []
        return cls(parts[0], ratio, parse_options(pairs, "press"))

    @property
    def label(self) -> str:
        if self.name is None:
            return "none"
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{self.ratio:g}" + (f":{opts}" if opts else "")

    def kwargs(self) -> dict[str, Any]:
        if self.name is None:
            return {}
        return {"press": self.name, "compression_ratio": self.ratio, "press_options": dict(self.options)}


# ---- running -----------------------------------------------------------------------------------------------
def make_samples(engine, haystack: Haystack, tasks: list[str], lengths: list[int], depths: list[float],
                 samples: int, seed: int = 0, **knobs) -> list[Sample]:
    words = vocabulary(haystack)
    out = []
    for task in tasks:
        for length in lengths:
            for depth in (depths if task.startswith("niah") else [None]):
                for i in range(samples):
                    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{i}")
                    out.append(make_sample(task, haystack, engine.tokenizer, length, depth, rng, words, **knobs))
    return out


def run(engine, samples: list[Sample], presses: list[PressConfig], max_new_tokens: int = 32, batch: int = 4,
        chat: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Greedy answers to every sample under every press; one record each (fidelity: against the `none` run)."""
    from ..sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0.0)
    records = []
    baseline: dict[int, list[int]] = {}
    order = sorted(presses, key=lambda p: p.name is not None)  # uncompressed first: fidelity compares with it
    fidelity = [s for s in samples if s.task == "fidelity"]
    if fidelity and order[0].name is not None:
        order.insert(0, PressConfig(None))
    for press in order:
        for start in range(0, len(samples), batch):
            part = samples[start:start + batch]
            t0 = time.perf_counter()
            results = engine.generate([s.prompt for s in part], max_new_tokens, sampling=greedy, chat=chat,
                                      ignore_eos=False, **press.kwargs())
            elapsed = time.perf_counter() - t0
            for i, (s, r) in enumerate(zip(part, results)):
                rec = {"task": s.task, "length": s.length, "prompt_tokens": len(r.prompt_ids), "depth": s.depth,
                       "press": press.name or "none", "ratio": press.ratio, "config": press.label,
                       "output": r.text, "answers": s.answers,
                       "kv_bytes_final": r.stats.kv_bytes_final, "kv_bytes_peak": r.stats.kv_bytes_peak,
                       "kv_bytes_uncompressed": r.stats.kv_bytes_uncompressed, "seconds": elapsed / len(part)}
                if s.task == "fidelity":
                    key = start + i
                    if press.name is None:
                        baseline[key] = r.token_ids
                    ref = baseline.get(key, r.token_ids)
                    same = [a == b for a, b in zip(r.token_ids, ref)]
                    rec["score"] = sum(same) / max(len(ref), 1)
                    rec["prefix"] = (same.index(False) if False in same else len(same)) / max(len(ref), 1)
                else:
                    rec["score"] = score(s, r.text)
                records.append(rec)
            if progress:
                done = [r["score"] for r in records if r["config"] == press.label]
                print(f"[{press.label}] {len(done)}/{len(samples)} mean {sum(done) / len(done):.3f}", file=sys.stderr)
    return records


# ---- reporting ---------------------------------------------------------------------------------------------
def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score and KV bytes per (task, press config, length)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["config"], r["length"]), []).append(r)
    rows = []
    for (task, config, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        held = sum(r["kv_bytes_final"] for r in rs) / sum(r["kv_bytes_uncompressed"] for r in rs)
        rows.append({"task": task, "config": config, "length": length, "n": len(rs),
                     "score": sum(r["score"] for r in rs) / len(rs), "kv_held": held,
                     "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | length (tokens) | press | n | score | KV held / uncompressed |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['prompt_tokens']} | {r['config']} | {r['n']} | {r['score']:.3f} | "
                     f"{r['kv_held']:.3f} |")
    return "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Heatmaps (length x depth) per press config for each needle task, and score against compression ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r["task"] for r in records if r["depth"] is not None}):
        configs = sorted({r["config"] for r in records if r["task"] == task})
        fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 3), squeeze=False)
        for ax, config in zip(axes[0], configs):
            rs = [r for r in records if r["task"] == task and r["config"] == config]
            lengths, depths = sorted({r["length"] for r in rs}), sorted({r["depth"] for r in rs})
            grid = [[_mean([r["score"] for r in rs if r["length"] == n and r["depth"] == d]) for d in depths]
                    for n in lengths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_title(config, fontsize=8)
            ax.set_xlabel("needle depth", fontsize=7)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        axes[0][0].set_ylabel("prompt tokens", fontsize=7)
        fig.suptitle(f"{task}: accuracy by length x depth", fontsize=9)
        fig.tight_layout()
        path = folder / f"{task}_heatmap.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for task in sorted({r["task"] for r in records}):
        rs = [r for r in records if r["task"] == task]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        base = [r["score"] for r in rs if r["press"] == "none"]
        if base:
            ax.axhline(_mean(base), color="k", ls="--", lw=1, label="uncompressed")
        for series in sorted({_series(r["config"]) for r in rs} - {"none"}):
            mine = [r for r in rs if _series(r["config"]) == series]
            pts = sorted({r["ratio"] for r in mine})
            # x: the fraction of KV bytes removed as measured (quantization presses have no ratio; sparse-attention
            # presses hold everything and sit at 0 though they read only a part)
            xs = [1 - _mean([r["kv_bytes_final"] / r["kv_bytes_uncompressed"] for r in mine if r["ratio"] == x])
                  for x in pts]
            ys = [_mean([r["score"] for r in mine if r["ratio"] == x]) for x in pts]
            ax.plot(xs, ys, marker="o", label=series)
        ax.set_xlabel("fraction of KV bytes removed (measured, at the end)")
        ax.set_ylabel("fidelity" if task == "fidelity" else "accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task}: score against compression", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{task}_by_ratio.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _series(config: str) -> str:
    """A press config's label without its ratio (`snapkv:0.75:kernel_size=15` -> `snapkv:kernel_size=15`)."""
    parts = config.split(":")
    return parts[0] + (":" + parts[2] if len(parts) > 2 else "")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def report(records: list[dict[str, Any]], folder: str | Path, meta: dict[str, Any], plot: bool = True) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summary(records)
    (folder / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "records": records}, indent=1))
    (folder / "summary.md").write_text(markdown(rows))
    out = [folder / "results.json", folder / "summary.md"]
    if plot:
        out += plots(records, folder)
    return out


# ---- command line ------------------------------------------------------------------------------------------
def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="niah",
                   help=f"niah, ruler (= {', '.join(RULER)}), fidelity, or a comma list of: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (fractions), comma-separated")
    p.add_argument("--samples", type=int, default=2, help="samples per (task, length, depth)")
    p.add_argument("--presses", default="none,snapkv:0.75,streaming_llm:0.75",
                   help="press configs, comma-separated: none | name[:ratio[:k=v;k=v]] (use ; between knobs)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 (niah), 48 (ruler), 64 (fidelity)")
    p.add_argument("--batch", type=int, default=4, help="prompts generated together")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="data folder (default: $DECODEKIT_DATA, else ../shared/data)")
    p.add_argument("--out", default="eval-long", help="folder for results.json, summary.md and the plots")
    p.add_argument("--no-plot", action="store_true")


def parse_tasks(text: str) -> list[str]:
    tasks = []
    for t in text.split(","):
        t = t.strip()
        tasks += list(RULER) if t == "ruler" else [t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown long-context task {unknown[0]!r}; available: ruler, {', '.join(TASKS)}")
    return tasks


def run_cli(args: argparse.Namespace) -> None:
    import decodekit

    tasks = parse_tasks(args.task)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    presses = [PressConfig.parse(p.replace(";", ",")) for p in args.presses.split(",")]
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, progress=False)
    too_long = [n for n in lengths if n + 64 > engine.max_context]
    if too_long:
        raise ValueError(f"lengths {too_long} do not fit the model's context window ({engine.max_context})")
    haystack = Haystack.load(engine.tokenizer, data_dir(args.data_dir))
    default_new = 64 if tasks == ["fidelity"] else 48 if set(tasks) & set(RULER) else 16
    samples = make_samples(engine, haystack, tasks, lengths, depths, args.samples, args.seed)
    t0 = time.time()
    records = run(engine, samples, presses, args.max_new_tokens or default_new, args.batch, args.chat)
    meta = {"command": "decodekit " + " ".join(sys.argv[1:]), "model": args.model, "device": str(engine.device),
            "dtype": str(engine.model.dtype), "machine": f"{platform.machine()} {platform.processor()} "
            f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1),
            "torch_threads": __import__("torch").get_num_threads()}
    paths = report(records, args.out, meta, plot=not args.no_plot)
    print(markdown(summary(records)))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


__all__ = ["Haystack", "PressConfig", "Sample", "make_sample", "make_samples", "markdown", "plots", "report", "run",
           "score", "summary"]
