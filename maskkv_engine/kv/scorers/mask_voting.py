"""Mask-Voting (MaskKV, arXiv 2510.09309 §3.3): the [MASK] queries vote for the prompt keys.

At the first denoising step the response is all [MASK]; what those queries attend to is what the
response will need. A = softmax(Q_mask K^T / sqrt(d)) over all keys (prompt and response); a prompt
token's score is the sum of its votes over the mask queries, averaged over the query heads of its KV
group (GQA), so one choice serves the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.types import PolicyContext


@dataclass
class MaskVotingScorer(Scorer):
    name = "mask_voting"

    def score(self, probs: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        return probs[:, :, : ctx.n_cached].sum(dim=1).mean(dim=0)
