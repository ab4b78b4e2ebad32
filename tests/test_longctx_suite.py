"""The synthetic long-context suite: exact lengths, determinism, answers that the context really holds."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.longctx import TASKS, build_tokenizer, generate_sample, generate_suite


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_prompt_has_the_exact_length_and_ends_with_the_assistant_turn(tokenizer, task, length):
    s = generate_sample(task, length, 0.3, seed=1, tokenizer=tokenizer)
    assert s.length == len(s.prompt_token_ids) == length
    assert s.prompt.rstrip().endswith("<|assistant|>")
    assert tokenizer.unk_token_id not in s.prompt_token_ids
    assert s.answer_token_ids and tokenizer.decode(s.answer_token_ids) == s.answer


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(tokenizer, task):
    a = generate_sample(task, 512, 0.5, seed=3, tokenizer=tokenizer)
    assert generate_sample(task, 512, 0.5, seed=3, tokenizer=tokenizer) == a
    assert generate_sample(task, 512, 0.5, seed=4, tokenizer=tokenizer).prompt != a.prompt


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_single_needle_holds_its_answer_once_at_its_depth(tokenizer, depth):
    s = generate_sample("single_needle", 2048, depth, seed=5, tokenizer=tokenizer)
    needle = f"the magic number for {s.key} is {s.answer} ."
    lines = s.prompt.split("\n")
    where = [i for i, line in enumerate(lines) if needle in line]
    assert len(where) == 1 and s.prompt.count(f"for {s.key} ") == 2  # the needle and the question
    assert abs(where[0] / (len(lines) - 1) - depth) < 0.1


def test_multi_key_distractors_never_use_the_asked_key(tokenizer):
    s = generate_sample("multi_key", 1024, 0.4, seed=2, tokenizer=tokenizer)
    lines = [line for line in s.prompt.split("\n") if line.startswith("the magic number for ")]
    assert len(lines) > 20 and sum(f" for {s.key} is " in line for line in lines) == 1


def test_variable_tracking_answer_follows_the_chain(tokenizer):
    s = generate_sample("variable_tracking", 1024, 0.6, seed=8, tokenizer=tokenizer)
    value = s.key
    equal = {}
    for line in s.prompt.split("\n"):
        if line.startswith("var "):
            _, name, _, rhs, _ = line.split()
            equal[name] = rhs
    resolved = []
    for name, rhs in equal.items():
        while rhs in equal:
            rhs = equal[rhs]
        if rhs == value:
            resolved.append(name)
    assert resolved == s.answer.split()


def test_common_words_are_the_three_most_frequent(tokenizer):
    s = generate_sample("common_words", 2048, 0.0, seed=9, tokenizer=tokenizer)
    body = s.prompt.split("\n")[1:-1]
    counts = Counter(w for line in body for w in line.split() if w not in {",", "."})
    assert [w for w, _ in counts.most_common(3)] == s.answer.split()


def test_suite_spreads_depths_and_rejects_bad_input(tokenizer):
    suite = generate_suite(["single_needle"], [256, 512], 5, seed=0, tokenizer=tokenizer)
    assert [s.depth for s in suite[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0] and {s.length for s in suite} == {256, 512}
    with pytest.raises(ValueError, match="task='needle'"):
        generate_sample("needle", 256, 0.5, 0, tokenizer)
    with pytest.raises(ValueError, match="prompt_tokens=10"):
        generate_sample("single_needle", 10, 0.5, 0, tokenizer)
    with pytest.raises(ValueError, match=r"depth=1.5 must be in \[0, 1\]"):
        generate_sample("single_needle", 256, 1.5, 0, tokenizer)


def test_a_generation_is_scored_up_to_its_first_stop_token(tokenizer):
    s = generate_sample("single_needle", 256, 0.5, seed=1, tokenizer=tokenizer)
    answer, stop = s.answer_token_ids, (tokenizer.eos_token_id,)
    assert s.gen_length == len(answer) + 3
    assert s.is_answered_by(answer + [stop[0], 7, 7], stop) and s.is_answered_by(answer, stop)
    assert not s.is_answered_by(answer + [answer[0], stop[0]], stop)
    assert not s.is_answered_by([stop[0], *answer], stop)
