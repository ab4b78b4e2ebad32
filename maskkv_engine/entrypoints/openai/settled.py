"""Newly settled text: what a left-to-right client may be shown while the canvas is still denoising.

A diffusion step can commit tokens anywhere in the block, but an ordinary OpenAI client appends
chunks. So a chunk carries only the longest fully committed prefix of the response (the tokens
before the first [MASK]), cut at the first stop token when ``stop_at_eos``, minus what earlier
chunks already carried. Committed tokens never change, so the joined chunks equal the final text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # a byte-level BPE prefix that ends inside a multi-byte character


class SettledText:
    def __init__(self, tokenizer, mask_id: int, stop_token_ids: Sequence[int], stop_at_eos: bool):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.stop_token_ids = set(stop_token_ids) if stop_at_eos else set()
        self.sent = ""  # text already handed out
        self._num_settled = 0

    def settled_ids(self, canvas: Sequence[int]) -> list[int]:
        out = []
        for tok in canvas:
            if tok == self.mask_id or tok in self.stop_token_ids:
                break
            out.append(tok)
        return out

    def update(self, canvas: Sequence[int]) -> str:
        """The text settled since the last call ('' when the prefix did not grow)."""
        ids = self.settled_ids(canvas)
        if self.tokenizer is None or len(ids) == self._num_settled:
            return ""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR) or not text.startswith(self.sent):
            return ""  # wait for the next token to complete the character or the word
        self._num_settled = len(ids)
        return self._take(text)

    def finish(self, final_text: str) -> str:
        """What is left of the final text once the request is done."""
        if not final_text.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return ""
        return self._take(final_text)

    def _take(self, text: str) -> str:
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
