"""Budget allocation shared by the policies: real-valued shares -> integer per-head budgets.

Every allocator produces a real-valued wish ``a[l, h] >= 0``. ``finalize_budgets`` turns it into
integers that
* sum to exactly ``L * H_kv * min(budget, n_cached)`` (the request's total, clipped by the prompt),
* never exceed ``n_cached`` (what a clamp frees goes to the heads with room, in proportion to their
  wishes, so nobody's share shrinks: floors are never undercut),
* round down first, then hand the rounding leftovers one by one to the highest wishes with room.
"""

from __future__ import annotations

import torch


def total_budget(num_layers: int, num_kv_heads: int, budget: int, n_cached: int) -> int:
    return num_layers * num_kv_heads * min(budget, n_cached)


def water_fill(wish: torch.Tensor, cap: float, total: float) -> torch.Tensor:
    """Scale ``wish`` to sum ``total`` and clamp at ``cap``, giving what a clamp frees to the unclamped
    entries in proportion to their wishes (entries with wish 0 share evenly if nothing else has room)."""
    a = wish.double().clamp(min=0).clone()
    if total <= 0:
        return torch.zeros_like(a)
    if a.sum() <= 0:
        a = torch.ones_like(a)
    a = a * (total / a.sum())
    capped = torch.zeros_like(a, dtype=torch.bool)
    for _ in range(a.numel() + 1):
        over = (a > cap) & ~capped
        if not over.any():
            break
        capped |= over
        a[capped] = cap
        room = total - cap * capped.sum().item()
        free = ~capped
        weights = a[free]
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        a[free] = weights * (room / weights.sum())
    return a


def integerize(a: torch.Tensor, cap: int, total: int) -> torch.Tensor:
    """Floor, then leftovers to the largest wishes that still have room (ties by position)."""
    base = torch.floor(a + 1e-9).clamp(0, cap).to(torch.long)
    left = total - int(base.sum())
    if left > 0:
        room = (base < cap).reshape(-1)
        order = torch.argsort(a.reshape(-1), descending=True, stable=True)
        order = order[room[order]]
        flat = base.reshape(-1)
        flat[order[:left]] += 1
        base = flat.view_as(base)
    elif left < 0:  # numerical overshoot: take back from the smallest wishes
        order = torch.argsort(a.reshape(-1), descending=False, stable=True)
        flat = base.reshape(-1)
        for idx in order.tolist():
            if left == 0:
                break
            if flat[idx] > 0:
                flat[idx] -= 1
                left += 1
        base = flat.view_as(base)
    return base


def finalize_budgets(wish: torch.Tensor, n_cached: int, budget: int) -> torch.Tensor:
    """Integer per-(layer, head) budgets from a real-valued wish [L, H]; see the module docstring."""
    num_layers, num_heads = wish.shape
    total = total_budget(num_layers, num_heads, budget, n_cached)
    return integerize(water_fill(wish, float(n_cached), float(total)), n_cached, total)


def layer_wish_to_heads(layer_budget: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[L] average per-head budgets -> [L, H] uniform over heads."""
    return layer_budget.double()[:, None].expand(-1, num_heads).clone()
