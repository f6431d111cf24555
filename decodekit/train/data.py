"""Self-distillation data for draft heads: the target answers prompts, and its tokens and features are cached.

The target answers each prompt in batches (plain decoding, left-padded), then one teacher-forced forward pass over
prompt + answer records the features the heads read (`Transformer.forward(..., hidden_layers=...)`). Shards are
safetensors files (`tokens` int32 `[N]`, `features` bf16 `[N, F]`, `offsets` `[S+1]`, `prompt_lens` `[S]`), written
one per batch, so an interrupted run resumes at the next missing shard. `meta.json` records the model, the layers
(their order is the column order of `features`), the split and the generation settings.

Prompts that measure the heads (Spec-Bench, GSM8K test, HumanEval, MBPP) are never trained on: such files are
refused, and prompts whose text equals one of theirs are dropped.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

# Files that measure draft heads (or the models): never training data.
MEASURED = re.compile(r"spec_bench|question\.jsonl|gsm8k.*test|humaneval|mbpp", re.IGNORECASE)


@dataclass
class GenerationSettings:
    num_prompts: int = 1000  # training prompts (after the held-out ones)
    eval_prompts: int = 48  # held-out prompts: acceptance is measured on these, never trained on
    max_prompt_tokens: int = 384  # longer prompts are skipped (their answers cost the most to generate)
    max_new_tokens: int = 256
    batch_size: int = 16
    temperature: float = 0.0  # 0: greedy answers (what greedy drafting is scored against)
    seed: int = 0


def read_prompts(path: str | Path) -> list[str]:
    """First user turns of a ShareGPT-style JSONL (`turns`, `prompt` or `conversations`), gzip or plain."""
    path = Path(path)
    if MEASURED.search(str(path)):
        raise ValueError(f"{path} is a benchmark file: draft heads are never trained on what measures them")
    if not path.is_file():
        raise ValueError(f"prompt file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    prompts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("turns"):
                text = row["turns"][0]
            elif row.get("prompt"):
                text = row["prompt"]
            elif row.get("conversations"):
                text = row["conversations"][0].get("value", "")
            else:
                continue
            if isinstance(text, str) and text.strip():
                prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"no prompts in {path} (expected JSONL rows with `turns`, `prompt` or `conversations`)")
    return prompts


def measured_texts() -> set[str]:
    """Normalized prompt texts of the benchmarks found on this machine (Spec-Bench and the shared data sets)."""
    from ..bench.datasets import spec_bench_path

    texts: set[str] = set()
    roots = {spec_bench_path().parent.parent}
    for root in roots:
        for f in list(root.glob("spec_bench/*.jsonl")) + list(root.glob("humaneval/*")) + \
                list(root.glob("mbpp/*")) + list(root.glob("gsm8k/*test*")):
            opener = gzip.open if f.suffix == ".gz" else open
            try:
                with opener(f, "rt", encoding="utf-8") as fh:
                    for line in fh:
                        row = json.loads(line) if line.strip().startswith("{") else {}
                        for key in ("turns", "prompt", "question", "text"):
                            value = row.get(key)
                            for v in (value if isinstance(value, list) else [value]):
                                if isinstance(v, str):
                                    texts.add(" ".join(v.split()).lower())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
    return texts


def split_prompts(prompts: list[str], settings: GenerationSettings) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle, benchmark prompts dropped; held-out prompts come first."""
    banned = measured_texts()
    kept = [p for p in prompts if " ".join(p.split()).lower() not in banned]
    order = list(range(len(kept)))
    random.Random(settings.seed).shuffle(order)
    shuffled = [kept[i] for i in order]
    held = shuffled[:settings.eval_prompts]
    return shuffled[settings.eval_prompts:settings.eval_prompts + settings.num_prompts], held


def feature_pass(model, ids: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """Features `[T, F]` of every position of `ids` from one teacher-forced forward pass of the target."""
    from ..models.kv_cache import private_pool

    _, kv = private_pool(model, len(ids) + 1)
    with torch.inference_mode():
        _, hidden = model.forward_seq(kv, list(ids), list(range(len(ids))), hidden_layers=layers)
    return hidden


def generate_split(engine, prompts: list[str], out: Path, layers: tuple[int, ...], settings: GenerationSettings,
                   progress: bool = True) -> None:
    """Answer `prompts` in batches and write one shard per batch into `out` (existing shards are kept)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))  # base models answer the raw prompt
    fits = [p for p in prompts if len(engine.encode(p, chat=chat)) <= settings.max_prompt_tokens]
    batches = [fits[i:i + settings.batch_size] for i in range(0, len(fits), settings.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc=f"answering {out.name}", disable=not progress, file=sys.stderr)):
        shard = out / f"shard_{b:05d}.safetensors"
        if shard.exists():
            continue
        results = engine.generate(batch, settings.max_new_tokens, chat=chat, temperature=settings.temperature,
                                  seed=settings.seed + b)
        write_shard(engine.model, [(r.prompt_ids, r.token_ids) for r in results], layers, shard)


def write_shard(model, pairs: list[tuple[list[int], list[int]]], layers: tuple[int, ...], path: Path) -> None:
    from safetensors.torch import save_file

    tokens, feats, offsets, prompt_lens = [], [], [0], []
    for prompt_ids, answer in pairs:
        ids = list(prompt_ids) + list(answer)
        tokens.append(torch.tensor(ids, dtype=torch.int32))
        feats.append(feature_pass(model, ids, layers).to("cpu", torch.bfloat16))
        offsets.append(offsets[-1] + len(ids))
        prompt_lens.append(len(prompt_ids))
    tmp = path.with_suffix(".tmp")
    save_file({"tokens": torch.cat(tokens), "features": torch.cat(feats), "offsets": torch.tensor(offsets),
               "prompt_lens": torch.tensor(prompt_lens)}, str(tmp))
    tmp.rename(path)  # a shard exists only once complete: resuming never reads half a file


def generate_dataset(engine, prompts_path: str | Path, out: str | Path, layers: tuple[int, ...],
                     settings: GenerationSettings, progress: bool = True) -> Path:
    """Write `out/train` and `out/eval` shards and `out/meta.json`; returns `out`. Existing data of the same model
    and settings is extended (more prompts) or reused (cached for a superset of `layers`)."""
    out = Path(out)
    meta_path = out / "meta.json"
    meta = {"model": engine.name, "layers": list(layers), "hidden_size": engine.model.config.hidden_size,
            "prompts": str(prompts_path), "settings": asdict(settings)}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if set(layers) <= set(old["layers"]):  # data cached for more layers serves this head too
            layers = tuple(old["layers"])
            meta["layers"] = list(layers)
        same = {k: v for k, v in old["settings"].items() if k != "num_prompts"}  # more prompts extend the data
        if old["layers"] != meta["layers"] or old["model"] != meta["model"] or \
                same != {k: v for k, v in meta["settings"].items() if k != "num_prompts"}:
            raise ValueError(f"{out} holds data made with other settings ({old['model']}, layers {old['layers']}); "
                             "use another --data folder")
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    train, held = split_prompts(read_prompts(prompts_path), settings)
    generate_split(engine, held, out / "eval", layers, settings, progress)
    generate_split(engine, train, out / "train", layers, settings, progress)
    return out


@dataclass
class Sequence:
    tokens: torch.Tensor  # [T] long
    features: torch.Tensor  # [T, F] (bf16 as stored)
    prompt_len: int


def read_split(folder: str | Path) -> list[Sequence]:
    """Every sequence of a split (all shards, in order)."""
    from safetensors.torch import load_file

    seqs = []
    for shard in sorted(Path(folder).glob("shard_*.safetensors")):
        d = load_file(str(shard))
        off = d["offsets"].tolist()
        for i, p in enumerate(d["prompt_lens"].tolist()):
            seqs.append(Sequence(d["tokens"][off[i]:off[i + 1]].long(), d["features"][off[i]:off[i + 1]], p))
    return seqs


def batches(seqs: list[Sequence], max_tokens: int, max_len: int, shuffle: bool, seed: int = 0
            ) -> Iterator[list[Sequence]]:
    """Groups of similar-length sequences (cut to `max_len`) holding at most `max_tokens` padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    groups, cur = [], []
    for i in order:
        longest = min(max(len(seqs[j].tokens) for j in cur + [i]), max_len)
        if cur and longest * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    if shuffle:
        random.Random(seed).shuffle(groups)
    for g in groups:
        yield [seqs[i] for i in g]
