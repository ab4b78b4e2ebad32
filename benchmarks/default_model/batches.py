"""Training batches: prompts of one length, responses `answer + EOS...`, LLaDA's SFT masking.

LLaDA SFT: only the response is masked; each sample draws t ~ U(0, 1), masks each response token
with probability p = (1 - eps) t + eps, and the loss of a masked token is its cross-entropy / p,
summed and divided by the response length (EOS padding included), averaged over the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from benchmarks.longctx import generate_sample
from benchmarks.longctx.vocabulary import ID_WORDS, KEY_WORDS, VALUE_WORDS

MASK_EPS = 1e-3


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] with masked response tokens replaced by the mask id
    targets: torch.Tensor  # [B, T] the clean tokens
    masked: torch.Tensor  # [B, T] bool, masked response positions
    p_mask: torch.Tensor  # [B] the masking probability of each sample
    response_len: int
    answer_slot: torch.Tensor  # [B, T] bool, response positions holding answer tokens (not EOS)
    query_pos: torch.Tensor  # [B] position of the question's key in the prompt (-1: none)
    tasks: list[str]
    hint_target: torch.Tensor  # [B, T] token an early layer should hold at each position (-100: none)
    probe_rows: torch.Tensor  # [N] sample of each supervised answer slot
    probe_cols: torch.Tensor  # [N] its position
    probe_targets: torch.Tensor  # [N, T] bool, the prompt positions the last layer should read there
    route: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (sample, from, to): the first layer's hops


def make_batch(
    rng: random.Random,
    tokenizer,
    tasks: list[str],
    length: int,
    batch_size: int,
    mask_id: int,
    eos_id: int,
    extra_eos: tuple[int, int] = (4, 32),
) -> Batch:
    """`batch_size` samples of `length` prompt tokens; each task drawn from `tasks` uniformly.

    Responses are the answer then EOS up to a common length: 1 to extra_eos[0] EOS in 3 batches
    out of 4, 1 to extra_eos[1] in the others."""
    samples = [
        generate_sample(rng.choice(tasks), length, rng.random(), rng.getrandbits(48), tokenizer)
        for _ in range(batch_size)
    ]
    n_ans = max(len(s.answer_token_ids) for s in samples)
    # EOS padding: mostly a few (the eval's gen_length), sometimes many (a user's longer gen_length).
    response_len = n_ans + rng.randint(1, extra_eos[0] if rng.random() < 0.75 else extra_eos[1])
    rows, slots, query = [], [], []
    for s in samples:
        ans = s.answer_token_ids
        rows.append(s.prompt_token_ids + ans + [eos_id] * (response_len - len(ans)))
        slots.append([False] * length + [True] * len(ans) + [False] * (response_len - len(ans)))
        key_id = tokenizer.convert_tokens_to_ids(s.key) if s.key else None
        ids = s.prompt_token_ids
        query.append(max((i for i in range(len(ids)) if ids[i] == key_id), default=-1) if key_id is not None else -1)
    targets = torch.tensor(rows)
    t = torch.rand(batch_size, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
    p_mask = (1 - MASK_EPS) * t + MASK_EPS
    u = torch.rand(batch_size, response_len, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
    masked = torch.zeros_like(targets, dtype=torch.bool)
    masked[:, length:] = u < p_mask[:, None]
    ids = torch.where(masked, torch.full_like(targets, mask_id), targets)
    query = torch.tensor(query)
    slot_mask = masked & torch.tensor(slots)
    probe_rows, probe_cols, probe_targets = answer_sources(tokenizer, targets, length, slot_mask, query)
    return Batch(
        ids=ids,
        targets=targets,
        masked=masked,
        p_mask=p_mask,
        response_len=response_len,
        answer_slot=torch.tensor(slots),
        query_pos=query,
        tasks=[s.task for s in samples],
        hint_target=hop_hints(tokenizer, targets, length, slot_mask, query),
        probe_rows=probe_rows,
        probe_cols=probe_cols,
        probe_targets=probe_targets,
        route=first_hops(tokenizer, targets, length, slot_mask, query),
    )


_tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _lookup(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean tables over ids: record keys, record values, and the word between them (`is`, `:`)."""
    if id(tokenizer) not in _tables:
        n = len(tokenizer)

        def table(words):
            t = torch.zeros(n, dtype=torch.bool)
            t[tokenizer.convert_tokens_to_ids(list(words))] = True
            return t

        _tables[id(tokenizer)] = (
            table(KEY_WORDS + ID_WORDS),
            table(VALUE_WORDS + ID_WORDS),
            table(["is", ":"]),
        )
    return _tables[id(tokenizer)]


def record_values(tokenizer, prompt: torch.Tensor) -> torch.Tensor:
    """[B, L - 2] bool: whether prompt position j + 2 is the value of a record `K is V` / `K : V`."""
    is_key, is_val, is_sep = _lookup(tokenizer)
    return is_val[prompt[:, 2:]] & is_sep[prompt[:, 1:-1]] & is_key[prompt[:, :-2]]


def chain_links(tokenizer, prompt: torch.Tensor) -> torch.Tensor:
    """[B, L - 3] bool: whether prompt position j starts a variable assignment `var L = R`
    (L at j + 1, R at j + 3): variable tracking's records, read right to left."""
    var_id, eq_id = tokenizer.convert_tokens_to_ids(["var", "="])
    return (prompt[:, :-3] == var_id) & (prompt[:, 2:-1] == eq_id)


def hop_hints(tokenizer, tokens: torch.Tensor, length: int, slots: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Targets for an early layer: the key of each record at its value (`K is V`, `K : V`: two back),
    and the question's key at each masked answer slot. These are the two single-hop moves that a
    key-matching circuit needs before a later layer can match keys and copy the value."""
    hint = torch.full_like(tokens, -100)
    p = tokens[:, :length]
    hint[:, 2:length] = torch.where(record_values(tokenizer, p), p[:, :-2], hint[:, 2:length])
    rows = (query >= 0).nonzero().squeeze(1)
    key = torch.full((tokens.shape[0],), -100, dtype=tokens.dtype)
    key[rows] = tokens[rows, query[rows]]
    hint = torch.where(slots, key[:, None].expand_as(hint), hint)
    return hint


def first_hops(tokenizer, tokens: torch.Tensor, length: int, slots: torch.Tensor, query: torch.Tensor):
    """(sample, from, to) of the first block's single-position hops: each record value reads its key
    two back, each assigned variable reads what it is assigned two ahead (`var L = R`: L reads R),
    and each masked answer slot reads the question's key; in a prompt of assignments, answer slots
    after the first read the slot before instead (the chain's next link is found from it)."""
    rows, cols = record_values(tokenizer, tokens[:, :length]).nonzero(as_tuple=True)
    cols = cols + 2
    links = chain_links(tokenizer, tokens[:, :length])
    l_rows, l_cols = links.nonzero(as_tuple=True)
    l_cols = l_cols + 1
    s_rows, s_cols = (slots & (query >= 0)[:, None]).nonzero(as_tuple=True)
    chained = links.any(1)[s_rows] & (s_cols > length)
    s_dst = torch.where(chained, s_cols - 1, query[s_rows])
    return (
        torch.cat([rows, l_rows, s_rows]),
        torch.cat([cols, l_cols, s_cols]),
        torch.cat([cols - 2, l_cols + 2, s_dst]),
    )


def answer_sources(tokenizer, tokens: torch.Tensor, length: int, slots: torch.Tensor, query: torch.Tensor):
    """For each masked answer slot of a keyed sample, the prompt positions holding its answer where
    the last layer should attend to copy it: the value of a record of the asked key (`K is V`,
    `K : V`), or, in a prompt of assignments, the variable assigned from the slot's query (the
    question's value for the first slot, the answer before it for the others; those whose answer
    before is still masked are left out). Slots with no such source (common words) are left out."""
    rows, cols = slots.nonzero(as_tuple=True)
    keep = query[rows] >= 0
    rows, cols = rows[keep], cols[keep]
    if len(rows) == 0:
        return rows, cols, torch.zeros(0, tokens.shape[1], dtype=torch.bool)
    prompt = tokens[rows, :length]
    key = tokens[rows, query[rows]]
    answer = tokens[rows, cols]
    targets = torch.zeros(len(rows), tokens.shape[1], dtype=torch.bool)
    targets[:, 2:length] = (prompt[:, 2:] == answer[:, None]) & (prompt[:, :-2] == key[:, None])
    links = chain_links(tokenizer, prompt)
    chained = links.any(1)
    assigned = torch.zeros_like(targets)
    assigned[:, 1 : length - 2] = links & (prompt[:, 1:-2] == answer[:, None])
    known = (cols == length) | ~slots[rows, cols - 1]
    targets = torch.where(chained[:, None], assigned & known[:, None], targets)
    found = targets.any(1)
    return rows[found], cols[found], targets[found]
