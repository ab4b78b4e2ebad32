"""``maskkv serve`` flags. Importing this needs no server packages, so ``maskkv generate`` works without them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from maskkv_engine import presets

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt a model takes, far below a memory problem
DEFAULT_MAX_QUEUE_LEN = 1024


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Server flags (the engine flags --model, --kv-policy, --kv-budget, ... come from the CLI)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests in one batch")
    p.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN,
                   help="waiting requests beyond which new ones get 503 + Retry-After")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--kv-memory-bytes", type=int, default=None, help="size of the KV page pool")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="response tokens (max_tokens, summed over a batch's prompts) and steps one request may ask "
                        "for; more gets 400 (default: --max-model-len)")  # fmt: skip
    p.add_argument("--allowed-hosts", type=lambda s: [h for h in s.split(",") if h], default=[],
                   help="comma-separated Host names accepted besides localhost, 127.0.0.1, [::1] and --host "
                        "('*': any); other Host headers get 400 (against DNS rebinding)")  # fmt: skip
    p.add_argument("--log-level", default="info")
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas (with --ray)")
    ray.add_argument("--address", default=None, help="an existing Ray cluster, e.g. 10.0.0.1:6379 (default: local)")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keyword arguments: the flags given, over the preset's engine options, over maskkv."""
    given = dict(kv_policy=args.kv_policy, kv_budget=args.kv_budget, prefill_chunk_size=args.prefill_chunk_size)
    kw: dict[str, Any] = presets.engine_options(args.preset, given)
    kw.setdefault("kv_policy", "maskkv")
    kw.update(dtype=args.dtype, device=args.device, seed=args.seed, max_num_seqs=args.max_num_seqs)
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    if args.kv_memory_bytes is not None:
        kw["kv_memory_bytes"] = args.kv_memory_bytes
    return kw


def resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    """(model directory, the name clients use for it). No --model: the embedded default model. The name
    is --served-model-name, else the directory's last component: /v1/models and /metrics never show
    the filesystem path (the path itself is still accepted as the model id)."""
    from maskkv_engine.llm import default_model_path

    path = args.model if args.model is not None else default_model_path()
    if args.served_model_name:
        name = args.served_model_name
    else:
        name = Path(args.model).name or str(args.model) if args.model is not None else "maskkv-default"
    return str(path), name
