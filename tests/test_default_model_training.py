"""The default model's training pieces that decide what it can learn: dense key-recall labels, the
causal-then-bidirectional schedule, and a model card whose reproduce command parses back."""

from __future__ import annotations

import json
import random
import shlex

import pytest

from benchmarks.default_model.dense import DenseRecall
from benchmarks.default_model.package import write_model_card
from benchmarks.longctx import build_tokenizer
from benchmarks.train_default_model import causal_share, parse_args


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _needles(tokenizer, row):
    """(value position, key id) of every `for K is V` / `for K ? <|eot|> <|assistant|> V` in a row."""
    for_id, is_id, ask_end = tokenizer.convert_tokens_to_ids(["for", "is", "<|assistant|>"])
    out = []
    for p in range(2, len(row)):
        if row[p - 1] == is_id and row[p - 3] == for_id:
            out.append((p, row[p - 2]))
        elif row[p - 1] == ask_end and p >= 4 and row[p - 5] == for_id:
            out.append((p, row[p - 4]))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_dense_labels_are_masked_values_recoverable_from_another_needle(tokenizer, causal):
    recall = DenseRecall(tokenizer, tokenizer.mask_token_id)
    batch = recall.batch(random.Random(3), 256, 8, 12, causal, ask=0.3)
    mask_id = tokenizer.mask_token_id
    n_labels = 0
    for ids, clean, lab in zip(batch.ids.tolist(), batch.targets.tolist(), batch.labelled.tolist()):
        needles = _needles(tokenizer, clean)
        for p, key in needles:
            others = [q for q, k in needles if k == key and q != p and (q < p or not causal)]
            visible = [q for q in others if ids[q] != mask_id]
            assert lab[p] == (ids[p] == mask_id and bool(visible)), (p, causal)
            if visible:  # a key keeps one value within a sample
                assert all(clean[q] == clean[p] for q in visible)
        assert all(not lab[p] or any(p == q for q, _ in needles) for p in range(len(lab)))
        n_labels += sum(lab)
    assert n_labels > 20


def test_dense_questions_are_always_masked(tokenizer):
    recall = DenseRecall(tokenizer, tokenizer.mask_token_id)
    batch = recall.batch(random.Random(0), 256, 8, 8, True, ask=0.5)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    after = batch.targets[:, :-1] == assistant
    assert after.any() and (batch.ids[:, 1:][after] == tokenizer.mask_token_id).all()


def test_causal_share_schedule():
    assert causal_share(0.2, 0.5, 0.75) == 1.0
    assert causal_share(0.625, 0.5, 0.75) == pytest.approx(0.5)
    assert causal_share(0.8, 0.5, 0.75) == 0.0
    assert causal_share(0.1, 0.0, None) == 0.0  # the default: bidirectional throughout


def test_model_card_reproduce_command_parses_back(tmp_path):
    args = parse_args(["--causal-dense-only", "--causal-until", "0.5", "--dense-share", "0.5", "--aux-causal"])
    summary = {"args": vars(args), "params": 520000, "train_seconds": 60, "eval_seconds": 6, "steps_done": 10}
    summary["accuracy"] = {"single_needle@1024": 1.0, "single_needle@2048": 0.95, "multi_key@1024": 0.3}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    cfg = {"d_model": 128, "n_layers": 2, "n_heads": 2, "mlp_hidden_size": 384, "vocab_size": 723}
    cfg["max_sequence_length"] = 8192
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    card = write_model_card(tmp_path).read_text()
    line = next(x for x in card.splitlines() if "benchmarks.train_default_model" in x)
    again = parse_args(shlex.split(line.split("benchmarks.train_default_model", 1)[1]))
    assert vars(again) | {"out": None} == vars(args) | {"out": None}
    assert "It answers single_needle" in card and "part of multi_key" in card
