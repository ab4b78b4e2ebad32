"""Commits tokens at masked positions from a step's logits: the remasking rule of each request.

One request at a time, on that request's own generator: a request's random draws, and so its tokens,
never depend on which other requests share the batch. What each request chose stays on the device until
``to_host`` reads the whole batch's choices in one copy: the one host sync of a step (on a GPU it waits
for the forward, so a sync per request would serialise the batch's host work behind it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.request import Request
from maskkv_engine.sampling.logprobs import record_logprobs
from maskkv_engine.sampling.registry import get_rule


@dataclass
class Choice:
    """One request's choice, on the logits' device: candidate indices in commit order, their tokens, and how
    many of them commit (a 0-d tensor when only the device knows it)."""

    order: torch.Tensor
    tokens: torch.Tensor
    count: int | torch.Tensor


class Sampler:
    """``num_real_tokens``: ids at or above it are padding rows of the embedding (no token of the tokenizer);
    they and the mask id can never be committed: a committed mask would leave its position masked forever
    (a request that never ends, or a dropped position), whatever the model outputs."""

    def __init__(self, mask_id: int, num_real_tokens: int):
        self.mask_id = mask_id
        self.num_real_tokens = num_real_tokens

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with the ids that may never be committed set to -inf."""
        logits = logits.clone()
        logits[:, self.num_real_tokens :] = float("-inf")
        logits[:, self.mask_id] = float("-inf")
        return logits

    def choose(self, request: Request, logits: torch.Tensor) -> Choice:
        """logits [C, V] at the request's candidates. The request's decoding rule chooses what commits;
        nothing is read to the host."""
        rule = get_rule(request.params.remasking)
        order, tokens, count = rule.ranked_commit(
            self.allowed(logits), request.params, request.state, request.logits_shift, request.generator
        )
        return Choice(order, tokens, count)

    @staticmethod
    def to_host(choices: list[Choice]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(chosen candidate indices, their tokens) of each choice, as host int64 tensors, in one copy."""
        if not choices:
            return []
        parts = [c.order.long() for c in choices] + [c.tokens.long() for c in choices]
        counts = [c.count for c in choices]
        parts += [c.reshape(1).long() for c in counts if isinstance(c, torch.Tensor)]
        host = torch.cat(parts).cpu()
        head, tail = 0, host.numel() - sum(isinstance(c, torch.Tensor) for c in counts)
        device_counts = iter(host[tail:].tolist() if tail < host.numel() else ())
        out = []
        sizes = [int(c.order.numel()) for c in choices]
        token_head = sum(sizes)
        for size, count in zip(sizes, counts):
            n = next(device_counts) if isinstance(count, torch.Tensor) else count
            out.append((host[head : head + n], host[token_head : token_head + n]))
            head += size
            token_head += size
        return out

    def write(self, request: Request, positions, chosen, tokens, logits: torch.Tensor) -> torch.Tensor:
        """Write host ``tokens`` at the ``chosen`` candidates of ``positions`` into the request's canvas and
        advance its schedule; returns the committed positions."""
        committed = positions[chosen]
        if request.params.logprobs is not None:  # SamplingParams.logprobs: scores of the model at the commit step
            record_logprobs(request, committed, tokens, logits[chosen.to(logits.device)])
        request.tokens[committed] = tokens
        request.state.advance(request.tokens, request.mask_id)
        return committed

    def commit(self, request: Request, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One request alone: choose, read, write. positions [C] (absolute, masked, host), logits [C, V]."""
        ((chosen, tokens),) = self.to_host([self.choose(request, logits)])
        return self.write(request, positions, chosen, tokens, logits)
