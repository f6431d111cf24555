"""Load generator for any OpenAI-compatible server on this machine (decodekit's `serve`, vLLM, ...): streaming chat
completions over Spec-Bench prompts, at fixed concurrency levels or Poisson arrival rates, per decoding method.

    python bench/load_gen.py --url http://127.0.0.1:8000/v1 --model smollm2 --methods plain,pld \
        --concurrency 1,4,16,64 --num-requests 128 --max-tokens 128 --out load.json
    python bench/load_gen.py --url http://127.0.0.1:8000/v1 --model MODEL --rate 1,4,16 --duration 120

Per method and load level it reports throughput (output tokens/s over the level's wall time, and requests/s), time
to first token, inter-token latency (the gaps between streamed content chunks; a speculative step that commits
several tokens sends them in one chunk, so see also TPOT = (latency - TTFT) / (output tokens - 1)), each as p50, p99
and mean, and writes them as JSON. Token counts come from the server's usage (`stream_options.include_usage`).
`--methods` puts decodekit's `method` in each request's body; `--methods ""` sends none (the server's default, and
what a vLLM server expects). Bounded: at most --num-requests requests and --duration seconds of arrivals per level,
each request at most --request-timeout seconds; loopback URLs only.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive content chunks
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # linear interpolation between closest ranks
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": at(0.5), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"load_gen: cannot resolve {host!r}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"load_gen: {url} is not a loopback address; this tool only loads servers on this machine")


async def one_request(client, args, prompt: str, method: str) -> Sample:
    import openai

    extra = {"method": method} if method else None
    t0 = time.perf_counter()
    first = last = None
    tokens, gaps = 0, []
    try:
        stream = await client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
            temperature=args.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except (openai.APIError, asyncio.TimeoutError) as e:
        return Sample(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    end = time.perf_counter()
    if first is None:
        first = end  # nothing but an immediate end: TTFT is the whole latency
    return Sample(True, first - t0, end - t0, tokens, gaps)


async def run_level(client, args, prompts: list[str], method: str, mode: str, level: float) -> dict:
    samples: list[Sample] = []
    order = itertools.count()
    start = time.perf_counter()
    stop_at = start + args.duration

    async def timed(prompt: str) -> None:
        try:
            samples.append(await asyncio.wait_for(one_request(client, args, prompt, method), args.request_timeout))
        except asyncio.TimeoutError:
            samples.append(Sample(ok=False, error="request timeout"))

    if mode == "concurrency":
        async def user() -> None:
            while (i := next(order)) < args.num_requests and time.perf_counter() < stop_at:
                await timed(prompts[i % len(prompts)])

        await asyncio.gather(*(user() for _ in range(int(level))))
    else:  # Poisson arrivals at `level` requests per second
        rng = random.Random(args.seed)
        tasks = []
        for i in range(args.num_requests):
            if time.perf_counter() >= stop_at:
                break
            tasks.append(asyncio.create_task(timed(prompts[i % len(prompts)])))
            await asyncio.sleep(rng.expovariate(level))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    tpot = [(s.latency - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]
    return {"method": method or "server-default", "mode": mode, "level": level, "requests": len(ok),
            "errors": len(samples) - len(ok), "error_examples": sorted({s.error for s in samples if not s.ok})[:3],
            "wall_s": wall, "output_tokens": tokens, "throughput_tok_s": tokens / wall if wall else 0.0,
            "requests_per_s": len(ok) / wall if wall else 0.0,
            "ttft_s": percentiles([s.ttft for s in ok]), "itl_s": percentiles([g for s in ok for g in s.gaps]),
            "tpot_s": percentiles(tpot), "latency_s": percentiles([s.latency for s in ok])}


def load_texts(args) -> list[str]:
    from decodekit.bench.datasets import load_prompts

    texts = [p.prompt for p in load_prompts(args.dataset, args.limit)]
    random.Random(args.seed).shuffle(texts)
    return texts


def levels(text: str | None, kind) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


async def main_async(args) -> dict:
    import openai

    prompts = load_texts(args)
    plan = [("concurrency", c) for c in levels(args.concurrency, int)] + [("rate", r) for r in levels(args.rate, float)]
    if not plan:
        plan = [("concurrency", c) for c in (1, 4, 16, 64)]
    if any(level <= 0 for _, level in plan):
        raise SystemExit("load_gen: concurrency levels and rates must be > 0")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else [""]
    runs = []
    # No retries: a 429 or an error counts as what it is. (The client's pool allows 1000 connections.)
    async with openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=0,
                                  timeout=args.request_timeout) as client:
        for method in methods:
            for mode, level in plan:
                print(f"load_gen: method {method or 'server-default'}, {mode} {level} ...", file=sys.stderr, flush=True)
                runs.append(await run_level(client, args, prompts, method, mode, level))
    return {"url": args.url, "model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "dataset": args.dataset, "num_requests": args.num_requests, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": runs}


def table(result: dict) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    lines = [f"{'method':14s} {'mode':11s} {'level':>6s} {'ok':>4s} {'err':>4s} {'tok/s':>8s} {'req/s':>6s} "
             f"{'ttft p50':>8s} {'ttft p99':>8s} {'itl p50':>7s} {'itl p99':>7s} {'tpot p50':>8s}  (ms)"]
    for r in result["runs"]:
        lines.append(f"{r['method']:14s} {r['mode']:11s} {r['level']:>6g} {r['requests']:>4d} {r['errors']:>4d} "
                     f"{r['throughput_tok_s']:>8.1f} {r['requests_per_s']:>6.2f} {ms(r['ttft_s']['p50']):>8s} "
                     f"{ms(r['ttft_s']['p99']):>8s} {ms(r['itl_s']['p50']):>7s} {ms(r['itl_s']['p99']):>7s} "
                     f"{ms(r['tpot_s']['p50']):>8s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base (loopback only)")
    p.add_argument("--model", required=True, help="the `model` the server serves")
    p.add_argument("--api-key", default=None)
    p.add_argument("--methods", default="plain", help='comma-separated decodekit methods; "" sends none')
    p.add_argument("--concurrency", default=None, help="fixed concurrency levels, e.g. 1,4,16,64")
    p.add_argument("--rate", default=None, help="Poisson arrival rates in requests/s, e.g. 0.5,2,8")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level at most")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per level at most")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request at most")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dataset", default="spec-bench", help="spec-bench or a .jsonl with `turns` or `prompt`")
    p.add_argument("--limit", type=int, default=None, help="prompts per category")
    p.add_argument("--seed", type=int, default=0, help="prompt order and arrival times")
    p.add_argument("--out", default=None, help="write the JSON here (else to stdout)")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.duration <= 0 or args.request_timeout <= 0 or args.max_tokens < 1:
        p.error("--num-requests, --duration, --request-timeout and --max-tokens must be positive")
    check_loopback(args.url)
    result = asyncio.run(main_async(args))
    print(table(result), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
