"""Decode speed on a long prompt: plain decoding, KV presses, and long-context self-speculation, one process.

    PYTHONPATH=$PWD python3 bench/long_context_bench.py --model gemma3-270m --length 32768 --new-tokens 256 \
        --configs plain,press:streaming_llm:0.75,press:snapkv:0.75,method:magicdec,method:triforce,method:quantspec \
        --out $OUT

The prompt is a needle-in-a-haystack sample (`decodekit.eval.long_context`, depth 0.5) of --length tokens, so each
run also says whether the needle was found. `--batch B` decodes B such prompts together (needles at depths spread
over 0-100%): at batch 1 a small model's step is mostly its weights, in a batch the KV reads grow with B while the
weights are read once, which is where a press can save time. Every configuration generates exactly --new-tokens tokens
(`ignore_eos`) after one warm-up run of the same prompts (graph capture, compilation); the B prompts are prefilled
first and then decode together (`decodekit.bench.together`: a sequence whose prompt is in waits for the others), and
the median of --repeats timed runs is reported: `decode` = tokens after each sequence's first / the time from the
batch's first tokens to its end (summed over the batch), `ttft` = the time until every prompt's first token, `tau`
(tokens per target step), KV bytes held at the end and uncompressed, and the speedup of decode tok/s over `plain`.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.together import decode_together  # noqa: E402
from decodekit.eval.long_context import Haystack, data_dir, make_sample, vocabulary  # noqa: E402
from decodekit.sampling import SamplingConfig  # noqa: E402


def config_kwargs(text: str) -> dict:
    """`plain`, `press:NAME:RATIO[:k=v;k=v]` or `method:NAME[:k=v;k=v]` (full drafts unless `adaptive=true` is among
    a method's options: then the cost-aware draft budget decides, as in `generate`)."""
    parts = text.split(":")
    if parts[0] == "plain":
        return {}
    options = {}
    for pair in (parts[-1].split(";") if len(parts) > (3 if parts[0] == "press" else 2) else []):
        k, _, v = pair.partition("=")
        options[k] = json.loads(v)
    if parts[0] == "press":
        return {"press": parts[1], "compression_ratio": float(parts[2]), "press_options": options}
    if parts[0] == "method":
        return {"method": parts[1], "adaptive": bool(options.pop("adaptive", False)), "method_options": options}
    raise ValueError(f"config {text!r}: plain, press:NAME:RATIO[:k=v;...] or method:NAME[:k=v;...]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--configs", default="plain,press:streaming_llm:0.75,press:snapkv:0.75,method:magicdec,"
                   "method:triforce,method:quantspec")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (needles at spread depths)")
    p.add_argument("--device", default=None)
    p.add_argument("--kv-tokens", type=int, default=None, help="KV pool size (default: the engine's, at most 1M)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="folder for long_context_bench.json")
    args = p.parse_args()

    # No prefix caching: every run prefills its prompt (a press that reads the prompt's passes must anyway).
    pool = {"kv_tokens": args.kv_tokens} if args.kv_tokens else {}
    engine = decodekit.load(args.model, device=args.device, progress=False, prefix_caching=False, **pool)
    haystack = Haystack.load(engine.tokenizer, data_dir(args.data_dir))
    length = min(args.length, engine.max_context - args.new_tokens - 8)
    depths = [0.5] if args.batch == 1 else [i / (args.batch - 1) for i in range(args.batch)]
    samples = [make_sample("niah", haystack, engine.tokenizer, length, d, random.Random(i), vocabulary(haystack))
               for i, d in enumerate(depths)]
    prompts = [s.prompt for s in samples]
    greedy = SamplingConfig(temperature=0.0)
    rows, plain_ids = [], None
    for config in args.configs.split(","):
        kw = config_kwargs(config)
        decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)  # warm-up
        runs = [decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)
                for _ in range(args.repeats)]
        last = runs[-1].results
        row = {"config": config, "batch": args.batch, "prompt_tokens": len(last[0].prompt_ids),
               "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
               "ttft_s": statistics.median(r.prefill_s for r in runs), "tau": last[0].stats.tau,
               "tau_mean": statistics.mean(x.stats.tau for x in last),
               "wall_s": statistics.median(r.prefill_s + r.decode_s for r in runs),
               **{k: sum(getattr(x.stats, k) for x in last)
                  for k in ("kv_bytes_final", "kv_bytes_peak", "kv_bytes_uncompressed")},
               "needle_found": sum(s.answers[0] in x.text[:64] for s, x in zip(samples, last)),
               "answer": last[0].text[:40]}
        if config == "plain":
            plain_ids = [x.token_ids for x in last]
        if plain_ids is not None:  # lossless methods: bf16 passes of other widths may round a near tie otherwise
            row["identical_to_plain"] = sum(x.token_ids == p for x, p in zip(last, plain_ids))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["decode_tok_s"] for r in rows if r["config"] == "plain"), None)
    print(f"\n{'config':34s} {'decode tok/s':>12s} {'speedup':>8s} {'tau':>5s} {'ttft s':>7s} {'KV held':>8s} needle")
    for r in rows:
        speed = r["decode_tok_s"] / base if base else float("nan")
        held = r["kv_bytes_final"] / r["kv_bytes_uncompressed"]
        print(f"{r['config']:34s} {r['decode_tok_s']:12.1f} {speed:8.2f} {r['tau']:5.2f} {r['ttft_s']:7.2f} "
              f"{held:8.3f} {r['needle_found']}/{r['batch']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "device": str(engine.device), "length": args.length,
                "batch": args.batch, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        (out / "long_context_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
