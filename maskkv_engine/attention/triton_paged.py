"""The ``triton`` backend: one paged varlen kernel with online softmax, the GPU fast path.

One program per (query block, sequence, kv head). Its query rows are the G = H_q / H_kv query heads
of that kv head times the sequence's queries (row r = query r // G, query head r % G), so a kv head's
K/V is read once per query block rather than once per query head. The program walks the head's pages
(this layer's block table, ``cached_lens`` tokens, possibly 0), then the sequence's dense keys
(``cu_seqlens_k``: its fresh K/V of this step, plus cached response K/V for refresh strategies), with
no causal mask, in a float32 online softmax. Key tiles are ``BLOCK_N`` tokens wide whatever
the page size: a tile may span several pages or part of one, so small pages still feed full MMAs.

Tile sizes depend on head_dim only, never on the batch: a sequence's output does not depend on the
other sequences of the step (batch invariance), and there is no host sync in ``forward``.
"""

from __future__ import annotations

import math

import torch

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "attention_backend='triton' needs the triton package (pip install 'maskkv-engine[gpu]'); "
        "without it use attention_backend='torch'"
    ) from e

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): same values in fp32
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, key_valid, scale_log2, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of BLOCK_M query rows over a tile of keys (k, v: [BLOCK_N, BLOCK_D]).

    Every tile the kernel visits holds at least one valid key, so the running max is finite after it.
    """
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # log2 domain: exp2 is the fast path
    s = tl.where(key_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [Tq, H_q, D]
    k_ptr,  # [Tk, H_kv, D] the sequences' dense keys (their fresh K, plus any cached response K)
    v_ptr,
    o_ptr,  # [Tq, H_q, D]
    k_pool_ptr,  # [num_pages, PAGE_SIZE, D]
    v_pool_ptr,
    tables_ptr,  # [S, H_kv, P] page ids of this layer
    cached_lens_ptr,  # [S, H_kv] tokens held in those pages
    cu_seqlens_ptr,  # [S + 1] queries
    cu_seqlens_k_ptr,  # [S + 1] dense keys
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pp,  # K and V pools: same shape, same strides
    stride_ps,
    stride_ts,
    stride_th,
    stride_tp,
    stride_cs,
    stride_ch,
    head_dim,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1) // NUM_KV_HEADS
    kv_head = tl.program_id(1) % NUM_KV_HEADS
    tok0 = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - tok0
    if pid_m * BLOCK_M >= seq_len * GROUP:  # the grid is sized for the longest sequence
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    q_head = kv_head * GROUP + rows % GROUP
    row_valid = tok < seq_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    q_mask = row_valid[:, None] & d_valid[None, :]
    q_rows = (tok0 + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + q_head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    if HAS_CACHE:  # the head's pages: key n lives in page table[n // PAGE_SIZE], slot n % PAGE_SIZE
        n_cached = tl.load(cached_lens_ptr + seq * stride_cs + kv_head * stride_ch)
        table = tables_ptr + seq * stride_ts + kv_head * stride_th
        for start in range(0, n_cached, BLOCK_N):
            n = start + offs_n
            key_valid = n < n_cached
            page = tl.load(table + (n // PAGE_SIZE) * stride_tp, mask=key_valid, other=0).to(tl.int64)
            slot = n % PAGE_SIZE
            kv_mask = key_valid[:, None] & d_valid[None, :]
            pool_off = page[:, None] * stride_pp + slot[:, None] * stride_ps + d[None, :]
            k = tl.load(k_pool_ptr + pool_off, mask=kv_mask, other=0.0)
            v = tl.load(v_pool_ptr + pool_off, mask=kv_mask, other=0.0)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, key_valid, scale_log2, UPCAST, PRECISION)

    kv0 = tl.load(cu_seqlens_k_ptr + seq)
    kv_len = tl.load(cu_seqlens_k_ptr + seq + 1) - kv0
    for start in range(0, kv_len, BLOCK_N):  # the sequence's dense keys
        n = start + offs_n
        key_valid = n < kv_len
        kv_rows = (kv0 + n).to(tl.int64)
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, key_valid, scale_log2, UPCAST, PRECISION)

    out = acc / l_i[:, None]
    o_off = q_rows[:, None] * stride_ot + q_head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=q_mask)


def interpreted() -> bool:
    """True when triton runs kernels in its CPU interpreter (read when this module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_paged_attention_kernel, InterpretedFunction)


def tile_config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100-class GPUs, from head_dim alone.

    A denoise step has few query rows per kv head (32 response tokens x G), so BLOCK_M=64 keeps more
    programs in flight than 128 would; larger head dims shrink BLOCK_N to stay within registers.
    """
    if head_dim <= 64:
        return 64, 64, 4, 3
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 64, 32, 8, 2


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, device: torch.device | str, block_m: int | None = None, block_n: int | None = None):
        """``block_m`` / ``block_n`` override the tile sizes (powers of two >= 16; tests use small tiles)."""
        self.device = torch.device(device)
        if self.device.type != "cuda" and not interpreted():
            raise RuntimeError(
                f"attention_backend='triton' needs a CUDA device (got {self.device}); on the CPU use "
                "attention_backend='torch', or start Python with TRITON_INTERPRET=1 in the environment to run the "
                "kernel in triton's interpreter (slow; for tests)"
            )
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"TritonAttentionBackend {name}={value} must be a power of two >= 16")
        self.block_m = block_m
        self.block_n = block_n

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if q.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend runs {SUPPORTED_DTYPES}, not {q.dtype}; use attention_backend='torch'")
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        n_q, d = q.shape[1], q.shape[2]
        n_kv = k.shape[1]
        group = n_q // n_kv
        s, lpad = meta.q_index.shape  # lpad >= the longest sequence: sizes the grid without a host sync
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

        has_cache = meta.block_tables is not None
        if has_cache:
            assert meta.k_pool is not None and meta.v_pool is not None and meta.cached_lens is not None
            k_pool, v_pool = meta.k_pool, meta.v_pool
            if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
                raise TypeError(f"KV pages are {k_pool.dtype} but the model runs {q.dtype}")
            if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1:
                raise ValueError("K and V page pools must have the same strides, contiguous in head_dim")
            tables, lens = meta.block_tables[layer], meta.cached_lens[layer]  # [S, H_kv, P], [S, H_kv]
        else:  # placeholders, never read: HAS_CACHE=False compiles the page loop away
            k_pool, v_pool = k, v
            tables, lens = meta.cu_seqlens.view(1, 1, -1), meta.cu_seqlens.view(1, -1)

        block_m, block_n, num_warps, num_stages = tile_config(d)
        block_m, block_n = self.block_m or block_m, self.block_n or block_n
        if s * n_kv > 65535:
            raise ValueError(f"{s} sequences x {n_kv} kv heads exceed the kernel's grid (65535 programs per axis)")
        grid = (triton.cdiv(lpad * group, block_m), s * n_kv)
        _paged_attention_kernel[grid](
            q,
            k,
            v,
            out,
            k_pool,
            v_pool,
            tables,
            lens,
            meta.cu_seqlens,
            meta.cu_seqlens_k,
            math.log2(math.e) / math.sqrt(d),
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            k_pool.stride(0),
            k_pool.stride(1),
            tables.stride(0),
            tables.stride(1),
            tables.stride(2),
            lens.stride(0),
            lens.stride(1),
            d,
            NUM_KV_HEADS=n_kv,
            GROUP=group,
            PAGE_SIZE=meta.block_size if has_cache else 1,
            HAS_CACHE=has_cache,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
            UPCAST=interpreted() and q.dtype == torch.bfloat16,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return out
