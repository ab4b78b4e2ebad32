"""Ray Serve: the OpenAI server's app, one AsyncLLMEngine per replica, behind Ray's HTTP proxy.

Each replica builds the very FastAPI app of ``maskkv serve`` around its own engine, so the routes,
errors, streaming and auth are the same; Ray Serve spreads requests over ``num_replicas`` replicas,
on this machine or across a cluster. ``/metrics`` answers for the replica that took the request.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ray import serve

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine
from maskkv_engine.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE_LEN

logger = logging.getLogger(__name__)


@serve.ingress()
class OpenAIDeployment:
    """One replica: an engine and the OpenAI app around it (built by Serve after ``__init__``)."""

    def __init__(
        self,
        model: str,
        served_model_name: str,
        engine_kwargs: dict[str, Any],
        api_key: str | None = None,
        max_queue_len: int | None = DEFAULT_MAX_QUEUE_LEN,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        num_threads: int | None = None,
    ):
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        self.engine = AsyncLLMEngine.from_engine_args(model, max_queue_len=max_queue_len, **engine_kwargs)
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        from maskkv_engine.entrypoints.openai.api_server import build_app

        return build_app(
            self.engine, [self.served_model_name], api_key=self.api_key, max_body_bytes=self.max_body_bytes
        )

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died."""
        self.engine.check_health()


def build_serve_app(
    model: str,
    *,
    served_model_name: str | None = None,
    num_replicas: int = 1,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0.0,
    max_ongoing_requests: int | None = None,
    api_key: str | None = None,
    max_queue_len: int | None = DEFAULT_MAX_QUEUE_LEN,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **engine_kwargs: Any,
) -> serve.Application:
    """A Serve application for ``serve.run(app, route_prefix="/")``.

    max_ongoing_requests: requests Serve routes to one replica at once (default: its batch size plus
    queue, so the engine, not Serve, decides what waits).
    """
    max_num_seqs = engine_kwargs.get("max_num_seqs", 64)
    if max_ongoing_requests is None:
        max_ongoing_requests = max_num_seqs + (max_queue_len or 0)
    deployment = serve.deployment(OpenAIDeployment, name="maskkv-openai").options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
    )
    return deployment.bind(
        model,
        served_model_name or model,
        engine_kwargs,
        api_key=api_key,
        max_queue_len=max_queue_len,
        max_body_bytes=max_body_bytes,
        num_threads=max(1, int(num_cpus_per_replica)),
    )


def run_ray_serve(args: argparse.Namespace) -> int:
    """``maskkv serve --ray``: join ``--address`` (or start a local Ray), then serve until interrupted."""
    import ray

    from maskkv_engine.entrypoints.openai.cli_args import engine_kwargs_from_args, resolve_model

    path, name = resolve_model(args)
    ray.init(address=args.address) if args.address else ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_serve_app(
        path,
        served_model_name=name,
        num_replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica,
        api_key=args.api_key,
        max_queue_len=args.max_queue_len,
        max_body_bytes=args.max_body_bytes,
        **engine_kwargs_from_args(args),
    )
    logger.info("serving %s with %d Ray Serve replicas on http://%s:%d", name, args.replicas, args.host, args.port)
    serve.run(app, name="maskkv", route_prefix="/", blocking=True)
    return 0
