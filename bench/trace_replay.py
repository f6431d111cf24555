"""Trace replay: the forward passes of recorded generations (`bench/trace_record.py`) run again on another model's
shape, timed. What it gives: the wall-clock speedup a method would reach on a memory-bound model (default the
Llama 3 8B shape with seeded weights) with the acceptance measured on a real small one. A TRACE REPLAY, not a
measurement of the method on that model: see decodekit/bench/replay.py and docs/benchmarks.md.

    python3 bench/trace_replay.py --trace traces.jsonl --model random:llama3-8b --device cuda --dtype bfloat16 \
        --draft-model random:llama3.2-1b --repeats 3 --json replay.json   # head passes: random:llama3-8b:layers=1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.replay import Replayer, format_table, kv_needed, replay_traces  # noqa: E402
from decodekit.bench.trace import read_traces  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, metavar="FILE.jsonl")
    ap.add_argument("--model", default="random:llama3-8b", help="the replay model (a random: shape or any source)")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--draft-model", default="random:llama3.2-1b",
                    help="the shape a recorded draft model's passes run on (only loaded when a trace has them)")
    ap.add_argument("--head-model", default=None,
                    help="the shape head passes run on, through its runner (default: a random replay model cut to "
                         "one layer, e.g. random:llama3-8b:layers=1); `eager`: the replay model, other layers skipped")
    ap.add_argument("--methods", default=None, help="comma-separated: replay only these recorded methods")
    ap.add_argument("--repeats", type=int, default=3, help="timed replays per trace (median); one warm-up first")
    ap.add_argument("--json", dest="json_out", default=None, metavar="OUT.json")
    ap.add_argument("--single-baseline", action="store_true",
                    help="also replay plain decoding as one width-1 pass a token (doubles the baseline's time)")
    args = ap.parse_args(argv)
    try:
        lines = read_traces(args.trace)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        lines = [ln for ln in lines if ln["method"] in keep]
        if not lines:
            sys.exit(f"error: no trace of {args.methods} in {args.trace}")
    if args.repeats < 1:
        sys.exit("error: --repeats must be >= 1")
    # Room for one sequence's cache and the draft passes' own cache of the replay model.
    need = max(kv_needed(ln["trace"]) for ln in lines)
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False,
                            progress=False, kv_tokens=2 * need + 4096)
    has_draft = any(d["model"] == "draft_model" for ln in lines for s in ln["trace"]["steps"]
                    for d in s["draft_passes"])
    draft = decodekit.load(args.draft_model, device=engine.device, dtype=engine.model.dtype, prefix_caching=False,
                           progress=False, kv_tokens=need + 4096, cuda_graphs=False) if has_draft else None
    has_head = any(d["model"] == "head" for ln in lines for s in ln["trace"]["steps"] for d in s["draft_passes"])
    head_model = args.head_model or (f"{args.model}:layers=1" if args.model.startswith("random:") else "eager")
    head = decodekit.load(head_model, device=engine.device, dtype=engine.model.dtype, prefix_caching=False,
                          progress=False, kv_tokens=need + 4096) if has_head and head_model != "eager" else None
    meta = {"label": "trace replay", "replay_model": args.model, "device": str(engine.device),
            "dtype": str(engine.model.dtype).replace("torch.", ""),
            "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
            "recorded_on": ", ".join(sorted({ln["model"] for ln in lines})),
            "draft_model": args.draft_model if has_draft else None, "repeats": args.repeats,
            "head_model": (head_model if head is not None else "eager") if has_head else None,
            "trace_file": args.trace, "torch": torch.__version__,
            "baseline": "plain decoding replayed on the same prompt lengths and token counts (the engine's fused "
                        "greedy chunks where the runner has them); vs 1-pass (--single-baseline): one width-1 pass "
                        "a token"}

    def save(methods: dict) -> None:  # after every trace: a replay cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"meta": meta, "methods": methods}, indent=1))

    methods = replay_traces(Replayer(engine, draft, head=head), lines, args.repeats, single=args.single_baseline,
                            progress=lambda msg: print(msg, file=sys.stderr, flush=True), on_trace=save)
    print(format_table(methods, meta))
    save(methods)
    return {"meta": meta, "methods": methods}


if __name__ == "__main__":
    main()
