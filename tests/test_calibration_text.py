"""Calibration prompts: the shipped public-domain text through the model's tokenizer by default, random
tokens only when asked for, and a clear refusal where the text cannot stand for real prompts."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch

from maskkv_engine.entrypoints import cli
from maskkv_engine.kv.calibrate import CALIBRATION_TEXT, calibrate, text_prompts
from maskkv_engine.kv.profile import PROFILE_FILE
from maskkv_engine.llm import DEFAULT_MODEL_DIR
from maskkv_engine.tokenizer import load_tokenizer


def write_char_tokenizer(path) -> None:
    """A character-level tokenizer covering printable ASCII: English maps to no unknown token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\n": 1}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))


@pytest.fixture(scope="module")
def char_llada(llada_gqa_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("char_llada")
    shutil.copytree(llada_gqa_dir, path, dirs_exist_ok=True)
    write_char_tokenizer(path)
    return path


def test_the_shipped_text_is_public_domain_and_documented():
    readme = (CALIBRATION_TEXT.parent / "README.md").read_text()
    assert CALIBRATION_TEXT.name in readme and "public domain" in readme.lower()
    assert 100_000 < CALIBRATION_TEXT.stat().st_size < 500_000


def test_default_prompts_are_the_text_through_the_models_tokenizer(char_llada, tmp_path):
    tok = load_tokenizer(str(char_llada))
    windows = text_prompts(tok, num_prompts=3, prompt_len=64)
    assert [len(w) for w in windows] == [64, 64, 64] and len({tuple(w) for w in windows}) == 3
    assert "".join(tok.convert_ids_to_tokens(windows[0])) == CALIBRATION_TEXT.read_text()[:64], "the text's start"
    stats = calibrate(char_llada, num_prompts=3, prompt_len=64, gen_length=8, out=tmp_path, use_tqdm=False)
    given = calibrate(char_llada, windows, gen_length=8, use_tqdm=False)
    assert torch.allclose(stats.prompt_preference, given.prompt_preference)
    meta = json.loads((tmp_path / PROFILE_FILE).read_text())["calibration"]
    assert meta["prompts"] == CALIBRATION_TEXT.name and meta["random_prompts"] is False
    noise = calibrate(char_llada, num_prompts=3, prompt_len=64, gen_length=8, use_tqdm=False, random_prompts=True)
    assert not torch.allclose(stats.prompt_preference, noise.prompt_preference)


def test_random_tokens_only_when_asked(llada_gqa_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="has no tokenizer.*random_prompts=True"):
        calibrate(llada_gqa_dir, num_prompts=1, prompt_len=16, use_tqdm=False)
    with pytest.raises(ValueError, match="either prompts or random_prompts=True"):
        calibrate(llada_gqa_dir, [[5, 6, 7]], random_prompts=True, use_tqdm=False)
    out = tmp_path / "p.json"
    argv = ["calibrate", "--model", str(llada_gqa_dir), "--num-prompts", "1", "--prompt-len", "16", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--random-prompts" in capsys.readouterr().err and not out.exists()
    assert cli.main([*argv, "--random-prompts"]) == 0
    assert json.loads(out.read_text())["calibration"]["prompts"] == "random"


def test_a_word_tokenizer_that_maps_english_to_unknown_is_refused():
    """The default model's word-level vocabulary knows the synthetic suite, not English: its shipped
    profile (calibrated on suite prompts) stays, and calibrating it on the text is refused."""
    before = (DEFAULT_MODEL_DIR / PROFILE_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"maps \d+% of the calibration text .* to its unknown token"):
        calibrate(DEFAULT_MODEL_DIR, num_prompts=1, prompt_len=32, use_tqdm=False)
    assert (DEFAULT_MODEL_DIR / PROFILE_FILE).read_bytes() == before
