"""`decodekit eval`: decoding methods (or search strategies, or a sweep of knobs) compared on one task in one run."""
from __future__ import annotations

import argparse
import datetime
import platform
from dataclasses import fields

from ..cli import add_model_args, add_sampling_args, parse_options, sampling_flags
from .base import TASKS, make_task
from .sandbox import SandboxLimits

CONFIDENCE = 0.95


def add_eval_parser(sub) -> None:
    """Register the `eval` subcommand on the main parser's subparsers."""
    e = sub.add_parser("eval", help="quality of decoding methods on a task: metric with a bootstrap CI, tokens/s",
                       description=__doc__ + " Sampling flags not given take decodekit's defaults (greedy), not the "
                       "model's generation_config.json: one protocol for every model.")
    add_model_args(e)
    e.add_argument("--task", required=True, choices=sorted(TASKS))
    e.add_argument("--limit", type=int, default=None, help="evaluate the first K items")
    e.add_argument("--methods", default="plain", help="comma-separated decoding methods (see `decodekit methods`)")
    e.add_argument("--search", default=None,
                   help="search strategy (comma-separated for several), passed to generate as search=NAME; "
                        "`none` is a run without one (the baseline beside the strategies)")
    e.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of every generate call (method or search knob), repeatable")
    add_sampling_args(e)
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (gsm8k 256, code 384, ...)")
    e.add_argument("--sweep", nargs="+", default=None, metavar="KNOB=V1,V2",
                   help="run the grid of these knob values for each method, e.g. temperature=0.2,0.7 top_p=0.9,1.0")
    e.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default 1)")
    e.add_argument("--kv-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: half the free GPU memory, or two context windows on the "
                        "CPU); search strategies that keep many hypotheses (best-first beam) may need more")
    e.add_argument("--prompt-style", choices=["auto", "chat", "base"], default="auto",
                   help="chat template or plain completion prompt (auto: chat if the model has a chat template)")
    e.add_argument("--data-dir", default=None, help="data folder (default: $DECODEKIT_DATA, else ../shared/data)")
    e.add_argument("--sandbox-timeout", type=float, default=SandboxLimits.timeout_s,
                   help="wall-clock seconds per program for code tasks")
    e.add_argument("--json", dest="json_out", default=None, metavar="OUT.json")
    e.add_argument("--plot", default=None, metavar="OUT.png")
    e.set_defaults(func=cmd_eval)


def _names(text: str | None, flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if text is not None and not names:
        raise ValueError(f"{flag} needs at least one name")
    return names


def search_names(text: str | None) -> list[str | None]:
    """`--search`: strategy names, `none` for a run without one; no flag: one run without a strategy."""
    return [None if n == "none" else n for n in _names(text, "--search")] or [None]


def cmd_eval(args: argparse.Namespace) -> None:
    import decodekit
    import torch

    from .data import data_dir
    from .report import print_table, write_json, write_plot, write_sweep_plot
    from .runner import evaluate, expand_runs, parse_sweep, summarize

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.kv_tokens is not None and args.kv_tokens < 1:
        raise ValueError(f"--kv-tokens must be >= 1, got {args.kv_tokens}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    task_cls = TASKS[args.task]
    knobs = {"limits": SandboxLimits(timeout_s=args.sandbox_timeout).validate()} \
        if "limits" in {f.name for f in fields(task_cls)} else {}
    task = make_task(args.task, **knobs)
    sweep = parse_sweep(args.sweep or [])
    runs = expand_runs(_names(args.methods, "--methods"), search_names(args.search), sweep)
    # Sampling flags not given keep decodekit's defaults (greedy), not the model's generation_config.json: one
    # protocol for every model, as in `decodekit bench`.
    options = {**sampling_flags(args), **parse_options(args.option)}
    items = task.load(data_dir(args.data_dir))[:args.limit]

    # No prefix cache: a run after another would find the prompts' KV cached and look faster than it is.
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False,
                            tensor_parallel=args.tensor_parallel, window_ring=not args.no_window_ring,
                            kv_tokens=args.kv_tokens)
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    if args.prompt_style == "chat" and not has_template:
        raise ValueError(f"{args.model} has no chat template; use --prompt-style base")
    chat = has_template if args.prompt_style == "auto" else args.prompt_style == "chat"
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "task": task.name, "model": args.model, "device": str(engine.device),
        "dtype": str(engine.model.dtype).replace("torch.", ""), "items": len(items),
        "max_new_tokens": max_new_tokens, "prompt_style": "chat" if chat else "base", "metrics": list(task.metrics),
        "confidence": CONFIDENCE, "options": options, "sweep": sweep, "batch_size": args.batch_size,
        "date": started,
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "torch": torch.__version__, "decodekit": decodekit.__version__,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
    }

    def save(done: list) -> None:  # after every run: an evaluation cut short keeps the runs it finished
        if args.json_out:
            write_json(args.json_out, {**meta, "runs_done": f"{len(done)}/{len(runs)}"},
                       [summarize(task, items, r, CONFIDENCE) for r in done], done)

    results = evaluate(engine, task, items, runs, max_new_tokens, chat, options, args.batch_size, on_run=save)
    summaries = [summarize(task, items, r, CONFIDENCE) for r in results]
    print_table(summaries, meta)
    if args.plot and sweep:
        write_sweep_plot(args.plot, summaries, sweep, meta)
    elif args.plot:
        write_plot(args.plot, summaries, meta)
    failed = [r.run.label for r in results if r.error is not None]
    if failed:  # the others' results are printed and saved; the exit status still says not everything ran
        raise ValueError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); the others' results are "
                         f"above" + (f" and in {args.json_out}" if args.json_out else ""))
