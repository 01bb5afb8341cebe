"""`gpt2kit serve`: an OpenAI-compatible completions server for a GPT-2 checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

from .generate import add_model_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI completions API",
        description="Serve POST /v1/completions (streaming included), GET /v1/models and GET /health. "
                    "Binds 127.0.0.1 unless --host says otherwise.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None,
                   help="the name clients pass as `model` (default: the --model argument's last path part)")
    p.add_argument("--api-key", default=os.environ.get("GPT2KIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GPT2KIT_API_KEY, else none)")
    p.add_argument("--max-concurrency", type=int, default=4, metavar="N",
                   help="requests generating at once; the others wait (default 4)")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests waiting for a turn; past them the server answers 429 (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="token positions one request may hold at once, (prompts x n) x (longest prompt + "
                        "max_tokens): its KV cache is allocated for them all, and a larger request is refused "
                        "with a 400 rather than exhausting the memory. Default: from the memory free on the "
                        "model's device once it is loaded (CUDA: the GPU's free memory; CPU: MemAvailable), half of "
                        "it shared by the --max-concurrency requests that may hold theirs at once, at least one "
                        "whole-context completion and at most 128 (a request's most completions) "
                        "(gpt2 in fp32 with 20 GiB free: ~21,000); the startup line and "
                        "/health report it")
    p.set_defaults(func=run)


def served_name(model: str) -> str:
    """The name clients pass as `model` by default: the checkpoint folder's own name, also for
    `--model .` (whose last path part is empty), without following a `best`/`latest` link to its
    step folder; for a hub name, its last part."""
    path = Path(model)
    if path.exists():
        path = Path(os.path.abspath(path))
    return path.name or str(model)


def bind(host: str, port: int):
    """A socket bound to host:port, or a one-line error: checked before the model loads (minutes
    for a large one), and handed to uvicorn, whose own failure to bind exits with code 3."""
    import socket

    from ..errors import GPT2KitError

    # the address family as uvicorn picks it: a name such as localhost binds its IPv4 address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise GPT2KitError(f"--host {host}: {e.strerror}") from None
    except OSError as e:
        sock.close()
        raise GPT2KitError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def run(args) -> int:
    import ipaddress
    import logging

    from ..errors import GPT2KitError
    from ..generate import load_for_inference

    try:
        import uvicorn

        from ..server import MEMORY_FRACTION, available_memory, create_app, default_max_batch_tokens
    except ImportError as e:  # the server is an extra
        raise GPT2KitError(f"serve needs the 'serve' extra (pip install 'gpt2kit[serve]'): {e}") from None
    if args.api_key is not None and not args.api_key.strip():
        raise GPT2KitError("--api-key: empty; give a key (is the variable set?), or leave the option out")
    if args.max_concurrency < 1:
        raise GPT2KitError(f"--max-concurrency: expected an integer >= 1, got {args.max_concurrency}")
    if args.max_waiting < 0:
        raise GPT2KitError(f"--max-waiting: expected an integer >= 0, got {args.max_waiting}")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        raise GPT2KitError(f"--max-batch-tokens: expected an integer >= 1, got {args.max_batch_tokens}")
    if not 0 <= args.port < 65536:
        raise GPT2KitError(f"--port: expected 0..65535, got {args.port}")
    sock = bind(args.host, args.port)
    if args.api_key is None and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        logging.getLogger(__name__).warning("warning: --host %s without --api-key: anyone who can reach this "
                                            "machine can use the model", args.host)
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    name = args.model_name or served_name(args.model)
    budget, basis = args.max_batch_tokens, ""
    if budget is None:  # said on the startup line: the number depends on what the device had free
        device = model.transformer.wte.weight.device
        memory = available_memory(device)
        budget = default_max_batch_tokens(model, args.max_concurrency, memory=memory)
        basis = (f"; default: from {MEMORY_FRACTION:.0%} of the {memory / 2**30:.1f} GiB free on {device}"
                 if memory is not None else "; default: the memory free is unknown, a KV cache the size of the weights")
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key,
                     max_concurrency=args.max_concurrency, max_waiting=args.max_waiting,
                     max_batch_tokens=budget)
    engine = app.state.engine
    logging.getLogger(__name__).info(
        "serving %s as %r on http://%s:%d/v1%s; %d requests at once, %d waiting, %s token positions per request "
        "(--max-batch-tokens%s)", args.model, name, args.host, sock.getsockname()[1],
        " (API key required)" if args.api_key else "", engine.max_concurrency, engine.max_waiting,
        f"{engine.max_batch_tokens:,}", basis)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
