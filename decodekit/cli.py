"""`decodekit` command line: generate, chat, models, methods, presses, bench, eval, eval-long, serve, train-drafter.
Bad input ends in one line on stderr, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Callable

from . import DEFAULT_MODEL
from .constrain import bench_cli as bench_constrained
from .sampling import SamplingConfig
from .serve.cli import add_serve_parser
from .train.cli import add_train_parser


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (smollm2, gemma3-270m), HF folder, .gguf file, hub id, or random:<shape>")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on the GPU")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split the model over N processes (one GPU each from --device on, or N CPU processes; "
                        "under torchrun: its WORLD_SIZE ranks)")
    p.add_argument("--no-window-ring", action="store_true",
                   help="keep every KV entry in sliding-window layers too (default: a ring of window + 2 x 256 "
                        "entries per sequence, e.g. Gemma 3's local layers)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # default=None: a flag the user did not give leaves the model's generation_config.json value in place.
    for f in fields(SamplingConfig):
        kind = int if f.name in ("top_k", "seed") else float
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"(default: the model's generation_config.json, else {f.default})")


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="plain", help="plain or a drafter name (see `decodekit methods`)")
    p.add_argument("--verifier", default=None, help="greedy, specinfer, rsd (default: by sampling mode)")
    p.add_argument("--method-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a drafter knob, e.g. -O num_draft=8 (repeatable)")


def add_press_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--press", default=None, help="a KV-cache press (see `decodekit presses`), or EVICT+QUANT (snapkv+kivi)")
    p.add_argument("--compression-ratio", type=float, default=0.0,
                   help="fraction of the KV cache the press removes (0.75 keeps a quarter)")
    p.add_argument("--press-option", "-P", action="append", default=[], metavar="KEY=VALUE",
                   help="a press knob, e.g. -P window_size=32 (repeatable)")


def press_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The press arguments of a request (nothing without --press)."""
    options = parse_options(args.press_option, "press")
    if args.press is None:
        if options or args.compression_ratio:
            raise ValueError("--compression-ratio and -P need --press")
        return {}
    return {"press": args.press, "compression_ratio": args.compression_ratio, "press_options": options}


def add_constraint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-schema", default=None, metavar="FILE|JSON", help="output must be JSON valid for this schema")
    p.add_argument("--regex", default=None, help="output must match this regular expression")
    p.add_argument("--grammar", default=None, metavar="FILE", help="output must match this Lark grammar")
    p.add_argument("--choice", action="append", default=None, help="output must be one of these strings (repeatable)")
    p.add_argument("--constraint-backend", default=None, choices=["llguidance", "xgrammar"],
                   help="grammar engine for the token masks (default: llguidance)")
    p.add_argument("--constraint-sampler", default=None, choices=["mask", "awrs"],
                   help="sampled steps: mask the vocabulary (default) or check sampled tokens only (AWRS)")


def constraint_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The constraint flags as generate's keyword arguments, checked now (before the model loads): files read,
    JSON parsed, at most one constraint."""
    from .constrain import constraint_spec

    kw: dict[str, Any] = {}
    if args.json_schema is not None:
        kw["json_schema"] = read_text(args.json_schema, "--json-schema") if not args.json_schema.lstrip().startswith(
            "{") else args.json_schema
    if args.regex is not None:
        kw["regex"] = args.regex
    if args.grammar is not None:
        kw["grammar"] = read_text(args.grammar, "--grammar")
    if args.choice is not None:
        kw["choice"] = args.choice
    constraint_spec(**kw)  # one-line errors for malformed input, before loading anything
    if args.constraint_backend is not None:
        kw["constraint_backend"] = args.constraint_backend
    if args.constraint_sampler is not None:
        kw["constraint_sampler"] = args.constraint_sampler
    return kw


def read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path!r}: {e.strerror or e}") from None


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", default=None, help="a search strategy (see `decodekit searches`): beam, best_of_n, ...")
    p.add_argument("--search-option", "-S", action="append", default=[], metavar="KEY=VALUE",
                   help="a search knob, e.g. -S num_beams=4 (repeatable; values are JSON, else strings)")
    p.add_argument("--all", action="store_true", help="with --search --json: every candidate, best first")


def parse_options(pairs: list[str], kind: str = "method") -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"{kind} option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (checked now, before the model loads); the others are left to the model."""
    given = {f.name: getattr(args, f.name) for f in fields(SamplingConfig) if getattr(args, f.name) is not None}
    SamplingConfig(**given).validate()
    return given


def sampling_from(args: argparse.Namespace) -> SamplingConfig:
    """A full SamplingConfig from the flags, decodekit's defaults elsewhere (benchmarks: the same rules per model)."""
    return SamplingConfig(**sampling_flags(args))


def load_engine(args: argparse.Namespace):
    import decodekit

    return decodekit.load(args.model, device=args.device, dtype=args.dtype, progress=not getattr(args, "json", False),
                          tensor_parallel=args.tensor_parallel, window_ring=not getattr(args, "no_window_ring", False))


def result_json(result) -> dict[str, Any]:
    return {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": len(result.prompt_ids), "stats": result.stats.to_dict()}


def cmd_search(args: argparse.Namespace, engine, kwargs: dict[str, Any]) -> None:
    """generate with a search strategy: the chosen sequence (no streaming: it is known at the end)."""
    found = engine.generate(args.prompt, args.max_new_tokens, search=args.search,
                            search_options=parse_options(args.search_option, "search"), return_all=True, **kwargs)
    result = found.chosen
    if args.json:
        out = result_json(result)
        if args.all:
            out["candidates"] = [result_json(c) for c in found.candidates]
        print(json.dumps(out))
        return
    print(result.text)
    s = result.stats
    score = "n/a" if s.score is None else f"{s.score:.4f}"
    print(f"[search {args.search}: score {score}, {len(found.candidates)} candidates, {s.generated_tokens} tokens, "
          f"{s.total_time_s:.2f} s]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    flags = sampling_flags(args)
    options = parse_options(args.method_option)
    constraint = constraint_flags(args)
    if args.search is None and (args.search_option or args.all):
        raise ValueError("-S/--search-option and --all need --search NAME")
    if args.search is not None:
        from .search import SEARCHES, make_search

        if args.search not in SEARCHES:
            raise ValueError(f"unknown search {args.search!r}; available: {', '.join(sorted(SEARCHES))}")
        make_search(args.search, parse_options(args.search_option, "search"))  # bad knobs fail before loading
    engine = load_engine(args)
    # -O knobs go to the method only: a draft model's `temperature` never changes the target's sampling.
    kwargs = dict(method=args.method, stop=args.stop, chat=not args.raw, verifier=args.verifier,
                  method_options=options, **press_kwargs(args), **flags, **constraint)
    if args.search is not None:
        cmd_search(args, engine, kwargs)
        return
    if args.json:
        result = engine.generate(args.prompt, args.max_new_tokens, **kwargs)
        print(json.dumps(result_json(result)))
        return
    stream = engine.stream(args.prompt, args.max_new_tokens, **kwargs)
    try:
        while True:
            print(next(stream), end="", flush=True)
    except StopIteration as stop:
        result = stop.value
    s = result.stats
    kv = f", KV {s.kv_bytes_final / 2**20:.2f} MiB held of {s.kv_bytes_uncompressed / 2**20:.2f} (peak " \
         f"{s.kv_bytes_peak / 2**20:.2f}), press {s.press}" if s.press else ""
    print(f"\n[{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, ttft {s.time_to_first_token_s * 1e3:.0f} ms,"
          f" tau {s.tau:.2f}, {s.forward_passes} forward passes, method {s.method}{kv}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    engine = load_engine(args)
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ValueError(f"{args.model} has no chat template; use `decodekit generate`")
    flags = sampling_flags(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"decodekit chat with {args.model} (empty line or Ctrl-D to quit, /reset to clear)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        stream = engine.stream(messages, args.max_new_tokens, method=args.method,
                               method_options=parse_options(args.method_option), **press_kwargs(args), **flags)
        reply = ""
        try:
            while True:
                piece = next(stream)
                reply += piece
                print(piece, end="", flush=True)
        except StopIteration as stop:
            reply = stop.value.text
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_models(args: argparse.Namespace) -> None:
    from .models import builtin
    from .models.sources import resolve

    if args.action == "list":
        for name, model in builtin.BUILTIN_MODELS.items():
            status = builtin.builtin_status(name)
            mark = "fetched" if status.get("fetched") else "not fetched"
            default = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name:14s} {mark:12s} {model.description}{default}")
    elif args.action == "fetch":
        for name in args.names or [DEFAULT_MODEL]:
            print(f"{name}: {resolve(name, progress=True)}")
    elif args.action == "info":
        import decodekit

        engine = decodekit.load(args.names[0] if args.names else DEFAULT_MODEL, device="cpu")
        c = engine.model.config
        print(json.dumps({"source": engine.name, "runtime": type(engine.model).__name__,
                          "parameters": sum(p.numel() for p in engine.model.parameters()),
                          "config": {f.name: getattr(c, f.name) for f in fields(c)} if hasattr(c, "__dataclass_fields__")
                          else str(c), "chat_template": bool(getattr(engine.tokenizer, "chat_template", None))},
                         indent=1, default=str))


def cmd_methods(args: argparse.Namespace) -> None:
    from .speculative import DRAFTERS

    for name, cls in sorted(DRAFTERS.items()):
        doc = "plain autoregressive decoding: the empty draft" if name == "plain" else \
            (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")


def cmd_presses(args: argparse.Namespace) -> None:
    from .kv import PRESSES

    for name, cls in sorted(PRESSES.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")
    print("\nAn eviction press and a quantization press compose as EVICT+QUANT, e.g. --press snapkv+kivi "
          "--compression-ratio 0.75 (eviction keeps a quarter of the prompt, KIVI packs what it kept).")


def cmd_eval_long(args: argparse.Namespace) -> None:
    from .eval.long_context import run_cli

    run_cli(args)
def cmd_searches(args: argparse.Namespace) -> None:
    from .search import SEARCHES

    for name, cls in sorted(SEARCHES.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:16s} {doc}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench.runner import run_bench_cli

    run_bench_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one prompt")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    add_sampling_args(g)
    add_method_args(g)
    add_press_args(g)
    add_constraint_args(g)
    add_search_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with streaming output")
    add_model_args(c)
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--system", default=None)
    add_sampling_args(c)
    add_method_args(c)
    add_press_args(c)
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("models", help="list, fetch or describe models")
    m.add_argument("action", choices=["list", "fetch", "info"])
    m.add_argument("names", nargs="*")
    m.set_defaults(func=cmd_models)

    sub.add_parser("methods", help="list decoding methods").set_defaults(func=cmd_methods)
    sub.add_parser("presses", help="list KV-cache presses").set_defaults(func=cmd_presses)
    sub.add_parser("searches", help="list search strategies").set_defaults(func=cmd_searches)

    b = sub.add_parser("bench", help="compare decoding methods side by side (Spec-Bench style)")
    add_model_args(b)
    b.add_argument("--methods", default="plain,pld")
    b.add_argument("--dataset", default="spec-bench", help="spec-bench or a .jsonl file (turns or prompt field)")
    b.add_argument("--limit", type=int, default=None, help="prompts per category")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method (median is reported)")
    b.add_argument("--batch-size", type=int, default=1,
                   help="prompts decoded together as one batch (1: each alone, Spec-Bench style)")
    b.add_argument("--json", dest="json_out", default=None, metavar="OUT.json")
    b.add_argument("--markdown", default=None, metavar="OUT.md")
    b.add_argument("--plot", default=None, metavar="OUT.png")
    b.add_argument("--hf-baselines", action="store_true", help="also time transformers' generate in the same run")
    add_sampling_args(b)
    b.set_defaults(func=cmd_bench)
    bench_constrained.add_parser(sub, add_model_args)

    e = sub.add_parser("eval-long", help="long-context evals: needle in a haystack, RULER-style tasks, fidelity")
    add_model_args(e)
    from .eval.long_context import add_eval_args

    add_eval_args(e)
    e.set_defaults(func=cmd_eval_long)
    from .eval.cli import add_eval_parser  # here, not at the top: decodekit.eval.cli imports this module

    add_eval_parser(sub)
    add_serve_parser(sub)
    add_train_parser(sub)
    return parser


def friendly(error: BaseException) -> str | None:
    """A one-line message for errors caused by the user's input or machine; None for bugs."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory on the device: try a shorter prompt, fewer --max-new-tokens, or --device cpu"
    if isinstance(error, (ValueError, FileNotFoundError, NotImplementedError, PermissionError)):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    from .engine.tp_group import TPError
    from .models.sources import ModelSourceError

    if isinstance(error, (ModelSourceError, TPError)):
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the boundary where errors become messages
        message = friendly(error)
        if message is None:
            raise
        print(f"decodekit: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
