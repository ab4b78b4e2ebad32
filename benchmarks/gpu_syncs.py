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
    }
