"""Paged attention equals plain softmax attention over the same kept tokens, for every backend.

The reference gathers each head's kept rows by hand (Python loops over the page lists the test wrote)
and runs softmax(q kᵀ / √d) v in float64: it shares no code with the backends. The page pool is
filled with large garbage first and page ids are shuffled, so reading a padded table entry, a slot
past a head's kept length, another head's page or another layer's table shows up as a wrong output.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # run the triton kernel in its CPU interpreter (decided at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from maskkv_engine.attention.backend import AttentionBackend  # noqa: E402
from maskkv_engine.attention.metadata import AttentionMetadata  # noqa: E402
from maskkv_engine.attention.selector import get_attention_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NUM_LAYERS, LAYER = 2, 1  # attend with layer 1: a backend reading layer 0's table gets other rows


class Case:
    """A packed batch with per-(layer, sequence, kv head) pages, and the rows each head really kept."""

    def __init__(self, seq_lens, n_q, n_kv, d, page_size, kept, dtype, seed=0):
        """kept: [S][H_kv] kept tokens of layer LAYER (None: nothing cached in this batch)."""
        g = torch.Generator().manual_seed(seed)
        t = sum(seq_lens)
        self.seq_lens, self.n_q, self.n_kv, self.d, self.dtype = seq_lens, n_q, n_kv, d, dtype
        self.q = torch.randn(t, n_q, d, generator=g).to(dtype)
        self.k = torch.randn(t, n_kv, d, generator=g).to(dtype)
        self.v = torch.randn(t, n_kv, d, generator=g).to(dtype)
        self.kept_k: dict[tuple[int, int], torch.Tensor] = {}
        self.kept_v: dict[tuple[int, int], torch.Tensor] = {}
        if kept is None:
            self.meta = AttentionMetadata.build(seq_lens, DEVICE)
            return
        n_seqs = len(seq_lens)
        lens = torch.zeros(NUM_LAYERS, n_seqs, n_kv, dtype=torch.long)
        lens[LAYER] = torch.tensor(kept)
        # the other layer keeps different lengths (and different rows) so that mixing layers is visible
        lens[1 - LAYER] = torch.randint(0, 3 * page_size, (n_seqs, n_kv), generator=g)
        pages_of = -(-lens // page_size)
        num_pages = int(pages_of.sum()) + 3
        k_pool = 50 * torch.randn(num_pages, page_size, d, generator=g)  # garbage wherever nothing is kept
        v_pool = 50 * torch.randn(num_pages, page_size, d, generator=g)
        order = torch.randperm(num_pages, generator=g).tolist()
        width = int(pages_of.max()) + 1  # one more column of padding (page id 0: someone else's page)
        tables = torch.zeros(NUM_LAYERS, n_seqs, n_kv, width, dtype=torch.long)
        for layer in range(NUM_LAYERS):
            for s in range(n_seqs):
                for h in range(n_kv):
                    ids = [order.pop() for _ in range(int(pages_of[layer, s, h]))]
                    tables[layer, s, h, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    n = int(lens[layer, s, h])
                    kept_k, kept_v = torch.randn(2, n, d, generator=g)
                    j = torch.arange(n)  # token j of the head lives in page ids[j // page_size]
                    slots = torch.tensor(ids, dtype=torch.long)[j // page_size] * page_size + j % page_size
                    k_pool.view(-1, d)[slots] = kept_k
                    v_pool.view(-1, d)[slots] = kept_v
                    if layer == LAYER:
                        self.kept_k[s, h], self.kept_v[s, h] = kept_k.to(dtype), kept_v.to(dtype)
        self.meta = AttentionMetadata.build(
            seq_lens,
            DEVICE,
            block_tables=tables,
            cached_lens=lens,
            k_pool=k_pool.to(dtype).to(DEVICE),
            v_pool=v_pool.to(dtype).to(DEVICE),
        )

    def run(self, backend: AttentionBackend) -> torch.Tensor:
        out = backend.forward(LAYER, self.q.to(DEVICE), self.k.to(DEVICE), self.v.to(DEVICE), self.meta)
        assert out.dtype == self.dtype and out.shape == self.q.shape
        return out.cpu()

    def reference(self) -> torch.Tensor:
        """softmax(q kᵀ / √d) v per (sequence, query head) over [kept rows of its kv head] + [its tokens]."""
        out = torch.empty(self.q.shape, dtype=torch.float64)
        group = self.n_q // self.n_kv
        start = 0
        for s, n in enumerate(self.seq_lens):
            rows = slice(start, start + n)
            for hq in range(self.n_q):
                h = hq // group
                empty = self.k.new_zeros(0, self.d)
                keys = torch.cat([self.kept_k.get((s, h), empty), self.k[rows, h]]).double()
                values = torch.cat([self.kept_v.get((s, h), empty), self.v[rows, h]]).double()
                probs = torch.softmax(self.q[rows, hq].double() @ keys.T / math.sqrt(self.d), dim=-1)
                out[rows, hq] = probs @ values
            start += n
        return out


def random_kept(seq_lens, n_kv, page_size, seed) -> list[list[int]]:
    """Per-head kept lengths with zeros, exact page multiples, and one sequence holding no cache at all."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.randint(0, 9 * page_size, (len(seq_lens), n_kv), generator=g)
    kept[0, 0] = 0
    kept[-1, -1] = 2 * page_size
    kept[1] = 0
    flat = kept.view(-1)
    flat[2::3] = flat[2::3] // page_size * page_size  # every third head holds whole pages only
    return kept.tolist()


# (query heads, kv heads, head_dim, page size): GQA ratios 1, 4 and 7; head_dim 8 is padded to 16 in triton
SHAPES = [(3, 3, 16, 4), (8, 2, 32, 5), (7, 1, 8, 16)]
SEQ_LENS = [5, 1, 19, 9]


def backend_or_skip(name: str, **kwargs) -> AttentionBackend:
    if name == "triton" and kwargs:
        from maskkv_engine.attention.triton_paged import TritonAttentionBackend

        return TritonAttentionBackend(DEVICE, **kwargs)
    try:
        return get_attention_backend(name, DEVICE)
    except (RuntimeError, ImportError) as e:
        if name == "xformers":
            pytest.skip(str(e))
        raise


BACKENDS = [
    pytest.param("torch", {}, id="torch"),
    pytest.param("triton", {}, id="triton", marks=pytest.mark.triton),
    # small tiles: several query blocks, several key tiles per head and tiles spanning pages
    pytest.param("triton", {"block_m": 16, "block_n": 16}, id="triton-tiles16", marks=pytest.mark.triton),
    pytest.param("xformers", {}, id="xformers"),
]


@pytest.mark.parametrize("name,tiles", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{s[0]}kv{s[1]}d{s[2]}page{s[3]}")
def test_paged_equals_dense_over_kept_tokens(name, tiles, dtype, shape):
    n_q, n_kv, d, page_size = shape
    backend = backend_or_skip(name, **tiles)
    case = Case(SEQ_LENS, n_q, n_kv, d, page_size, random_kept(SEQ_LENS, n_kv, page_size, seed=n_q), dtype)
    err = (case.run(backend).double() - case.reference()).abs().max().item()
    assert err < TOLERANCE[dtype], f"{name} max error {err:.3g}"


@pytest.mark.parametrize("name,tiles", BACKENDS)
def test_batch_without_any_cache(name, tiles):
    backend = backend_or_skip(name, **tiles)
    case = Case([7, 70, 3], 4, 2, 16, 4, None, torch.float32)  # 70 tokens: two 64-row query/key tiles
    err = (case.run(backend).double() - case.reference()).abs().max().item()
    assert err < TOLERANCE[torch.float32]


class SubsetCase(Case):
    """Refresh-strategy layout: each sequence queries a subset of its rows, and its dense keys are all of
    its rows plus extra cached rows that are not queries (separate q / kv layouts)."""

    def __init__(self, seq_lens, n_q, n_kv, d, page_size, kept, dtype, seed=0):
        super().__init__(seq_lens, n_q, n_kv, d, page_size, kept, dtype, seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.extra = [int(torch.randint(0, 9, (1,), generator=g)) for _ in seq_lens]
        self.query_rows, keys_k, keys_v, q_lens, kv_lens = [], [], [], [], []
        start = 0
        for n, extra in zip(seq_lens, self.extra):
            chosen = torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values + start
            self.query_rows.append(chosen)
            keys_k += [self.k[start : start + n], torch.randn(extra, n_kv, d, generator=g).to(dtype)]
            keys_v += [self.v[start : start + n], torch.randn(extra, n_kv, d, generator=g).to(dtype)]
            q_lens.append(int(chosen.numel()))
            kv_lens.append(n + extra)
            start += n
        self.q_sub = self.q[torch.cat(self.query_rows)]
        self.keys_k, self.keys_v = torch.cat(keys_k), torch.cat(keys_v)
        m = self.meta
        self.meta = AttentionMetadata.build(
            q_lens, DEVICE, kv_lens=kv_lens, block_tables=None if m.block_tables is None else m.block_tables.cpu(),
            cached_lens=None if m.cached_lens is None else m.cached_lens.cpu(), k_pool=m.k_pool, v_pool=m.v_pool,
        )  # fmt: skip

    def run(self, backend):
        return backend.forward(
            LAYER, self.q_sub.to(DEVICE), self.keys_k.to(DEVICE), self.keys_v.to(DEVICE), self.meta
        ).cpu()

    def reference(self):
        out = torch.empty(self.q_sub.shape, dtype=torch.float64)
        group = self.n_q // self.n_kv
        row = key0 = 0
        for s, (rows, n, extra) in enumerate(zip(self.query_rows, self.seq_lens, self.extra)):
            dense_k = self.keys_k[key0 : key0 + n + extra]
            dense_v = self.keys_v[key0 : key0 + n + extra]
            for hq in range(self.n_q):
                h = hq // group
                empty = self.k.new_zeros(0, self.d)
                keys = torch.cat([self.kept_k.get((s, h), empty), dense_k[:, h]]).double()
                values = torch.cat([self.kept_v.get((s, h), empty), dense_v[:, h]]).double()
                probs = torch.softmax(self.q[rows, hq].double() @ keys.T / math.sqrt(self.d), dim=-1)
                out[row : row + rows.numel(), hq] = probs @ values
            row += rows.numel()
            key0 += n + extra
        return out


@pytest.mark.parametrize("name,tiles", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"q{s[0]}kv{s[1]}d{s[2]}page{s[3]}")
def test_queries_subset_of_dense_keys(name, tiles, shape):
    n_q, n_kv, d, page_size = shape
    backend = backend_or_skip(name, **tiles)
    case = SubsetCase(SEQ_LENS, n_q, n_kv, d, page_size, random_kept(SEQ_LENS, n_kv, page_size, seed=2), torch.float32)
    assert not case.meta.same_layout
    err = (case.run(backend).double() - case.reference()).abs().max().item()
    assert err < TOLERANCE[torch.float32], f"{name} max error {err:.3g}"


def test_the_reference_sees_the_pages():
    """Guard for the tests above: dropping the kept rows must change the reference output."""
    case = Case(SEQ_LENS, 4, 2, 16, 4, random_kept(SEQ_LENS, 2, 4, seed=0), torch.float32)
    with_cache = case.reference()
    case.kept_k, case.kept_v = {}, {}
    assert (with_cache - case.reference()).abs().max() > 0.1


def one_sequence(case: Case, s: int) -> AttentionMetadata:
    """Metadata of sequence s alone: its own pages and lengths, a table only as wide as it needs."""
    meta = case.meta
    width = max(1, int(-(-meta.cached_lens[:, s].max() // meta.block_size)))
    return AttentionMetadata.build(
        [case.seq_lens[s]],
        DEVICE,
        block_tables=meta.block_tables[:, s : s + 1, :, :width].cpu(),
        cached_lens=meta.cached_lens[:, s : s + 1].cpu(),
        k_pool=meta.k_pool,
        v_pool=meta.v_pool,
    )


def assert_batch_invariant(backend: AttentionBackend, case: Case) -> None:
    """Each sequence alone (its own table width and padding) gives bitwise the rows it gets in the batch."""
    batched = case.run(backend)
    start = 0
    for s, n in enumerate(case.seq_lens):
        rows = slice(start, start + n)
        q, k, v = (x[rows].to(DEVICE) for x in (case.q, case.k, case.v))
        alone = backend.forward(LAYER, q, k, v, one_sequence(case, s)).cpu()
        assert torch.equal(alone, batched[rows]), f"sequence {s} differs alone"
        start += n


@pytest.mark.parametrize(
    "name,tiles",
    [pytest.param("torch", {}, id="torch"), pytest.param("triton", {}, id="triton", marks=pytest.mark.triton)],
)
def test_batch_invariance_is_bitwise(name, tiles):
    """A sequence's output alone equals its rows in a mixed batch (other lengths, wider tables, Lpad 128)."""
    backend = backend_or_skip(name, **tiles)
    seq_lens = [6, 70, 1, 11]
    case = Case(seq_lens, 8, 2, 16, 4, random_kept(seq_lens, 2, 4, seed=3), torch.float32)
    assert_batch_invariant(backend, case)


def test_gather_varlen_packs_each_head_block():
    """The xformers backend's gather (runs without xformers): each block holds exactly its head's keys."""
    from maskkv_engine.attention.xformers_paged import gather_varlen

    case = Case(SEQ_LENS, 8, 2, 16, 5, random_kept(SEQ_LENS, 2, 5, seed=1), torch.float32)
    blocks = gather_varlen(LAYER, case.q, case.k, case.v, case.meta)
    out = torch.empty(case.q.shape, dtype=torch.float64)
    q0 = k0 = 0
    for mq, mk in zip(blocks.q_seqlens, blocks.kv_seqlens):  # plain attention inside each diagonal block
        q, kk, vv = blocks.q[q0 : q0 + mq], blocks.k[k0 : k0 + mk], blocks.v[k0 : k0 + mk]
        probs = torch.softmax(q.double() @ kk.double().T / math.sqrt(case.d), dim=-1)
        out[blocks.q_token[q0 : q0 + mq], blocks.q_head[q0 : q0 + mq]] = probs @ vv.double()
        q0, k0 = q0 + mq, k0 + mk
    assert q0 == case.q.shape[0] * case.n_q
    assert (out - case.reference()).abs().max() < 1e-5


def test_triton_refuses_the_cpu_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from maskkv_engine.attention import triton_paged

    monkeypatch.setattr(triton_paged, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=r"attention_backend='torch'.*TRITON_INTERPRET=1"):
        get_attention_backend("triton", torch.device("cpu"))


def test_xformers_refuses_the_cpu():
    with pytest.raises(RuntimeError, match="attention_backend="):
        get_attention_backend("xformers", torch.device("cpu"))


@pytest.mark.triton
@pytest.mark.parametrize("fixture,policy", [("llada_gqa_dir", "adakv"), ("dream_dir", "snapkv")])
def test_triton_engine_generates_what_torch_generates(fixture, policy, request):
    """The whole engine (full passes, then cached steps over real pages) with either backend."""
    from maskkv_engine import LLM, SamplingParams
    from tests.conftest import prompt_ids

    path = str(request.getfixturevalue(fixture))
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (5, 40, 90)]
    blocks = {"block_length": 8} if fixture.startswith("llada") else {}  # Dream decodes one block
    params = SamplingParams(gen_length=16, steps=8, kv_budget=8, **blocks)
    outputs = {}
    for name in ("torch", "triton"):
        llm = LLM(path, kv_policy=policy, attention_backend=name, dtype="float32", device=str(DEVICE))
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]


@pytest.mark.triton
@pytest.mark.parametrize("refresh", ["fast_dllm_dual", "dllm_cache", "elastic"])
def test_triton_runs_the_refresh_strategies(llada_gqa_dir, refresh):
    """Query subsets and cached response keys (separate q / kv layouts) through the kernel."""
    from maskkv_engine import LLM, SamplingParams
    from tests.conftest import prompt_ids

    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (9, 50)]
    params = SamplingParams(gen_length=16, steps=16, block_length=8, kv_budget=8, stop_at_eos=False)
    config = {"K_p": 5, "K_r": 3} if refresh == "dllm_cache" else {}
    outputs = {}
    for name in ("torch", "triton"):
        llm = LLM(
            str(llada_gqa_dir), kv_policy="maskkv", attention_backend=name, refresh=refresh, refresh_config=config
        )
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]
