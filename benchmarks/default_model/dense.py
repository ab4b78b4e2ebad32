"""Dense key-recall batches in the suite's own record format, for forming the key-match circuit.

A suite prompt asks one question, so a batch of 32 prompts gives 32 answer labels: too sparse for a
small model to find the key-match circuit (../shared TRAINING_NOTES). Here every sample is a haystack
of needles `the magic number for K is V .` (and noise lines) where each key of a small per-sample
pool keeps one value, so a key seen again predicts its value: every repeated needle is a label.
A share of the repeated values is masked; each masked value whose key shows the value unmasked
elsewhere (before it, with causal attention; anywhere, with bidirectional) is a target at its own
position (LLaDA's layout). Ids are built directly (no text round trip), so batches cost nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from benchmarks.longctx.vocabulary import ASSISTANT, END_OF_TURN, EOS, FILLER_WORDS, KEY_WORDS, VALUE_WORDS


@dataclass
class DenseBatch:
    ids: torch.Tensor  # [B, T] with masked values replaced by the mask id
    targets: torch.Tensor  # [B, T] the clean tokens
    labelled: torch.Tensor  # [B, T] bool, the masked values to predict
    pool: torch.Tensor  # [B] keys per sample (chance is about 1 / pool)


class DenseRecall:
    """Word ids of the needle template, resolved once per tokenizer."""

    def __init__(self, tokenizer, mask_id: int):
        ids = tokenizer.convert_tokens_to_ids
        self.prefix = ids(["the", "magic", "number", "for"])
        self.is_, self.stop = ids("is"), ids(".")
        self.keys = ids(list(KEY_WORDS))
        self.values = ids(list(VALUE_WORDS))
        self.filler = ids(list(FILLER_WORDS))
        self.question = ids(["question", ":", "what", "is", *["the", "magic", "number", "for"]])
        self.ask_end = ids(["?", END_OF_TURN, ASSISTANT])  # the prompt's end: the answer follows
        self.eos = ids(EOS)
        self.mask_id = mask_id

    def sample(self, rng: random.Random, length: int, max_pool: int, noise: float, ask: float = 0.0):
        """(tokens, [(value position, key index, is a question)], pool size) of one haystack.

        With probability `ask` a line is the suite's question about a key already shown, followed by
        the chat prompt's end and the answer (always masked): the exact query-to-answer layout."""
        n_pool = rng.randint(2, max_pool)
        keys = rng.sample(self.keys, n_pool)
        values = [rng.choice(self.values) for _ in keys]
        toks: list[int] = []
        val_pos: list[tuple[int, int]] = []
        while len(toks) < length:
            if rng.random() < noise:
                toks += rng.choices(self.filler, k=rng.randint(5, 12)) + [self.stop]
                continue
            i = rng.randrange(n_pool)
            if val_pos and rng.random() < ask:
                toks += [*self.question, keys[i], *self.ask_end]
                val_pos.append((len(toks), i, True))
                toks += [values[i], self.eos]
                continue
            toks += [*self.prefix, keys[i], self.is_]
            val_pos.append((len(toks), i, False))
            toks += [values[i], self.stop]
        return toks[:length], [v for v in val_pos if v[0] < length], n_pool

    def batch(
        self,
        rng: random.Random,
        length: int,
        batch_size: int,
        max_pool: int,
        causal: bool,
        noise: float = 0.3,
        ask: float = 0.0,
    ) -> DenseBatch:
        rows, labelled, pools = [], [], []
        masked_rows = []
        for _ in range(batch_size):
            toks, val_pos, n_pool = self.sample(rng, length, max_pool, noise, ask)
            share = rng.uniform(0.2, 0.8)
            masked = [q or rng.random() < share for _, _, q in val_pos]
            lab = [False] * length
            mrow = [False] * length
            for j, ((p, k, _), m) in enumerate(zip(val_pos, masked)):
                if not m:
                    continue
                mrow[p] = True
                lab[p] = any(
                    kk == k and not masked[o] and (o < j if causal else o != j) for o, (_, kk, _) in enumerate(val_pos)
                )
            rows.append(toks)
            labelled.append(lab)
            masked_rows.append(mrow)
            pools.append(n_pool)
        targets = torch.tensor(rows)
        masked_t = torch.tensor(masked_rows)
        ids = torch.where(masked_t, torch.full_like(targets, self.mask_id), targets)
        return DenseBatch(ids=ids, targets=targets, labelled=torch.tensor(labelled), pool=torch.tensor(pools))
