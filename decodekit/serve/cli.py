"""`decodekit serve`: load a model, warm it up, and serve the OpenAI API on it with uvicorn until Ctrl-C."""
from __future__ import annotations

import argparse
import socket
import sys


def add_serve_parser(sub) -> None:
    from ..cli import add_method_args, add_model_args

    s = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, streaming) with continuous batching")
    add_model_args(s)
    add_method_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL printed says which)")
    s.add_argument("--served-model-name", default=None, help="the `model` clients ask for (default: --model)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    s.add_argument("--max-running", type=int, default=None, help="sequences per batch at most (engine default 256)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the running batch; more get 429 with Retry-After")
    s.add_argument("--max-step-tokens", type=int, default=None,
                   help="tokens per engine step at most: the prefill chunk budget beside decodes (default 2048)")
    s.add_argument("--max-context", type=int, default=None, help="tokens per sequence (default: the model's)")
    s.add_argument("--kv-tokens", type=int, default=None, help="KV-cache size in tokens (default: see load)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to its last token (then 408)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on Ctrl-C, seconds in-flight requests get to finish before they are cancelled")
    s.add_argument("--fused-chunks", type=int, default=4,
                   help="GPU: fused greedy chunks per step at most (fewer: new requests join sooner)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    """Flags that can be refused before the model loads."""
    from ..speculative.base import DRAFTERS

    if args.method not in DRAFTERS:
        raise ValueError(f"unknown method {args.method!r}; available: {', '.join(sorted(DRAFTERS))}")
    for name, low in (("port", 0), ("max_queue", 0), ("max_running", 1), ("max_step_tokens", 1), ("fused_chunks", 1),
                      ("max_context", 2), ("kv_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("request_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving: a taken port is a one-line error, and port 0 gets its number for the URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    import decodekit

    from ..cli import parse_options
    from .app import ServeSettings, create_app
    from .server import Server

    _check(args)
    options = parse_options(args.method_option)
    engine_options = {k: getattr(args, k) for k in ("max_running", "max_step_tokens", "kv_tokens")
                      if getattr(args, k) is not None}
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                            tensor_parallel=args.tensor_parallel, window_ring=not args.no_window_ring, **engine_options)
    engine.core.max_chunks = args.fused_chunks
    # Warm up with the default method: compiles what the device compiles, and checks the method and its options.
    engine.generate("Hello", 4, method=args.method, method_options=options, verifier=args.verifier)
    sock = _listen(args.host, args.port)
    name = args.served_model_name or args.model
    settings = ServeSettings(name, args.method, options, verifier=args.verifier, api_key=args.api_key,
                             max_queue=args.max_queue, request_timeout=args.request_timeout)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                            timeout_graceful_shutdown=args.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def announce() -> None:
        print(f"decodekit: serving {name} at {url} (method {args.method}); Ctrl-C stops", flush=True)

    Server(config, announce).run(sockets=[sock])
    print("decodekit: server stopped", file=sys.stderr, flush=True)
