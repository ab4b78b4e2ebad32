"""Loads a model directory's tokenizer offline through transformers, if the directory has one."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
    """The tokenizer (with its chat template) or None when the directory carries no tokenizer files."""
    root = Path(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a broken tokenizer should not hide behind a model that loads fine
        raise ValueError(f"could not load the tokenizer in {str(root)!r}: {e}") from e
