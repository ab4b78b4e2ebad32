"""Train a small LLaDA on the synthetic long-context suite, on a CPU or a GPU: one stage of the default model.

    python -m benchmarks.train_default_model --out benchmarks/out/default_model [--device cuda]
    python -m benchmarks.default_model.recipe          # the shipped model: this trainer's stages in turn

The defaults are the first stage; `--init-from DIR` starts a later stage from a checkpoint (the recipe's
stages 2-3 add variable_tracking and train at 1k-2k tokens). First stage (measured on a 2-core CPU,
issue 20; curves in benchmarks/default_model/curves/): d_model 128, 2 layers, 2 heads, tied embeddings,
the suite's word-level tokenizer (disjoint id ranges for filler, keys, values, ids), LLaDA's SFT loss on
the response only, bidirectional attention throughout, 2k tokens per batch, AdamW (betas 0.9/0.95, warmup,
cosine) and a length curriculum that reaches the target length early while half the batches stay
shorter. Two things made the key-matching tasks learnable:
- scale: a unit-scale embedding (--embed-std 1), lr 1e-3 and weight decay 0.1. With N(0, 0.02) embeddings
  and lr 3e-3 the blocks' outputs grew to ~1000x a token's embedding, so a later layer could no longer read
  which value a record holds (its identity was drowned), even where its attention was right;
- attention targets for the circuit (--route-weight, --probe-weight, annealed to zero): the first block
  reads each record's key from its value and the question's key from the masked answer slot; head 0 of the
  last block reads, from the answer slot, the value of the record whose key was asked. Without them the
  answer slot stayed at picking a random value (1/records), with them alone (old scale) the attention was
  right but the answer was not copied. variable_tracking gets the same kind of targets (batches.py): in
  `var L = R` the first block reads R at L, answer slots after the first read the slot before, and the last
  block reads the variable assigned from the slot's query, so the chain is decoded one link per step.
Other options are earlier attempts, kept so their curves can be reproduced (all off by default): hop
hints through the LM head (--hint-weight), a key-position answer loss (--aux-weight), dense key-recall
batches (--dense-*, default_model/dense.py) and causal-then-bidirectional schedules (--causal-*).
The schedule is by steps (reproducible with the seed); --minutes only stops a run that overruns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from collections import defaultdict, deque
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.default_model.batches import make_batch
from benchmarks.default_model.dense import DenseRecall
from benchmarks.default_model.evaluate import format_table, summary_accuracy
from benchmarks.default_model.model import (
    LLaDA,
    ModelConfig,
    apply_rope,
    load_checkpoint,
    rope_cos_sin,
    save_checkpoint,
)
from benchmarks.default_model.package import write_model_card, write_profile
from benchmarks.longctx import build_tokenizer

EVAL_LENGTHS = [256, 512, 1024, 2048]
SHORT = {
    "single_needle": "sn",
    "multi_key": "mk",
    "multi_value": "mv",
    "kv_retrieval": "kv",
    "variable_tracking": "vt",
    "common_words": "cw",
    "dense": "dense",
    "dense_chance": "chance",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/default_model", help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint directory (its shape wins over --d-model etc.): a second stage",
    )
    p.add_argument("--steps", type=int, default=13000)
    p.add_argument("--minutes", type=float, default=150.0, help="stop (and still save) past this wall time")
    p.add_argument(
        "--task-curriculum",
        default="0:multi_key+multi_key+multi_key+single_needle,0.2:single_needle+multi_key+multi_key+multi_value+multi_value",
        help="fraction:task+task stages (the first stage forms the key-match circuit at short length)",
    )
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
    p.add_argument("--embed-std", type=float, default=1.0, help="init std of the (tied) embedding")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument(
        "--curriculum",
        default="0:128,0.2:256,0.32:512,0.5:1024,0.68:2048",
        help="fraction:max_prompt_tokens stages; half the batches use the stage's top length range",
    )
    p.add_argument("--extras-from", type=float, default=0.0, help="fraction of steps where the extra losses start")
    p.add_argument("--aux-weight", type=float, default=0.0, help="weight of the key-position answer loss")
    p.add_argument("--aux-until", type=float, default=0.55, help="fraction of steps where aux reaches 0")
    p.add_argument("--hint-weight", type=float, default=0.0, help="weight of the early-layer hop hints")
    p.add_argument("--hint-until", type=float, default=0.45, help="fraction of steps where hints reach 0")
    p.add_argument("--probe-weight", type=float, default=1.0, help="weight of the last-layer attention target")
    p.add_argument(
        "--probe-until", type=float, default=0.9, help="fraction of steps where it reaches 0 (> 1: still on at the end)"
    )
    p.add_argument("--route-weight", type=float, default=1.0, help="weight of the first block's attention hops")
    p.add_argument(
        "--route-until", type=float, default=0.9, help="fraction of steps where it reaches 0 (> 1: still on at the end)"
    )
    p.add_argument("--aux-causal", action="store_true", help="compute the aux loss in a causal forward pass")
    p.add_argument(
        "--causal-until",
        type=float,
        default=0.0,
        help="fraction of steps trained with causal attention (the key-match circuit forms there)",
    )
    p.add_argument(
        "--causal-off",
        type=float,
        default=None,
        help="fraction where no batch is causal any more (the causal share falls linearly from --causal-until)",
    )
    p.add_argument(
        "--causal-dense-only",
        action="store_true",
        help="only dense batches are causal (the suite's batches stay bidirectional throughout)",
    )
    p.add_argument("--dense-share", type=float, default=0.0, help="share of batches of dense key recall")
    p.add_argument("--dense-until", type=float, default=1.0, help="fraction of steps after which no batch is dense")
    p.add_argument(
        "--dense-pool", type=int, default=16, help="most keys per dense sample (drawn from 2; at most length / 8)"
    )
    p.add_argument("--dense-ask", type=float, default=0.0, help="share of dense lines that are the suite's question")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=50, help="samples per (task, length) in the final eval")
    p.add_argument("--eval-lengths", default=",".join(map(str, EVAL_LENGTHS)))
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when there is one)")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core CPU a 2nd thread was 7x slower")
    return p.parse_args(argv)


def to_device(batch, device: torch.device):
    """The batch with every tensor (and tuple of tensors) field on `device` (batches are built on the CPU)."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, tuple) and v and all(isinstance(x, torch.Tensor) for x in v):
            return tuple(x.to(device, non_blocking=True) for x in v)
        return v

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def ramp_down(frac: float, start: float, end: float) -> float:
    """0 before `start`, then 1 falling linearly to 0 at `end`."""
    if frac < start or end <= start:
        return 0.0
    return max(0.0, 1.0 - (frac - start) / (end - start))


def length_at(rng: random.Random, frac: float, stages: list[tuple[float, int]]) -> int:
    """Half the batches at the stage's top range (its max / 2 .. max), half anywhere from 64."""
    top = max(n for f, n in stages if f <= frac)
    if rng.random() < 0.5:
        return rng.randint(max(64, top // 2), top)
    return rng.randint(64, top)


def probe_loss(model: LLaDA, batch, hidden: torch.Tensor) -> torch.Tensor:
    """-log(attention mass) that head 0 of the last block puts, from each masked answer slot, on the
    prompt positions holding that slot's answer in a record of the asked key."""
    block = model.model.transformer["blocks"][-1]
    hd = model.cfg.head_dim
    h = block.attn_norm(hidden)
    rows, cols = batch.probe_rows, batch.probe_cols
    cos, sin = rope_cos_sin(torch.arange(h.shape[1], device=h.device), hd, model.cfg.rope_theta)
    q = apply_rope(block.q_proj(h[rows, cols])[:, None, None, :hd], cos[cols][:, None, None], sin[cols][:, None, None])
    k = apply_rope(block.k_proj(h[rows])[:, None, :, :hd], cos, sin)  # [N, 1, T, hd]
    logp = torch.log_softmax((q @ k.transpose(-1, -2)).squeeze(1).squeeze(1) / math.sqrt(hd), dim=-1)
    return -torch.logsumexp(logp.masked_fill(~batch.probe_targets, -float("inf")), dim=-1).mean()


def route_loss(model: LLaDA, batch) -> torch.Tensor:
    """-log(attention mass, averaged over heads) that the first block puts on each hop of
    `batch.route`: record value -> its key, masked answer slot -> the question's key. The hint loss
    asks for the same moves through the LM head; this asks the attention itself."""
    rows, src, dst = batch.route
    block = model.model.transformer["blocks"][0]
    c = model.cfg
    h = block.attn_norm(model.model.transformer["wte"](batch.ids))
    cos, sin = rope_cos_sin(torch.arange(h.shape[1], device=h.device), c.head_dim, c.rope_theta)
    q, k = block.queries_keys(h, cos, sin)
    logp = torch.log_softmax(q @ k.transpose(-1, -2) / math.sqrt(c.head_dim), dim=-1)  # [B, H, T, T]
    picked = logp.permute(0, 2, 3, 1)[rows, src, dst]  # [N, H]
    return -(torch.logsumexp(picked, dim=-1) - math.log(c.n_heads)).mean()


def causal_share(frac: float, until: float, off: float | None) -> float:
    """Share of batches trained with causal attention: 1 before `until`, then linearly 0 at `off`."""
    off = until if off is None else off
    if frac < until:
        return 1.0
    if frac >= off:
        return 0.0
    return 1.0 - (frac - until) / (off - until)


def loss_fn(
    model: LLaDA,
    batch,
    aux_weight: float,
    aux_causal: bool = False,
    hint_weight: float = 0.0,
    probe_weight=0.0,
    causal: bool = False,
    route_weight: float = 0.0,
):
    n_layers = model.cfg.n_layers
    logits, hidden = model(batch.ids, causal=causal, hidden_after=0)
    hint = torch.zeros((), device=logits.device)
    hinted = batch.hint_target >= 0
    if hint_weight > 0 and hinted.any():
        hint = F.cross_entropy(model.lm_head(hidden[hinted]), batch.hint_target[hinted])
        loss_hint = hint_weight * hint
    else:
        loss_hint = 0.0
    probe = torch.zeros((), device=logits.device)
    if probe_weight > 0 and len(batch.probe_rows):
        _, before_last = model(batch.ids, hidden_after=n_layers - 2) if n_layers > 2 else (None, hidden)
        probe = probe_loss(model, batch, before_last)
        loss_hint = loss_hint + probe_weight * probe
    route = torch.zeros((), device=logits.device)
    if route_weight > 0 and len(batch.route[0]):
        route = route_loss(model, batch)
        loss_hint = loss_hint + route_weight * route
    ce = F.cross_entropy(logits[batch.masked], batch.targets[batch.masked], reduction="none")
    p = batch.p_mask[:, None].expand_as(batch.masked)[batch.masked]
    loss = (ce / p).sum() / (batch.ids.shape[0] * batch.response_len)
    aux = torch.zeros((), device=logits.device)
    has_q = batch.query_pos >= 0
    if has_q.any():
        n = batch.ids.shape[1] - batch.response_len  # prompt length
        rows = has_q.nonzero().squeeze(1)
        aux_logits = (
            model(batch.ids[rows], causal=True) if aux_causal and aux_weight > 0 and not causal else logits[rows]
        )
        aux = F.cross_entropy(
            aux_logits[torch.arange(len(rows), device=rows.device), batch.query_pos[rows]], batch.targets[rows, n]
        )
    if aux_weight > 0:
        loss = loss + aux_weight * aux
    loss = loss + loss_hint
    with torch.no_grad():
        pred = logits.argmax(-1)
        slot_ok = ((pred == batch.targets) & batch.masked & batch.answer_slot).sum(1)
        slot_n = (batch.masked & batch.answer_slot).sum(1)
    return loss, aux.detach(), hint.detach(), probe.detach(), route.detach(), slot_ok, slot_n


def dense_loss(model: LLaDA, batch, causal: bool):
    """Cross-entropy on the labelled masked values of a dense key-recall batch, and per-sample hits."""
    logits = model(batch.ids, causal=causal)
    lab = batch.labelled
    if not lab.any():
        return logits.sum() * 0.0, lab.sum(1), lab.sum(1)
    loss = F.cross_entropy(logits[lab], batch.targets[lab])
    with torch.no_grad():
        ok = ((logits.argmax(-1) == batch.targets) & lab).sum(1)
    return loss, ok, lab.sum(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust thread pool only contends here
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    mask_id, eos_id = tokenizer.mask_token_id, tokenizer.eos_token_id
    cfg = ModelConfig(
        vocab_size=len(tokenizer),
        embedding_size=64 * math.ceil(len(tokenizer) / 64),
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_heads,
        mlp_hidden_size=args.mlp,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.init_from:
        model = load_checkpoint(args.init_from).train()
        cfg = model.cfg
    else:
        model = LLaDA(cfg)
        if args.embed_std != 0.02:  # the model's own init draws N(0, 0.02): redraw only when it differs
            torch.nn.init.normal_(model.model.transformer["wte"].weight, std=args.embed_std)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    print(
        f"params {n_params / 1e6:.2f}M, vocab {cfg.vocab_size} (embedding {cfg.embedding_size}), on {device}",
        flush=True,
    )
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]  # norms: no decay
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    task_stages = [(float(f), t.split("+")) for f, t in (s.split(":") for s in args.task_curriculum.split(","))]
    all_tasks = list(dict.fromkeys(t for _, ts in task_stages for t in ts)) + ["dense", "dense_chance"] * (
        args.dense_share > 0
    )
    recall = DenseRecall(tokenizer, mask_id)
    stages = [(float(f), int(n)) for f, n in (s.split(":") for s in args.curriculum.split(","))]

    start = time.time()
    window: dict[tuple, deque] = defaultdict(lambda: deque(maxlen=1000))
    losses: deque = deque(maxlen=args.log_every)
    curve: list[dict] = []  # slot accuracy per task (bidirectional / causal batches) vs steps
    step = 0
    model.train()
    for step in range(args.steps):
        frac = step / args.steps
        length = length_at(rng, frac, stages)
        tasks = [ts for f, ts in task_stages if f <= frac][-1]
        aux_w = args.aux_weight * ramp_down(frac, args.extras_from, args.aux_until)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        hint_w = args.hint_weight * ramp_down(frac, args.extras_from, args.hint_until)
        probe_w = args.probe_weight * ramp_down(frac, args.extras_from, args.probe_until)
        route_w = args.route_weight * ramp_down(frac, args.extras_from, args.route_until)
        # draws only when an option is on, so that runs without them keep the seed's old batches
        causal = args.causal_until > 0 and rng.random() < causal_share(frac, args.causal_until, args.causal_off)
        dense_now = args.dense_share > 0 and frac < args.dense_until and rng.random() < args.dense_share
        causal = causal and (dense_now or not args.causal_dense_only)
        if dense_now:
            dense = recall.batch(
                rng,
                length,
                max(1, args.batch_tokens // length),
                min(args.dense_pool, max(4, length // 8)),
                causal,
                ask=args.dense_ask,
            )
            dense = to_device(dense, device)
            loss, slot_ok, slot_n = dense_loss(model, dense, causal)
            aux = hint = probe = route = torch.zeros(())
            batch_tasks = ["dense"] * len(slot_ok)
            chance = (slot_n.float() / dense.pool.float()).round().long()  # hits of a 1/pool guesser
            for n_chance, n in zip(chance.tolist(), slot_n.tolist()):
                if n:
                    window[("dense_chance", causal)].append((n_chance, n))
        else:
            batch = make_batch(rng, tokenizer, tasks, length, max(1, args.batch_tokens // length), mask_id, eos_id)
            batch = to_device(batch, device)
            loss, aux, hint, probe, route, slot_ok, slot_n = loss_fn(
                model, batch, aux_w, args.aux_causal, hint_w, probe_w, causal, route_w
            )
            batch_tasks = batch.tasks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append((loss.item(), aux.item(), hint.item(), probe.item(), route.item()))
        for task, ok, n in zip(batch_tasks, slot_ok.tolist(), slot_n.tolist()):
            if n:
                window[(task, causal)].append((ok, n))
        elapsed = time.time() - start
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            l_avg, a_avg, h_avg, p_avg, r_avg = (sum(v) / len(losses) for v in zip(*losses))
            slot_acc = {
                f"{t}{'~causal' if c else ''}": round(sum(o for o, _ in w) / sum(n for _, n in w), 4)
                for t in all_tasks
                for c in (False, True)
                if (w := window[(t, c)])
            }
            accs = " ".join(
                f"{SHORT.get(t.split('~')[0])}{'~c' if '~' in t else ''}={a:.2f}" for t, a in slot_acc.items()
            )
            top = max(n for f, n in stages if f <= frac)
            share = causal_share(frac, args.causal_until, args.causal_off)
            print(
                f"step {step + 1} {elapsed:.0f}s len<={top} causal {share:.2f} "
                f"loss {l_avg:.3f} aux {a_avg:.3f} (w {aux_w:.2f}) hint {h_avg:.3f} (w {hint_w:.2f}) probe {p_avg:.2f} route {r_avg:.2f} slot-acc {accs}",
                flush=True,
            )
            curve.append(
                {
                    "step": step + 1,
                    "seconds": round(elapsed),
                    "max_len": top,
                    "causal_share": round(share, 3),
                    "loss": round(l_avg, 4),
                    "slot_acc": slot_acc,
                }
            )
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "curve.json").write_text(
                json.dumps({"args": vars(args), "curve": curve}, indent=1) + "\n"
            )
        if (step + 1) % 1000 == 0:  # a checkpoint to resume from by hand if the run is killed
            save_checkpoint(model, Path(args.out) / "partial")
        if elapsed > args.minutes * 60:
            print(f"stopping at step {step + 1}: past --minutes {args.minutes}", flush=True)
            break
    train_s = time.time() - start

    out = Path(args.out)
    save_checkpoint(model, out)
    tokenizer_dir = out
    from benchmarks.longctx import save_tokenizer

    save_tokenizer(tokenizer_dir)
    lengths = [int(n) for n in args.eval_lengths.split(",")]
    t0 = time.time()
    acc = summary_accuracy(model, tokenizer, args.eval_n, lengths)
    print(format_table(acc, lengths), flush=True)
    summary = {
        "args": vars(args),
        "steps_done": step + 1,
        "train_seconds": round(train_s),
        "eval_seconds": round(time.time() - t0),
        "params": n_params,
        "device": "a GPU" if device.type == "cuda" else "the CPU",
        "accuracy": {f"{t}@{n}": a for (t, n), a in acc.items()},
    }
    before = Path(args.init_from or "") / "train_summary.json"
    if args.init_from and before.exists():  # the model card lists every stage's command
        summary["init_summary"] = json.loads(before.read_text())
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_profile(out)
    write_model_card(out)
    print(f"wrote {out} (train {train_s:.0f}s, total {time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
