"""Offline batch inference over many engines with Ray Data: one ``LLM`` per actor (a GPU or CPU slot).

Shaped like vLLM's Ray Data integration: ``Dataset.map_batches`` with a callable class that holds
the engine, run by an actor pool. Each actor batches its rows inside one engine, and every request
carries its own seed, so the tokens are the ones a single ``LLM`` gives for the same prompts and
sampling parameters, whichever actor ran them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskkv_engine.llm import LLM
from maskkv_engine.outputs import CompletionOutput
from maskkv_engine.sampling_params import SamplingParams


class LLMPredictor:
    """``map_batches`` callable: reads ``prompt`` (text) or ``prompt_token_ids`` and adds
    ``generated_text``, ``generated_token_ids`` and ``finish_reason``.

    sampling_params: one for every row, or a list indexed by the row's ``index`` column (one per prompt).
    num_threads: torch threads of this actor (match the CPUs the actor was given).
    """

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        num_threads: int | None = 1,
        **engine_kwargs: Any,
    ):
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        self.llm = LLM(model, **engine_kwargs)
        self.sampling_params = sampling_params or SamplingParams()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if "prompt_token_ids" in batch:
            prompts: list = [{"prompt_token_ids": [int(t) for t in ids]} for ids in batch["prompt_token_ids"]]
        else:
            prompts = [str(p) for p in batch["prompt"]]
        params = self.sampling_params
        if not isinstance(params, SamplingParams):
            params = [params[int(i)] for i in batch["index"]]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        return {
            **batch,
            "generated_text": np.array([c.text for c in completions], dtype=object),
            "generated_token_ids": _ragged([c.token_ids for c in completions]),
            "finish_reason": np.array([c.finish_reason for c in completions], dtype=object),
        }


def _ragged(rows: list[list[int]]) -> np.ndarray:
    """One int64 array per row in an object array (rows differ in length; numpy would try to stack them)."""
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = np.asarray(row, dtype=np.int64)
    return out


def process_dataset(
    ds,
    model: str,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    num_engines: int = 2,
    num_cpus_per_engine: float = 1.0,
    num_gpus_per_engine: float = 0.0,
    batch_size: int = 16,
    **engine_kwargs: Any,
):
    """Add generations to a ``ray.data.Dataset`` (lazily) with a pool of ``num_engines`` engine actors."""
    import ray.data

    return ds.map_batches(
        LLMPredictor,
        fn_constructor_kwargs=dict(
            model=model,
            sampling_params=sampling_params,
            num_threads=max(1, int(num_cpus_per_engine)),
            **engine_kwargs,
        ),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_engines),
        num_cpus=num_cpus_per_engine,
        num_gpus=num_gpus_per_engine,
    )


def generate(
    prompts: Sequence[str | dict[str, Any]],
    model: str,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    **kwargs: Any,
) -> list[CompletionOutput]:
    """``LLM.generate`` spread over Ray: the same prompt forms and parameters, outputs in prompt order.

    prompts: all strings, or all ``{"prompt_token_ids": [...]}`` dicts. kwargs: see ``process_dataset``.
    Needs a running Ray (``ray.init``) or starts a local one.
    """
    import ray.data

    prompts = list(prompts)
    if not prompts:
        return []
    if isinstance(sampling_params, Sequence) and len(sampling_params) != len(prompts):
        raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
    if all(isinstance(p, str) for p in prompts):
        rows = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
    elif all(isinstance(p, dict) and "prompt_token_ids" in p for p in prompts):
        rows = [{"index": i, "prompt_token_ids": list(p["prompt_token_ids"])} for i, p in enumerate(prompts)]
    else:
        raise ValueError("prompts must be all strings or all {'prompt_token_ids': [...]} dicts")
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * kwargs.get("num_engines", 2)))
    results = process_dataset(ds, model, sampling_params, **kwargs).take_all()
    results.sort(key=lambda row: int(row["index"]))  # actors finish in any order
    return [
        CompletionOutput(
            0, str(r["generated_text"]), [int(t) for t in r["generated_token_ids"]], str(r["finish_reason"])
        )
        for r in results
    ]
