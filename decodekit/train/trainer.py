"""Training a draft head on cached self-distillation data: AdamW, warm-up + cosine schedule, resumable checkpoints.

Loss (per draft step k, weighted `step_decay**k`): cross-entropy of the head's tokens through the target's frozen
LM head against the target's own next tokens (the cached answers), on answer rows only; EAGLE-1/2 heads add
smooth-L1 regression of the target's next feature (`feature_weight`, EAGLE's 1 : 0.1 by default). Steps k >= 1
unroll the head on its own outputs (EAGLE-3's training-time test; Hydra's heads read the true path).
Scoring: teacher-forced acceptance by depth on the held-out prompts: at every answer position the head drafts a
greedy chain from the true prefix, and depth d counts as accepted when its first d tokens equal the target's.
bf16 autocast on a GPU, float32 on the CPU.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..speculative.eagle import EagleHead, greedy_tokens
from ..speculative.heads_common import HeadBatch, HeadConfig, Target, new_head, param_count, save_head
from ..speculative.hydra import HydraHeads
from ..speculative.medusa import MedusaHeads
from .data import Sequence, batches, read_split

HEADS = {"eagle": EagleHead, "medusa": MedusaHeads, "hydra": HydraHeads}
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    arch: str = "eagle"
    fused: bool = False  # eagle: EAGLE-3's fused low/mid/high features instead of the final state
    num_draft_heads: int = 4  # medusa, hydra
    prefix_layer: bool = True  # hydra++
    mix_heads: bool = False  # medusa: Amphista's attention across heads
    draft_steps: int = 3  # steps unrolled per row in training (medusa, hydra: heads trained)
    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    batch_tokens: int = 2048  # padded tokens per optimizer step
    max_len: int = 1024  # longer sequences are cut
    max_rows: int = 512  # answer rows scored per draft step (a random subset beyond): LM-head cost bound
    grad_clip: float = 0.5
    feature_weight: float = 10.0  # EAGLE-1/2 smooth-L1 weight relative to the token loss
    step_decay: float = 0.8
    eval_depth: int = 6
    checkpoint_every: int = 50  # optimizer steps
    seed: int = 0

    def validate(self) -> "TrainConfig":
        if self.arch not in HEADS:
            raise ValueError(f"unknown head architecture {self.arch!r}; use one of {', '.join(HEADS)}")
        if self.epochs < 1 or self.draft_steps < 1 or self.batch_tokens < 16 or self.lr <= 0:
            raise ValueError("epochs, draft_steps must be >= 1, batch_tokens >= 16 and lr > 0")
        return self


def head_config(cfg: TrainConfig, model_config, target_name: str) -> HeadConfig:
    extra = {"target": target_name}
    if cfg.arch in ("medusa", "hydra"):
        extra["num_draft_heads"] = cfg.num_draft_heads
    if cfg.arch == "hydra":
        extra["prefix_layer"] = cfg.prefix_layer
    if cfg.arch == "medusa":
        extra["mix_heads"] = cfg.mix_heads
    return HeadConfig.for_target(cfg.arch, model_config, fused=cfg.fused and cfg.arch == "eagle", **extra)


def collate(seqs: list[Sequence], layers: list[int], config: HeadConfig, max_len: int, device: torch.device
            ) -> HeadBatch:
    """Right-padded float32 batch; the head's feature columns picked from the cached layers."""
    h = config.hidden_size
    missing = [i for i in (*config.feature_layers, config.num_target_layers) if i not in layers]
    if missing:
        raise ValueError(f"the cached data holds layers {layers}; this head needs {missing} too (regenerate it)")
    cols = [layers.index(i) for i in config.feature_layers]
    final = layers.index(config.num_target_layers)
    t = min(max(len(s.tokens) for s in seqs), max_len)
    tokens = torch.zeros(len(seqs), t, dtype=torch.long)
    feats = torch.zeros(len(seqs), t, len(cols) * h)
    finals = torch.zeros(len(seqs), t, h)
    lengths, prompts = [], []
    for i, s in enumerate(seqs):
        n = min(len(s.tokens), t)
        f = s.features[:n].float().view(n, len(layers), h)
        tokens[i, :n] = s.tokens[:n]
        feats[i, :n] = f[:, cols].reshape(n, -1)
        finals[i, :n] = f[:, final]
        lengths.append(n)
        prompts.append(s.prompt_len)
    return HeadBatch(tokens.to(device), feats.to(device), finals.to(device), torch.tensor(lengths, device=device),
                     torch.tensor(prompts, device=device))


def head_loss(head, target: Target, batch: HeadBatch, outs: list[torch.Tensor], cfg: TrainConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    total = outs[0].new_zeros((), dtype=torch.float32)
    weights, metrics = [], {}
    for k, h in enumerate(outs):
        want, w = batch.targets(k)
        weights.append(w)
        rows = w.bool().nonzero(as_tuple=True)
        if rows[0].numel() == 0:
            continue
        if rows[0].numel() > cfg.max_rows:  # score a random subset: the LM head dominates the cost
            pick = torch.randperm(rows[0].numel(), generator=generator)[:cfg.max_rows].to(rows[0].device)
            rows = (rows[0][pick], rows[1][pick])
        logits = head.logits(target, h[rows]).float()
        ce = F.cross_entropy(logits, want[rows])
        total = total + cfg.step_decay ** k * ce
        metrics[f"ce{k + 1}"] = float(ce.detach())
        metrics[f"acc{k + 1}"] = float((logits.argmax(-1) == want[rows]).float().mean())
    feature = head.feature_loss(outs, batch, weights).float()
    metrics["feature"] = float(feature.detach())
    loss = total + cfg.feature_weight * feature
    metrics["loss"] = float(loss.detach())
    return loss, metrics


class ChainScorer:
    """Greedy-chain acceptance of one batch, scored step by step as `unroll` runs: only rows whose chain is still
    alive need the head's guess (an LM-head pass); the others are fed the true token and no longer counted."""

    def __init__(self, head, target: Target, batch: HeadBatch) -> None:
        self.head, self.target, self.batch = head, target, batch
        self.alive = batch.targets(0)[1].bool()  # rows with a depth-1 target: the positions scored
        self.positions = int(self.alive.sum())
        self.hits: list[int] = []

    def __call__(self, k: int, h: torch.Tensor) -> torch.Tensor:
        want, w = self.batch.targets(k)
        guess = want.clone()
        if self.alive.any():
            guess[self.alive] = greedy_tokens(self.head, self.target, h[self.alive])
        self.alive &= (guess == want) & w.bool()  # a chain running past the answer's end fails
        self.hits.append(int(self.alive.sum()))
        return guess


@torch.no_grad()
def acceptance(head, target: Target, seqs: list[Sequence], layers: list[int], depth: int, device: torch.device,
               batch_tokens: int = 4096, max_len: int = 1024) -> dict[str, list[float] | float]:
    """Teacher-forced greedy-chain acceptance on `seqs`: `cumulative[d-1]` = P(first d drafts all equal the
    target's tokens), `conditional[d-1]` = P(draft d right | drafts < d right), `tau` = 1 + sum(cumulative): the
    tokens per verify step of a depth-`depth` chain."""
    was = head.training
    head.eval()
    hits = [0] * depth
    positions = 0
    for group in batches(seqs, batch_tokens, max_len, shuffle=False):
        batch = collate(group, layers, head.config, max_len, device)
        scorer = ChainScorer(head, target, batch)
        with autocast(device):
            outs = head.unroll(target, batch, depth, scorer)
            for k in range(len(scorer.hits), len(outs)):
                scorer(k, outs[k])
        positions += scorer.positions
        for k, n in enumerate(scorer.hits):
            hits[k] += n
    head.train(was)
    n = len(scorer.hits) if seqs else 0
    cumulative = [h / max(positions, 1) for h in hits[:n]]
    conditional = [c / p if p else 0.0 for c, p in zip(cumulative, [1.0, *cumulative[:-1]])]
    return {"cumulative": cumulative, "conditional": conditional, "tau": 1.0 + sum(cumulative),
            "positions": positions}


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def schedule(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))


def train(engine, data: str | Path, out: str | Path, cfg: TrainConfig, device: str | torch.device | None = None,
          progress: bool = True, stop_after: int | None = None) -> dict:
    """Train a head on the data in `data` (from `generate_dataset`), writing checkpoints, curves and the final head
    (`out/head/`) into `out`; resumes from `out/checkpoint.pt` when present. `stop_after`: leave (checkpointed)
    after that many optimizer steps in this run (time-boxed jobs). Returns the training summary."""
    from tqdm import tqdm

    from ..speculative.draft_model import native_model
    from .plots import plot_history

    cfg.validate()
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data / "meta.json").read_text())
    net = native_model(engine.model)
    dev = torch.device(device) if device is not None else net.device
    if meta["model"] != engine.name or meta["hidden_size"] != net.config.hidden_size:
        raise ValueError(f"{data} was made with {meta['model']}, not {engine.name}")
    net.requires_grad_(False)
    target = Target(net)
    config = head_config(cfg, net.config, engine.name)
    torch.manual_seed(cfg.seed)
    head = new_head(HEADS[cfg.arch], config, cfg.seed).to(dev).train()
    train_seqs, eval_seqs = read_split(data / "train"), read_split(data / "eval")
    if not train_seqs:
        raise ValueError(f"no training data in {data / 'train'}")
    layers = meta["layers"]
    per_epoch = sum(1 for _ in batches(train_seqs, cfg.batch_tokens, cfg.max_len, shuffle=False))
    total = per_epoch * cfg.epochs
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, cfg.warmup))
    history: dict = {"config": asdict(cfg), "train": [], "eval": []}
    step = 0
    g = torch.Generator().manual_seed(cfg.seed)  # which answer rows are scored (max_rows)
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with other settings; remove it or use another --out")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, step = state["history"], state["step"]
        g.set_state(state["rows_rng"].cpu())  # map_location moved it to the device; RNG states live on the host
        print(f"decodekit: resuming from {ckpt} at step {step}/{total}", file=sys.stderr)

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "head": head.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "history": history, "step": step, "rows_rng": g.get_state()},
                   tmp)
        tmp.rename(ckpt)

    if not history["eval"]:  # the untrained head's acceptance: the baseline the curves start from
        history["eval"].append({"epoch": 0, "step": 0, **acceptance(head, target, eval_seqs, layers,
                                                                  cfg.eval_depth, dev, cfg.batch_tokens, cfg.max_len)})
    bar = tqdm(total=total, initial=step, desc=f"training {cfg.arch}", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    first_step = step

    def score_epoch() -> None:  # after each epoch (also one whose end a resumed run has not scored yet)
        if step and step % per_epoch == 0 and history["eval"][-1]["step"] != step:
            history["eval"].append({"epoch": step // per_epoch, "step": step, **acceptance(
                head, target, eval_seqs, layers, cfg.eval_depth, dev, cfg.batch_tokens, cfg.max_len)})
            save()
            plot_history(history, out)

    stopped = False
    while step < total and not stopped:
        score_epoch()
        epoch, skip = divmod(step, per_epoch)
        for i, group in enumerate(batches(train_seqs, cfg.batch_tokens, cfg.max_len, True, cfg.seed + epoch)):
            if i < skip:
                continue
            batch = collate(group, layers, config, cfg.max_len, dev)
            with autocast(dev):
                outs = head.unroll(target, batch, cfg.draft_steps)
                loss, metrics = head_loss(head, target, batch, outs, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            history["train"].append({"step": step, "lr": sched.get_last_lr()[0], **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics.get('acc1', 0):.2f}")
            stopped = step - first_step == stop_after
            if step % cfg.checkpoint_every == 0 or stopped:
                save()
            if stopped:
                break
        score_epoch()
    bar.close()
    if step < total:
        return {"arch": cfg.arch, "parameters": param_count(head), "steps": step, "stopped": True,
                "train_tokens": sum(len(s.tokens) for s in train_seqs), "final_eval": history["eval"][-1]}
    final = save_head(head, config, out / "head")
    summary = {"arch": cfg.arch, "head_config": asdict(config), "parameters": param_count(head), "steps": step,
               "train_sequences": len(train_seqs), "train_tokens": sum(len(s.tokens) for s in train_seqs),
               "eval_sequences": len(eval_seqs), "seconds_this_run": time.perf_counter() - t0,
               "final_eval": history["eval"][-1], "first_eval": history["eval"][0], "data": meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_history(history, out)
    print(f"decodekit: head written to {final}", file=sys.stderr)
    return summary
