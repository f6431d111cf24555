"""`decodekit train-drafter`: self-distillation data, then a trained draft head, in one command (resumable)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPTS = "shared/data/sharegpt_prompts/sharegpt_v3_partial_human_turns.jsonl.gz"


def add_train_parser(sub) -> None:
    from .data import GenerationSettings
    from .trainer import TrainConfig

    t = sub.add_parser("train-drafter", help="train a draft head (eagle, medusa, hydra) by self-distillation")
    t.add_argument("--model", default="smollm2", help="the target: built-in name, HF folder, .gguf or random:<shape>")
    t.add_argument("--arch", required=True, choices=["eagle", "medusa", "hydra"])
    t.add_argument("--prompts", required=True, help=f"ShareGPT-style JSONL(.gz) of prompts, e.g. {DEFAULT_PROMPTS}")
    t.add_argument("--out", required=True, help="output folder: data/, checkpoint.pt, curves, head/")
    t.add_argument("--data", default=None, help="cached data folder (default OUT/data; shareable between heads)")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="the target's dtype (default: float32 on the CPU, bfloat16 on the GPU)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    d, c = GenerationSettings(), TrainConfig()
    t.add_argument("--num-prompts", type=int, default=d.num_prompts)
    t.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    t.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    t.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    t.add_argument("--gen-batch-size", type=int, default=d.batch_size)
    t.add_argument("--temperature", type=float, default=d.temperature, help="of the target's answers (0: greedy)")
    t.add_argument("--fused", action="store_true", help="eagle: EAGLE-3 fused low/mid/high features")
    t.add_argument("--num-heads", type=int, default=c.num_draft_heads, help="medusa, hydra: draft heads")
    t.add_argument("--no-prefix-layer", action="store_true", help="hydra: no Hydra++ attention layer")
    t.add_argument("--mix-heads", action="store_true", help="medusa: Amphista's attention across the heads")
    for name in ("draft_steps", "epochs", "batch_tokens", "max_rows", "eval_depth", "checkpoint_every", "seed"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(c, name))
    for name in ("lr", "weight_decay", "warmup", "grad_clip", "feature_weight", "step_decay"):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(c, name))
    t.add_argument("--no-generate", action="store_true", help="train on the data already in --data as it is")
    t.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps this run")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    import decodekit

    from .data import GenerationSettings, generate_dataset
    from .trainer import TrainConfig, head_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(arch=args.arch, fused=args.fused, num_draft_heads=args.num_heads,
                      prefix_layer=not args.no_prefix_layer, mix_heads=args.mix_heads,
                      **{k: getattr(args, k) for k in ("draft_steps", "epochs", "batch_tokens", "max_rows",
                                                      "eval_depth", "checkpoint_every", "seed", "lr", "weight_decay",
                                                      "warmup", "grad_clip", "feature_weight", "step_decay")})
    cfg.validate()
    settings = GenerationSettings(num_prompts=args.num_prompts, eval_prompts=args.eval_prompts,
                                  max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.gen_batch_size, temperature=args.temperature, seed=args.seed)
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype)  # graphs on a GPU: batched answers
    config = head_config(cfg, engine.model.config, engine.name)
    layers = tuple(dict.fromkeys((*config.feature_layers, config.num_target_layers)))
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.no_generate:
        generate_dataset(engine, args.prompts, data, layers, settings)
    elif not (data / "meta.json").is_file():
        raise ValueError(f"--no-generate: no cached data in {data}")
    summary = train(engine, data, out, cfg, stop_after=args.stop_after)
    print(json.dumps({k: summary[k] for k in ("arch", "parameters", "steps", "train_tokens", "final_eval")}),
          file=sys.stderr if summary.get("stopped") else sys.stdout)
