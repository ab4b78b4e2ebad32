"""Loads a model directory's tokenizer offline through transformers, if the directory has one.

No remote code is run: a checkpoint whose tokenizer_config names a custom class (Dream's
``DreamTokenizer``, a Qwen2 BPE) falls back to the stock class that reads the same files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from maskkv_engine.models.errors import CheckpointError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns that our config.json's model_type is unknown to it: true, and harmless here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(path: str):
    """The tokenizer (with its chat template), or None when the directory carries no tokenizer files.

    A file that cannot be read raises CheckpointError naming it (the first unparsable JSON file, else the
    main tokenizer file), never a traceback from deep inside transformers.
    """
    root = Path(path)
    present = [root / f for f in TOKENIZER_FILES if (root / f).is_file()]
    if not present:
        return None
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
        except Exception as first:  # e.g. a tokenizer_class that only exists as remote code
            try:
                fallback = _stock_tokenizer(root)
            except Exception as second:
                raise _tokenizer_error(root, present, second) from second
            if fallback is None:
                raise _tokenizer_error(root, present, first) from first
            return fallback


def _tokenizer_error(root: Path, present: list[Path], error: Exception) -> CheckpointError:
    """Name the file at fault: the first tokenizer JSON that does not parse, else the main tokenizer file."""
    for file in [*present, root / "special_tokens_map.json"]:
        if file.suffix != ".json" or not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return CheckpointError(file, f"is not valid JSON ({e})")
    return CheckpointError(present[0], f"could not load the tokenizer ({type(error).__name__}: {error})")


def _stock_tokenizer(root: Path):
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    cfg_file = root / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    kwargs = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
    if (root / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), **kwargs)
    elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        tok = Qwen2Tokenizer(vocab_file=str(root / "vocab.json"), merges_file=str(root / "merges.txt"), **kwargs)
    else:
        return None
    if cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    logger.info("loaded the tokenizer in %s with the stock %s class", root, type(tok).__name__)
    return tok
