"""Haystacks measured in tokens: noise lines, line fillers, and needle placement by depth.

Lengths are counted with the tokenizer the suite is generated for, one line at a time (lines are
separated by whitespace, so counts add up exactly for the suite's word-level tokenizer and to within
a token or two per line for a subword tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from benchmarks.longctx.vocabulary import FILLER_WORDS

NOISE_LINE_WORDS = (5, 12)  # filler words per noise line, before its full stop


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens in each text, without special tokens."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def noise_line(rng: random.Random, n_words: int | None = None) -> str:
    """A line of random filler words ending with a full stop: `n_words + 1` tokens."""
    if n_words is None:
        n_words = rng.randint(*NOISE_LINE_WORDS)
    return " ".join(rng.choices(FILLER_WORDS, k=n_words)) + " ."


def fill_lines(rng: random.Random, tokenizer, n_tokens: int, make_line: Callable[[random.Random], str]) -> list[str]:
    """Lines from `make_line` totalling exactly `n_tokens` tokens (word-level tokenizer).

    Lines are added while they fit; the few tokens left over become a short line of filler words
    placed first, so that the lines `make_line` writes stay contiguous.
    """
    lines: list[str] = []
    total = 0
    while True:
        batch = [make_line(rng) for _ in range(4 + (n_tokens - total) // 6)]  # lines take >= 4 tokens
        counts = count_tokens(tokenizer, batch)
        for line, c in zip(batch, counts):
            if total + c > n_tokens:
                return _pad(rng, tokenizer, n_tokens - total) + lines
            lines.append(line)
            total += c


def _pad(rng: random.Random, tokenizer, n_tokens: int) -> list[str]:
    if n_tokens <= 0:
        return []
    if n_tokens == 1:
        return [rng.choice(FILLER_WORDS)]
    return [noise_line(rng, n_tokens - 1)]


def noise_lines(rng: random.Random, tokenizer, n_tokens: int) -> list[str]:
    """A noise haystack of exactly `n_tokens` tokens."""
    return fill_lines(rng, tokenizer, n_tokens, noise_line)


def insert_at_depth(lines: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert each needle between haystack lines at its relative depth (0: first line, 1: last).

    Needles keep their given order when depths tie or cross.
    """
    out = list(lines)
    positions = [round(d * len(lines)) for d in depths]
    for offset, (needle, pos) in enumerate(sorted(zip(needles, positions), key=lambda np: np[1])):
        out.insert(pos + offset, needle)
    return out


def spread(depth: float, n: int, width: float = 0.25) -> list[float]:
    """`n` increasing depths in a window of `width` placed around `depth` (clipped to [0, 1])."""
    if n == 1:
        return [depth]
    start = min(max(depth - width / 2, 0.0), 1.0 - width)
    return [start + i * width / (n - 1) for i in range(n)]
