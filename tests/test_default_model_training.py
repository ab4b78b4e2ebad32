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


def test_first_hops_read_each_record_key_and_the_question_key(tokenizer):
    """The first block's attention targets: a record value reads its key two back, a masked answer slot
    reads the question's key, and that key's record in the prompt holds the slot's answer."""
    from benchmarks.default_model.batches import make_batch

    n = 256
    tasks = ["single_needle", "multi_key", "multi_value", "kv_retrieval"]
    batch = make_batch(random.Random(4), tokenizer, tasks, n, 16, tokenizer.mask_token_id, tokenizer.eos_token_id)
    rows, src, dst = (t.tolist() for t in batch.route)
    words = [tokenizer.convert_ids_to_tokens(r) for r in batch.targets.tolist()]
    records = {(b, p) for b in range(len(words)) for p in range(2, n) if words[b][p - 1] in ("is", ":")}
    records = {(b, p) for b, p in records if words[b][p - 3] in ("for", "{", ",")}  # `for K is V`, `, K : V`
    slots = set()
    for b, s, d in zip(rows, src, dst):
        if s < n:
            assert d == s - 2 and (b, s) in records, (words[b][s - 3 : s + 1], batch.tasks[b])
        else:
            slots.add((b, s))
            assert batch.masked[b, s] and batch.answer_slot[b, s] and d == batch.query_pos[b]
            answer, key = batch.targets[b, s].item(), batch.targets[b, d].item()
            holders = [p for p in range(2, n) if batch.targets[b, p] == answer and batch.targets[b, p - 2] == key]
            assert holders, (batch.tasks[b], words[b][d])
    assert {(b, s) for b, s, _ in zip(rows, src, dst) if s < n} == records  # every record, nothing else
    want = (batch.masked & batch.answer_slot & (batch.query_pos >= 0)[:, None]).nonzero().tolist()
    assert slots == {tuple(x) for x in want} and len(slots) > 4


def test_route_loss_is_the_first_blocks_attention_on_its_targets(tokenizer, monkeypatch):
    """route_loss recomputes block 0's attention; it must be the attention the forward pass uses."""
    import torch
    import torch.nn.functional as F

    from benchmarks.default_model.batches import make_batch
    from benchmarks.default_model.model import LLaDA, ModelConfig
    from benchmarks.train_default_model import route_loss

    torch.manual_seed(0)
    n = len(tokenizer)
    model = LLaDA(ModelConfig(vocab_size=n, embedding_size=n, n_layers=2, n_heads=4, n_kv_heads=2))
    for p in model.parameters():  # sharper than the init, so that the attention is far from uniform
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    batch = make_batch(random.Random(1), tokenizer, ["multi_key"], 96, 3, tokenizer.mask_token_id, 0)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(batch.ids)
        got = route_loss(model, batch)
    rows, src, dst = batch.route
    want = -seen[0][rows, :, src, dst].mean(-1).log().mean()
    assert torch.allclose(got, want, rtol=1e-4), (got, want)


def test_chain_targets_follow_variable_tracking_one_link_at_a_time(tokenizer):
    """variable_tracking's targets: each assigned variable reads what it is assigned (`var L = R`, two
    ahead); the first answer slot reads the question's value, later slots the slot before; the last
    block reads, at a slot, the variable assigned from that slot's query, only when that query is known
    (the question's value, or an unmasked answer before it)."""
    from benchmarks.default_model.batches import make_batch

    n = 192
    batch = make_batch(
        random.Random(7), tokenizer, ["variable_tracking"], n, 24, tokenizer.mask_token_id, tokenizer.eos_token_id
    )
    words = [tokenizer.convert_ids_to_tokens(r) for r in batch.targets.tolist()]
    masked = batch.masked & batch.answer_slot
    rows, src, dst = (t.tolist() for t in batch.route)
    links = {(b, p) for b in range(len(words)) for p in range(1, n - 2) if words[b][p - 1] == "var"}
    assert {(b, s) for b, s, _ in zip(rows, src, dst) if s < n} == links and len(links) == 4 * len(words)
    for b, s, d in zip(rows, src, dst):
        if s < n:
            assert words[b][s + 1] == "=" and d == s + 2
        else:
            assert masked[b, s] and d == (batch.query_pos[b] if s == n else s - 1)
    probed = {(b, c) for b, c in zip(batch.probe_rows.tolist(), batch.probe_cols.tolist())}
    for b, c in masked.nonzero().tolist():
        if c - n >= 4:  # EOS padding
            continue
        query = batch.targets[b, batch.query_pos[b] if c == n else c - 1].item()
        known = c == n or not masked[b, c - 1]
        assert ((b, c) in probed) == known
        if known:
            i = sorted(probed).index((b, c))
            target = batch.probe_targets[i].nonzero().squeeze(1).tolist()
            assert len(target) == 1 and words[b][target[0] - 1] == "var"  # the assigned variable itself
            assert batch.targets[b, target[0] + 2].item() == query
            assert batch.targets[b, target[0]] == batch.targets[b, c]
    assert len(probed) > 10


def test_model_card_of_a_second_stage_lists_both_commands_chained(tmp_path):
    """A run started --init-from another checkpoint: the card gives the first run's command, then the
    second's starting from the first's output, and the total training time of both."""
    first = parse_args(["--steps", "13000"])
    second = parse_args(["--init-from", "/tmp/somewhere", "--steps", "4000", "--lr", "5e-4"])
    base = {"params": 520000, "eval_seconds": 6, "accuracy": {"multi_key@1024": 0.9, "multi_key@2048": 0.95}}
    summary = base | {"args": vars(second), "train_seconds": 600, "steps_done": 4000}
    summary["init_summary"] = base | {"args": vars(first), "train_seconds": 3000, "steps_done": 13000}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    cfg = {"d_model": 128, "n_layers": 2, "n_heads": 2, "mlp_hidden_size": 384, "vocab_size": 723}
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"max_sequence_length": 8192}))
    card = write_model_card(tmp_path).read_text()
    lines = [x.split("benchmarks.train_default_model", 1)[1] for x in card.splitlines() if "train_default_model" in x]
    assert len(lines) == 2 and "60 minutes of training in 2 stages" in card and "13,000 + 4,000 steps" in card
    one, two = (parse_args(shlex.split(x)) for x in lines)
    assert vars(one) | {"out": None} == vars(first) | {"out": None}
    assert two.init_from == one.out and vars(two) | {"out": None, "init_from": None} == vars(second) | {
        "out": None,
        "init_from": None,
    }


@pytest.mark.parametrize(
    ("until", "phrase"), [("0.7", "annealed to zero at 70%."), ("2.0", "falling linearly to 0.5 at the end.")]
)
def test_later_stage_line_says_where_the_targets_end(until, phrase):
    """A target ramp longer than the stage (--probe-until > 1) is cut at the stage's end: the card says
    the weight left there, not a percentage past 100."""
    from benchmarks.default_model.package import later_stage

    args = vars(parse_args(["--init-from", "x", "--probe-until", until, "--route-until", until]))
    assert later_stage(2, args, 12500).endswith("the attention targets again, " + phrase)


def test_recipe_stages_chain_and_parse():
    """Each stage of the shipped recipe parses, writes its own directory and starts from the one before."""
    from benchmarks.default_model.recipe import STAGES, stage_argv

    parsed = [parse_args(stage_argv(i, "out/m", "cpu")) for i in range(len(STAGES))]
    assert parsed[0].init_from is None and parsed[-1].out == "out/m"
    for before, after in zip(parsed, parsed[1:]):
        assert after.init_from == before.out != after.out


@pytest.mark.parametrize("stage", ["0", "4"])
def test_recipe_rejects_a_stage_it_does_not_have(stage, capsys):
    from benchmarks.default_model.recipe import main

    with pytest.raises(SystemExit):
        main(["--from-stage", stage])
    assert "--from-stage: invalid choice" in capsys.readouterr().err


def test_recipe_is_what_trained_the_shipped_model():
    """The shipped model's train_summary.json records every stage's arguments: the recipe must give
    the same ones (only where the output goes, the overrun guard and the evaluation may differ)."""
    from pathlib import Path

    from benchmarks.default_model.package import stages
    from benchmarks.default_model.recipe import STAGES, stage_argv

    asset = Path(__file__).parent.parent / "maskkv_engine/assets/default_model/train_summary.json"
    runs = stages(json.loads(asset.read_text()))
    free = {"out", "init_from", "minutes", "eval_n", "eval_lengths", "device"}
    assert len(runs) == len(STAGES)
    for i, run in enumerate(runs):
        want = {k: v for k, v in vars(parse_args(stage_argv(i, "x", "cpu"))).items() if k not in free}
        assert {k: v for k, v in run["args"].items() if k not in free} == want, f"stage {i + 1}"
