"""Host syncs on the engine's step path, counted per step and per call site (file:line).

A host sync stalls the CPU until the GPU has caught up, so the next kernels are launched late: on a
denoise step of a few milliseconds, every sync costs launch latency that no kernel can win back.

* CPU (any machine): ``torch.Tensor.item / tolist / cpu / numpy / nonzero / __int__ / __float__ /
  __bool__ / __index__`` are wrapped and each call is charged to the first frame in ``maskkv_engine/``
  (outside its benchmarks), and so is every ``Tensor.to(device)``: on CUDA a blocking copy from pageable
  host memory synchronizes the stream too. On the CPU every tensor is a host tensor, so this is an upper
  bound: it also counts reads of tensors the engine keeps on the host by design (the request's canvas).
* CUDA: ``torch.cuda.set_sync_debug_mode('warn')`` reports every operation that really synchronizes
  (explicit reads, boolean-mask indexing, ``nonzero``, ``repeat_interleave`` without a size...), each
  charged to its call site the same way. That list is the exact one.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "maskkv_engine"
EXCLUDED = PACKAGE / "benchmarks"  # the benchmark harness is not the step path
METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__bool__", "__index__")


def call_site(frame) -> str | None:
    """``path:line`` (relative to the repository) of the innermost frame in maskkv_engine/, or None."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE) and not path.is_relative_to(EXCLUDED):
            return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def moves(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device (a copy across devices on a GPU), not only a dtype."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str)) or isinstance(a, torch.Tensor) for a in args)


class SyncCounter:
    """``with SyncCounter(device) as c: ...`` then ``c.counts``: Counter of 'file:line method' -> calls."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter()
        self._saved: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SyncCounter:
        if self.device.type == "cuda":
            self._watch_cuda()
        else:
            self._wrap_methods()
        return self

    def __exit__(self, *exc) -> None:
        for name, own in self._saved.items():  # put back exactly what torch.Tensor itself defined
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self._saved.clear()
        self._stack.close()

    def _wrap_methods(self) -> None:
        for name in (*METHODS, "to"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from torch._C.TensorBase
            setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name: str, original):
        counts = self.counts

        def wrapper(tensor, *args, **kwargs):
            if name != "to" or moves(args, kwargs):
                site = call_site(sys._getframe(1))
                if site is not None:
                    counts[f"{site} {'to(device)' if name == 'to' else name.strip('_')}"] += 1
            return original(tensor, *args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    def _watch_cuda(self) -> None:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        self._stack.callback(torch.cuda.set_sync_debug_mode, previous)
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        counts = self.counts
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return show(message, category, filename, lineno, file, line)
            site = call_site(sys._getframe(1))
            if site is not None:  # None: the harness itself (e.g. the synchronize that ends a timed step)
                counts[f"{site} sync"] += 1

        warnings.showwarning = record
        self._stack.callback(setattr, warnings, "showwarning", show)


# What a cached denoise step may still read, per call site without its line ("file method"), and why: the
# expectation tests/test_step_syncs.py holds the engine to (B requests in the batch; docs/gpu.md).
CACHED_STEP = {
    "maskkv_engine/sampling/sampler.py cpu": "the step's one sync: every request's committed tokens, one copy",
    "maskkv_engine/attention/transfer.py to(device)": "the step's inputs and metadata, one non-blocking copy "
    "from pinned memory (and one more for refresh layouts): queued, not a sync",
    "maskkv_engine/sampling/denoise_state.py nonzero": "host: the request's candidates on its canvas (a host "
    "tensor), twice per request (runner, schedule)",
    "maskkv_engine/sampling/denoise_state.py bool": "host: whether the request is finished, on its canvas",
}
# A first (capturing) pass with budgets known before it (a profile, or a per-head plan): per layer and request
# unless said otherwise. Only the sampler reads the device; a plan split per request at each layer from its own
# scores (MaskKV's head budgets, AdaKV) adds one read per layer and request (prefill_capture.py ``_to_host``).
FIRST_PASS = {
    "maskkv_engine/sampling/sampler.py cpu": "once per step: the committed tokens",
    "maskkv_engine/attention/transfer.py to(device)": "1 per step (inputs) + 2 per layer and request (the kept "
    "rows' mask, the page slots): non-blocking copies, not syncs",
    "maskkv_engine/kv/prefill_capture.py tolist": "host: the plan's kept lengths",
    "maskkv_engine/engine/block_manager.py cpu": "host: the kept lengths (already host tensors: a no-op)",
    "maskkv_engine/engine/block_manager.py bool": "host: the kept lengths' range check",
    "maskkv_engine/engine/block_manager.py int": "host: the kept lengths' range check",
    "maskkv_engine/engine/block_manager.py tolist": "host: pages per head",
    "maskkv_engine/engine/block_manager.py nonzero": "host: which rows of each head are written",
    "maskkv_engine/kv/types.py int": "host: the plan's total, once per request",
    "maskkv_engine/sampling/denoise_state.py nonzero": "host: the candidates, once per request",
    "maskkv_engine/sampling/denoise_state.py bool": "host: whether the request is finished, once per request",
}
# A plan split per request at each layer (MaskKV's head budgets from the request's preference, AdaKV).
SPLIT_PER_LAYER = {
    "maskkv_engine/kv/prefill_capture.py cpu": "the layer's scores / preference for the allocator: one read per "
    "layer and request (the split is host math)",
    "maskkv_engine/kv/prefill_capture.py int": "host: the layer's total budget",
    "maskkv_engine/kv/budgets.py bool": "host: the allocator's integer split",
    "maskkv_engine/kv/budgets.py int": "host: the allocator's integer split",
}
# The step that finishes a request: its output tokens from its canvas.
FINISHING = {
    "maskkv_engine/request.py tolist": "host: the finished request's tokens",
    "maskkv_engine/engine/output_processor.py tolist": "host: the finished request's tokens",
}
DEVICE_READS = {"maskkv_engine/sampling/sampler.py cpu", "maskkv_engine/kv/prefill_capture.py cpu"}
HOST_ONLY = {
    site
    for site in {**CACHED_STEP, **FIRST_PASS, **SPLIT_PER_LAYER, **FINISHING}
    if site not in DEVICE_READS and not site.endswith("to(device)")
}


def by_site(counts: dict[str, int]) -> Counter[str]:
    """'path:line method' -> 'path method' (what a step reads where, robust to edits that move lines)."""
    out: Counter[str] = Counter()
    for key, n in counts.items():
        where, method = key.rsplit(" ", 1)
        out[f"{where.rsplit(':', 1)[0]} {method}"] += n
    return out


def per_step(engine, ids_list: list[list[int]], params) -> dict:
    """Run the requests to the end, counting syncs of the first (full-pass) step and of the denoise steps
    apart. Returns {'first_step': {...}, 'denoise_steps': {...}, 'num_denoise_steps': n, 'batch': b}."""
    for i, ids in enumerate(ids_list):
        engine.add_request(f"sync-{i}", {"prompt_token_ids": ids}, params)
    first: Counter[str] = Counter()
    denoise: Counter[str] = Counter()
    steps = 0
    while engine.has_unfinished_requests():
        with SyncCounter(engine.device) as counter:
            engine.step()
        if steps == 0:
            first = counter.counts
        else:
            denoise.update(counter.counts)
        steps += 1
    return {
        "batch": len(ids_list),
        "first_step": dict(first.most_common()),
        "denoise_steps": dict(denoise.most_common()),
        "num_denoise_steps": steps - 1,
        "first_step_total": sum(first.values()),
        "per_denoise_step": sum(denoise.values()) / max(steps - 1, 1),
        # on the CPU, what would read the device on a GPU: the count less host-only reads and queued copies
        "device_reads_per_denoise_step": sum(n for site, n in by_site(denoise).items() if _reads_device(site))
        / max(steps - 1, 1),
        "first_step_device_reads": sum(n for site, n in by_site(first).items() if _reads_device(site)),
    }


def _reads_device(site: str) -> bool:
    return site not in HOST_ONLY and not site.endswith("to(device)")
