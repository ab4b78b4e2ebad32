"""Every kv_policy x refresh x decoding rule x model family, as hypothesis strategies and plain builders.

Shared by the cross-combination batch-invariance test and the soak test. Models are tiny checkpoints in
the released layouts: LLaDA and Dream, GQA and not, with and without a MaskKV calibration profile (the
profile decides whether maskkv / squeeze budgets are known before the pass or measured online).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.kv.calibrate import calibrate
from maskkv_engine.models.random_checkpoint import dream_config, llada_config, write_checkpoint

POLICIES = ("none", "full", "maskkv", "snapkv", "pyramidkv", "adakv", "squeeze")
REFRESHES = ("every_step", "fast_dllm", "fast_dllm_dual", "dllm_cache", "elastic")
LLADA_RULES = ("low_confidence", "random", "gumbel", "threshold", "factor")
DREAM_RULES = ("origin", "maskgit_plus", "topk_margin", "entropy", "alg_temp", "threshold")


@dataclass(frozen=True)
class ModelCase:
    name: str
    dream: bool
    profile: bool


MODEL_CASES = (
    ModelCase("llada_mha", dream=False, profile=False),
    ModelCase("llada_gqa", dream=False, profile=False),
    ModelCase("llada_gqa_profile", dream=False, profile=True),
    ModelCase("dream_gqa", dream=True, profile=False),
    ModelCase("dream_mha_profile", dream=True, profile=True),
)


def build_models(root: Path) -> dict[str, Path]:
    """Write every model case under ``root`` (a few MB, ~1 s)."""
    configs = {
        "llada_mha": llada_config(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=128),
        "llada_gqa": llada_config(d_model=64, n_layers=4, n_heads=8, n_kv_heads=2, mlp_hidden_size=64, vocab_size=128),
        "dream_gqa": dream_config(
            hidden_size=56, num_hidden_layers=3, num_attention_heads=7, num_key_value_heads=1, vocab_size=128
        ),
        "dream_mha_profile": dream_config(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, vocab_size=128
        ),
    }
    paths = {}
    for seed, (name, cfg) in enumerate(configs.items()):
        paths[name] = root / name
        write_checkpoint(paths[name], cfg, seed=10 + seed)
    paths["llada_gqa_profile"] = root / "llada_gqa_profile"
    shutil.copytree(paths["llada_gqa"], paths["llada_gqa_profile"])
    for name in ("llada_gqa_profile", "dream_mha_profile"):
        calibrate(paths[name], num_prompts=2, prompt_len=32, out=paths[name], use_tqdm=False, random_prompts=True)
    return paths


def make_llm(path: Path, policy: str, **options) -> LLM:
    """A small pool and a small token budget, so batches mix first passes, layer chunks and cached steps."""
    options = {"max_num_seqs": 3, "max_num_batched_tokens": 96, "num_pages": 512, "block_size": 4, **options}
    return LLM(str(path), kv_policy=policy, kv_budget=6, device="cpu", skip_tokenizer_init=True, **options)


@dataclass(frozen=True)
class RequestCase:
    prompt: tuple[int, ...]
    gen_length: int
    block_length: int
    rule: str
    refresh: str
    seed: int
    kv_budget: int | None

    def params(self, dream: bool) -> SamplingParams:
        kw: dict = {"gen_length": self.gen_length, "seed": self.seed, "kv_budget": self.kv_budget}
        kw["stop_at_eos"] = self.seed % 2 == 0
        if not dream:
            kw["block_length"] = self.block_length
            kw["steps"] = self.gen_length
        rule = self.rule
        if rule == "random":
            kw["remasking"] = "random"
        elif rule == "gumbel":
            kw["temperature"] = 1.0
        elif rule == "threshold":
            kw["threshold"] = 0.5
        elif rule == "factor":
            kw["factor"] = 1.0
        elif rule == "cfg":
            kw["cfg_scale"] = 1.5
        elif rule == "origin":
            kw.update(remasking="origin", temperature=0.7)
        elif rule == "alg_temp":
            kw.update(remasking="maskgit_plus", alg_temp=0.5, temperature=0.5)
        elif rule in ("maskgit_plus", "topk_margin", "entropy"):
            kw["remasking"] = rule
        refresh = self.refresh
        if dream and rule == "origin" and refresh == "elastic":
            refresh = "every_step"  # Elastic decodes its window by confidence; origin has none (refused)
        kw["refresh"] = refresh
        if refresh == "dllm_cache":
            kw["refresh_config"] = {"K_p": 3, "K_r": 2, "rho": 0.25}
        elif refresh == "elastic":
            kw["refresh_config"] = {"window": 4, "gamma": 0.9}
        return SamplingParams(**kw)


def rules(dream: bool, policy: str) -> tuple[str, ...]:
    """Classifier-free guidance runs with the reference decoder only (kv_policy='none', LLaDA)."""
    if dream:
        return DREAM_RULES
    return LLADA_RULES + (("cfg",) if policy == "none" else ())


def request_cases(dream: bool, policy: str) -> st.SearchStrategy[RequestCase]:
    refreshes = ("every_step",) if policy == "none" else REFRESHES
    return st.builds(
        RequestCase,
        prompt=st.lists(st.integers(3, 100), min_size=2, max_size=40).map(tuple),
        gen_length=st.sampled_from((4, 8)),
        block_length=st.sampled_from((4,)),
        rule=st.sampled_from(rules(dream, policy)),
        refresh=st.sampled_from(refreshes),
        seed=st.integers(0, 2**16),
        kv_budget=st.sampled_from((None, 2, 5, 64)),
    )


def random_request_case(rng: torch.Generator, dream: bool, policy: str) -> RequestCase:
    """The same space as ``request_cases``, drawn from a torch generator (the soak test)."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    n = int(torch.randint(2, 41, (1,), generator=rng))
    return RequestCase(
        prompt=tuple(torch.randint(3, 101, (n,), generator=rng).tolist()),
        gen_length=pick((4, 8)),
        block_length=4,
        rule=pick(rules(dream, policy)),
        refresh=pick(("every_step",) if policy == "none" else REFRESHES),
        seed=int(torch.randint(2**16, (1,), generator=rng)),
        kv_budget=pick((None, 2, 5, 64)),
    )


def assert_pool_empty(llm: LLM) -> None:
    """Nothing is held once every request is done: pages, reservations, transient full-layer KV."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    bm = engine.block_manager
    if bm is not None:
        bm.check_invariants()
        assert bm.num_used_pages == 0, f"{bm.num_used_pages} pages still held"
        assert bm.num_reserved_pages == 0, f"{bm.num_reserved_pages} pages still reserved"
        assert bm.transient_bytes == 0, f"{bm.transient_bytes} transient bytes left"
        assert bm.live_requests == []
