"""The six tasks. Each writes the user message (context, then the question) and the exact answer.

A task gets `n_tokens`, the tokens its message must take (the chat template's own tokens are already
subtracted), and the needle `depth` in [0, 1]. Keys and values are single tokens of disjoint
vocabulary ranges; an answer of several words lists them in the order they appear in the context.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from benchmarks.longctx.haystack import count_tokens, fill_lines, insert_at_depth, noise_lines, spread
from benchmarks.longctx.vocabulary import FILLER_WORDS, ID_WORDS, KEY_WORDS, VALUE_WORDS

INTRO = "read the text and answer the question at the end ."
N_MULTI_VALUES = 4
N_VARIABLES = 4
COMMON_SHARES = (0.15, 0.10, 0.06)  # share of the word list taken by each of the three common words


@dataclass
class TaskText:
    """A task instance before the chat template: `key` is the token the question asks about."""

    message: str
    answer: str
    key: str


def _needle(key: str, value: str) -> str:
    return f"the magic number for {key} is {value} ."


def _message(tokenizer, n_tokens: int, intro: str, question: str, needles: list[str], haystack) -> str:
    """Join intro, haystack (built for the tokens left) and question into one message."""
    fixed = sum(count_tokens(tokenizer, [intro, question] + needles))
    lines = haystack(n_tokens - fixed)
    return "\n".join([intro, *lines, question])


def single_needle(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """One `the magic number for KEY is VALUE .` line in a haystack of random filler words."""
    key, value = rng.choice(KEY_WORDS), rng.choice(VALUE_WORDS)
    needle = _needle(key, value)
    question = f"question : what is the magic number for {key} ?"

    def haystack(n):
        return insert_at_depth(noise_lines(rng, tokenizer, n), [needle], [depth])

    return TaskText(_message(tokenizer, n_tokens, INTRO, question, [needle], haystack), value, key)


def multi_key(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """Every haystack line is a needle of another key; only the asked key's needle is unique."""
    key, value = rng.choice(KEY_WORDS), rng.choice(VALUE_WORDS)
    others = [k for k in KEY_WORDS if k != key]
    needle = _needle(key, value)
    question = f"question : what is the magic number for {key} ?"

    def distractor(r: random.Random) -> str:
        return _needle(r.choice(others), r.choice(VALUE_WORDS))

    def haystack(n):
        return insert_at_depth(fill_lines(rng, tokenizer, n, distractor), [needle], [depth])

    return TaskText(_message(tokenizer, n_tokens, INTRO, question, [needle], haystack), value, key)


def multi_value(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """Four needles of one key with four different values, around `depth`; answer all four in order."""
    key = rng.choice(KEY_WORDS)
    values = rng.sample(VALUE_WORDS, N_MULTI_VALUES)
    needles = [_needle(key, v) for v in values]
    question = f"question : what are all the magic numbers for {key} ?"

    def haystack(n):
        return insert_at_depth(noise_lines(rng, tokenizer, n), needles, spread(depth, len(needles)))

    return TaskText(_message(tokenizer, n_tokens, INTRO, question, needles, haystack), " ".join(values), key)


def kv_retrieval(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """A JSON-like list `{ id : id , ... }` of random ids; answer the value of one id."""
    key, value = rng.sample(ID_WORDS, 2)
    others = [k for k in ID_WORDS if k != key]
    intro = "read the json of ids and answer the question at the end . {"
    question = f"}} question : what is the value of id {key} ?"
    needle = f"{key} : {value} ,"

    def pair(r: random.Random) -> str:
        return f"{r.choice(others)} : {r.choice(ID_WORDS)} ,"

    def haystack(n):
        return insert_at_depth(fill_lines(rng, tokenizer, n, pair), [needle], [depth])

    return TaskText(_message(tokenizer, n_tokens, intro, question, [needle], haystack), value, key)


def variable_tracking(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """A chain `var X1 = 42 .`, `var X2 = X1 .`, ... in noise; answer every variable equal to 42."""
    names = rng.sample(ID_WORDS, N_VARIABLES)
    value = rng.choice(VALUE_WORDS)
    chain = [f"var {names[0]} = {value} ."] + [f"var {b} = {a} ." for a, b in zip(names, names[1:])]
    question = f"question : which variables equal {value} ?"

    def haystack(n):
        return insert_at_depth(noise_lines(rng, tokenizer, n), chain, spread(depth, len(chain)))

    return TaskText(_message(tokenizer, n_tokens, INTRO, question, chain, haystack), " ".join(names), value)


def common_words(rng: random.Random, tokenizer, n_tokens: int, depth: float) -> TaskText:
    """A list `w , w , ...` where three words are far more frequent; answer them, most frequent first.

    The three take COMMON_SHARES of the list (distinct counts, each above any other word's count).
    `depth` is not used: the common words are spread over the whole list.
    """
    intro = "read the list of words and answer the question at the end ."
    question = "question : what are the three most common words in the list ?"
    common = rng.sample(FILLER_WORDS, len(COMMON_SHARES))
    rare = [w for w in FILLER_WORDS if w not in common]

    def haystack(n):
        n_items = n // 2  # each item is `word ,`
        counts = [max(len(COMMON_SHARES) + 1 - i, round(share * n_items)) for i, share in enumerate(COMMON_SHARES)]
        n_rare = n_items - sum(counts)
        # Rare words are dealt from shuffled decks, so each appears at most ceil(n_rare / len(rare)) times.
        rare_items: list[str] = []
        while len(rare_items) < n_rare:
            deck = list(rare)
            rng.shuffle(deck)
            rare_items += deck
        items = [w for w, c in zip(common, counts) for _ in range(c)] + rare_items[:n_rare]
        rng.shuffle(items)
        top = [w for w, _ in Counter(items).most_common(len(common) + 1)]
        assert top[: len(common)] == common, "common words must be the most frequent, in order"
        lines = [" ".join(f"{w} ," for w in items[i : i + 10]) for i in range(0, len(items), 10)]
        return (["."] if n % 2 else []) + lines  # an odd token left over becomes a lone full stop

    return TaskText(_message(tokenizer, n_tokens, intro, question, [], haystack), " ".join(common), "")


TASKS = {
    "single_needle": single_needle,
    "multi_key": multi_key,
    "multi_value": multi_value,
    "kv_retrieval": kv_retrieval,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}
