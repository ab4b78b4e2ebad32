"""The suite's word-level tokenizer, built offline and saved in the transformers format.

One token per word of :mod:`vocabulary` (lower-cased, split on whitespace and punctuation), plus the
special tokens: ``<|mdm_mask|>`` (LLaDA's mask), ``<|endoftext|>`` (EOS and padding) and the chat
role markers. ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` loads the saved directory,
chat template included; ``decode(ids, skip_special_tokens=True)`` gives the words joined by spaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from benchmarks.longctx.vocabulary import (
    ASSISTANT,
    END_OF_TURN,
    EOS,
    MASK,
    SPECIAL_TOKENS,
    SYSTEM,
    UNK,
    USER,
    VOCAB,
)

# A user (or system) turn is `<|role|> content <|eot|>`; the generation prompt opens the assistant turn.
# The model answers with the answer words followed by <|endoftext|> (EOS, repeated as padding).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ ' <|endoftext|> ' }}{%- else -%}{{ ' <|eot|> ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)


def build_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` over the suite vocabulary (ids fixed by VOCAB order)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END_OF_TURN],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(directory: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template inside) and special_tokens_map.json.

    Written so that transformers 4.x and 5.x both load it: the generic fast-tokenizer class, the
    chat template in tokenizer_config.json rather than a separate chat_template.jinja.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    special = {
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "mask_token": MASK,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN],
    }
    added = {
        str(VOCAB.index(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        **special,
        "extra_special_tokens": special["additional_special_tokens"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(directory: str | os.PathLike | None = None):
    """Load a saved tokenizer directory, or build the suite tokenizer in memory when none is given."""
    if directory is None:
        return build_tokenizer()
    from maskkv_engine.tokenizer import load_tokenizer as load_model_tokenizer

    tokenizer = load_model_tokenizer(str(directory))
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {str(directory)!r}")
    return tokenizer
