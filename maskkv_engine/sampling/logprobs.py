"""Per-token logprobs for a diffusion decoder: each token's log-probability at the step that committed it.

An autoregressive engine scores token t from the step that produced it; a diffusion decoder commits
tokens anywhere in the canvas, each at one step. The natural analogue is therefore, for every committed
position, the log_softmax of that step's logits at that position (before temperature, top-p or top-k,
as vLLM reports them), the committed token's rank there, and the step's top-k alternatives.
Recorded only for requests that ask (``SamplingParams.logprobs``); committed tokens never change, so
each position is recorded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CommittedLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the step's most likely token at this position
    top: list[tuple[int, float]]  # the step's top-k (token id, logprob) at this position


def committed_logprobs(request) -> dict[int, CommittedLogprob]:
    """The request's record, by absolute position (created on first use)."""
    record = getattr(request, "committed_logprobs", None)
    if record is None:
        record = {}
        request.committed_logprobs = record
    return record


def record_logprobs(request, positions: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor) -> None:
    """positions [C] just committed (absolute), tokens [C] committed there, logits [C, V] of this step at them."""
    k = request.params.logprobs
    if k is None or positions.numel() == 0:
        return
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    tokens = tokens.cpu().to(torch.long)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(dim=1) + 1
    k = min(k, logp.shape[-1])
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    record = committed_logprobs(request)
    for j, pos in enumerate(positions.cpu().tolist()):
        record[pos] = CommittedLogprob(
            int(tokens[j]),
            float(chosen[j]),
            int(ranks[j]),
            list(zip(top_i[j].tolist(), top_v[j].tolist())),
        )
