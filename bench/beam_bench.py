"""Beam search speed: decodekit's `search="beam"` against transformers' `generate(num_beams=...)` on the same weights
and prompts, in one process (CPU or GPU). Prints a table and writes JSON.

    # CPU (docs/quality.md): float32, one thread each
    OMP_NUM_THREADS=1 .venv/bin/python bench/beam_bench.py --model smollm2 --device cpu --prompts 5 --new-tokens 64
    # GPU
    PYTHONPATH=/root/site:$PWD python3 bench/beam_bench.py --model /root/models/smollm2.gguf --device cuda \
        --spec-bench .device/question.jsonl --prompts 20 --new-tokens 128 --out $OUT

Both run exactly --new-tokens steps with --beams beams (decodekit `ignore_eos`, transformers `min_new_tokens`: every
beam runs to the length limit, so both do the same work whatever the model prefers). Per prompt: one untimed warm-up
generation per side first, then the median of --repeats timed ones (device synchronized). `tok/s` = new tokens of
the returned sequence / wall time (prefill included). With the model's EOS in place (`--check`), the first
--check prompts are also decoded by both with normal stopping and their best sequences compared (float32 only: in
bfloat16 rounding may legitimately reorder close beams).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on the GPU")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--spec-bench", default=None, help="Spec-Bench question.jsonl (default: the packaged sample)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", type=int, default=3, help="prompts whose outputs are compared (float32 only)")
    ap.add_argument("--out", default=None, help="folder for beam_bench.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from decodekit.bench.datasets import load_prompts

    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, progress=False)
    device, dtype = engine.device, engine.model.dtype
    hf = AutoModelForCausalLM.from_pretrained(str(engine.source_folder), dtype=dtype).to(device).eval()
    eos = sorted(engine.eos_ids)
    prompts = [engine.encode(p.prompt, chat=True) for p in load_prompts(args.spec_bench or "spec-bench", None)]
    prompts = prompts[:args.prompts]
    k, new = args.beams, args.new_tokens

    def ours(ids):
        return engine.generate(ids, new, search="beam", num_beams=k, ignore_eos=True)

    def theirs(ids):
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            return hf.generate(x, attention_mask=torch.ones_like(x), num_beams=k, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, eos_token_id=eos, pad_token_id=eos[0])

    rows = []
    for i, ids in enumerate(prompts):
        ours(ids), theirs(ids)  # warm-up (CUDA graphs, kernels)
        t_ours = statistics.median(timed(lambda: ours(ids), device) for _ in range(args.repeats))
        t_hf = statistics.median(timed(lambda: theirs(ids), device) for _ in range(args.repeats))
        row = {"prompt": i, "prompt_tokens": len(ids), "decodekit_s": t_ours, "transformers_s": t_hf,
               "decodekit_tok_s": new / t_ours, "transformers_tok_s": new / t_hf, "speedup": t_hf / t_ours}
        if i < args.check and dtype == torch.float32:
            mine = engine.generate(ids, new, search="beam", num_beams=k)
            x = torch.tensor([ids], device=device)
            with torch.inference_mode():
                out = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=k, do_sample=False,
                                  max_new_tokens=new, eos_token_id=eos, pad_token_id=eos[0])
            seq = out[0, len(ids):].tolist()
            end = next((j for j, t in enumerate(seq) if t in eos), None)
            row["same_output"] = mine.token_ids == (seq if end is None else seq[:end + 1])
        rows.append(row)
        print(f"prompt {i:3d} ({len(ids):4d} tokens): decodekit {row['decodekit_tok_s']:7.1f} tok/s, transformers "
              f"{row['transformers_tok_s']:7.1f} tok/s, x{row['speedup']:.2f}"
              + (f", same output: {row['same_output']}" if "same_output" in row else ""), flush=True)
    summary = {k_: statistics.median(r[k_] for r in rows)
               for k_ in ("decodekit_tok_s", "transformers_tok_s", "speedup")}
    result = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "dtype": str(dtype), "rows": rows, "median": summary}
    print(f"\nmedian over {len(rows)} prompts, {k} beams, {new} new tokens, {dtype}, {result['device']}: "
          f"decodekit {summary['decodekit_tok_s']:.1f} tok/s, transformers {summary['transformers_tok_s']:.1f} tok/s, "
          f"speedup x{summary['speedup']:.2f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "beam_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
