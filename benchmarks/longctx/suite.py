"""Samples and suites: a task's message wrapped in the chat template, sized in tokens, seeded."""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.longctx.tasks import TASKS

MIN_PROMPT_TOKENS = 64
EXTRA_EOS = 3  # a sample is decoded with gen_length = answer length + this many positions for EOS


@dataclass
class Sample:
    """One prompt and its exact answer.

    `prompt` is the full text given to the model (chat template applied, ends with the assistant
    prefix); `prompt_token_ids` is its tokenization. `answer_token_ids` excludes EOS. `length` is
    `len(prompt_token_ids)`; `key` is the token the question asks about (empty for common_words).
    """

    prompt: str
    prompt_token_ids: list[int]
    answer: str
    answer_token_ids: list[int]
    task: str
    depth: float
    length: int
    key: str = ""
    seed: int = 0

    @property
    def gen_length(self) -> int:
        return len(self.answer_token_ids) + EXTRA_EOS

    def is_answered_by(self, tokens: list[int], stop_ids: tuple[int, ...]) -> bool:
        """Exact match of the generation, cut at its first stop token, with the answer."""
        for i, t in enumerate(tokens):
            if t in stop_ids:
                tokens = tokens[:i]
                break
        return list(tokens) == self.answer_token_ids


_SENTINEL = "\x00MESSAGE\x00"
_template_cache: dict[int, tuple[str, str, int]] = {}


def _template(tokenizer) -> tuple[str, str, int]:
    """(text before, text after, tokens taken) of a one-user-turn chat prompt; rendered once."""
    key = id(tokenizer)
    if key not in _template_cache:
        before, after = "", ""
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
            )
            before, after = text.split(_SENTINEL)
        _template_cache[key] = (before, after, len(_encode(tokenizer, before + after)))
    return _template_cache[key]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_sample(task: str, prompt_tokens: int, depth: float, seed: int, tokenizer) -> Sample:
    """One sample of `task` whose prompt is `prompt_tokens` tokens long (exact for the suite tokenizer).

    The same (task, prompt_tokens, depth, seed) always gives the same sample.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown (allowed: {', '.join(TASKS)})")
    if prompt_tokens < MIN_PROMPT_TOKENS:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be at least {MIN_PROMPT_TOKENS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    rng = random.Random(f"{task}/{prompt_tokens}/{depth}/{seed}")
    before, after, template_tokens = _template(tokenizer)
    text = TASKS[task](rng, tokenizer, prompt_tokens - template_tokens, depth)
    prompt = before + text.message + after
    ids = _encode(tokenizer, prompt)
    return Sample(
        prompt=prompt,
        prompt_token_ids=ids,
        answer=text.answer,
        answer_token_ids=_encode(tokenizer, text.answer),
        task=task,
        depth=depth,
        length=len(ids),
        key=text.key,
        seed=seed,
    )


def generate_suite(tasks: list[str], lengths: list[int], n_per: int, seed: int, tokenizer) -> list[Sample]:
    """`n_per` samples per (task, length), needle depths evenly spaced over [0, 1]."""
    samples = []
    for task in tasks:
        for length in lengths:
            for i in range(n_per):
                depth = i / (n_per - 1) if n_per > 1 else 0.5
                samples.append(generate_sample(task, length, round(depth, 4), seed * 100_003 + i, tokenizer))
    return samples
