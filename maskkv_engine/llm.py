"""LLM: the offline entry point, shaped like vLLM's."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from maskkv_engine import presets
from maskkv_engine.config import EngineConfig
from maskkv_engine.engine.llm_engine import LLMEngine, PromptType
from maskkv_engine.outputs import RequestOutput
from maskkv_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def default_model_path() -> str:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ValueError(f"no model given and the embedded default model is missing at {DEFAULT_MODEL_DIR}")
    return str(DEFAULT_MODEL_DIR)


class LLM:
    """Offline batch inference for diffusion LMs with pruned, paged KV.

    >>> llm = LLM("path/to/LLaDA-8B-Instruct", kv_policy="maskkv", kv_budget=256)
    >>> out = llm.generate(["Who wrote Hamlet?"], SamplingParams(gen_length=64, block_length=32))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        kv_policy: str | None = None,
        kv_budget: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        preset: str | None = None,
        **engine_options: Any,
    ):
        """``kv_policy`` defaults to ``maskkv``; ``preset`` (``maskkv_engine/presets.py``, e.g. ``"paper"``)
        fills the engine options left out and the SamplingParams ``generate`` uses when given none."""
        options = presets.engine_options(preset, {"kv_policy": kv_policy, "kv_budget": kv_budget, **engine_options})
        options.setdefault("kv_policy", "maskkv")
        config = EngineConfig.from_kwargs(
            str(model) if model is not None else default_model_path(),
            dtype=dtype,
            device=device,
            seed=seed,
            skip_tokenizer_init=skip_tokenizer_init,
            **options,
        )
        self.llm_engine = LLMEngine(config)
        self.preset = preset
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def get_tokenizer(self):
        """The model's transformers tokenizer (None when the model has none or skip_tokenizer_init=True)."""
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched; outputs in prompt order.

        prompts: a string, a ``{"prompt": "..."}`` or ``{"prompt_token_ids": [...]}`` dict, or a list of them.
        sampling_params: one for all prompts, or a list with one per prompt (``n`` > 1: one RequestOutput
        per prompt with n completions).
        """
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} sampling_params for {len(prompts)} prompts: give one, or one per prompt"
                )
        else:
            params = [sampling_params or presets.sampling_params(self.preset)] * len(prompts)
        engine = self.llm_engine
        ids: list[str] = []
        try:  # validate every prompt before any work starts
            for prompt, sp in zip(prompts, params):
                rid = f"gen-{next(self._ids)}"
                engine.add_request(rid, prompt, sp)
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while len(done) < len(ids):
                    for out in engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
        finally:  # interrupted (Ctrl-C, an error): what is left must not keep its pages
            for rid in ids:
                if rid not in done:
                    engine.abort_request(rid)
        failed = [o for o in done.values() if o.error is not None]
        if failed:
            logger.error("%d of %d requests failed: %s", len(failed), len(ids), failed[0].error)
        return [done[rid] for rid in ids]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Watch one request denoise: yields its state after every step (``canvas_token_ids`` /
        ``canvas_text`` show the masks still left); the last item is the finished output."""
        rid = f"stream-{next(self._ids)}"
        engine = self.llm_engine
        engine.add_request(rid, prompt, sampling_params or presets.sampling_params(self.preset))
        try:
            while True:
                for out in engine.step(intermediate=True):
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:  # a caller that stops iterating early must not leave the request holding pages
            engine.abort_request(rid)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply a chat template (the model's, or ``chat_template``, a Jinja string) to one conversation or a
        list of them, then generate. The keyword arguments are vLLM's and mean what they mean there."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (or skip_tokenizer_init=True); use generate() with token ids")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: pass chat_template=... or use generate()")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        options = dict(
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(chat_template_kwargs or {}),
        )
        prompts = [
            {"prompt_token_ids": self.apply_chat_template(conv, **options), "prompt": None} for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, str]], **options: Any) -> list[int]:
        """Token ids of ``conversation`` under the chat template (``options``: transformers'
        apply_chat_template keywords; add_generation_prompt defaults to True)."""
        options.setdefault("add_generation_prompt", True)
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, **options)
        if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is empty")
        if all(isinstance(t, int) for t in prompts):
            raise ValueError("a bare list of ints is ambiguous: pass {'prompt_token_ids': [...]} for token ids")
        return list(prompts)
    raise TypeError(f"prompts must be a string, a dict, or a list of them; got {type(prompts).__name__}")
