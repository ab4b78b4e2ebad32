"""Decoding rules, one per file: how a step turns the logits of its candidate positions into committed tokens."""
