"""Where a PyTorch computation would make the host wait for a GPU, and where its tensors live.

For tests and benchmarks; no stage imports this module. :class:`TorchAudit` is a
``TorchFunctionMode``: a context manager that sees every torch function and tensor method
called from Python (``nn`` layers included) in the calling thread only (PyTorch keeps its
mode stack per thread), so run the code under watch in that thread
(``TorchMTCNN(num_threads=1)`` does on the CPU). It records:

* host syncs: the calls that, on a GPU, block the host until the device has caught up:
  copies to the host (``.cpu()``, ``.tolist()``, ``.item()``, ``int(t)``/``float(t)``/``bool(t)``)
  and operations whose output size depends on the data (``nonzero``, indexing or
  assignment with a boolean mask, ``unique``, ``masked_select``, ``bincount``,
  ``repeat_interleave`` without ``output_size``). They are counted on the CPU too, where
  they cost nothing, so a CPU test can bound them;
* tensors made from scratch (``torch.zeros``, ``arange``, ``tensor``, ...) without an explicit
  ``device=``: those land on the default device (the CPU) whatever device the
  computation runs on;
* "strays": calls returning a tensor on another device than the expected one, except
  the deliberate host tensors (``from_numpy``, ``pin_memory``, copies to the host).

Each record names the first caller outside torch and this module (``file:line (function)``).

(A ``TorchDispatchMode`` would see the operators inside C++ too, but entering one makes
PyTorch import ``torch._dynamo`` and with it Triton, which crashes a process that has
already loaded TensorFlow, as the tests that compare with the ``mtcnn`` package do.)
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["TorchAudit"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)

_HOST_READS = {"cpu": "copy to host", "tolist": "copy to host", "item": "scalar to host",
               "__int__": "scalar to host", "__float__": "scalar to host", "__bool__": "scalar to host",
               "__index__": "scalar to host"}
_DATA_SIZED = {"nonzero": "nonzero", "argwhere": "nonzero", "unique": "unique", "unique_consecutive": "unique",
               "masked_select": "masked_select", "bincount": "bincount"}
_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
              "randint", "randperm", "tensor", "as_tensor", "empty_strided", "scalar_tensor", "tril_indices",
              "triu_indices"}
_HOST_RESULTS = {"from_numpy", "pin_memory", "numpy", "cpu", "tolist"}  # deliberate host tensors


def _caller() -> str:
    """``file:line (function)`` of the first frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_TORCH_DIR) and name != _THIS_FILE:
            return f"{os.path.relpath(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class TorchAudit(TorchFunctionMode):
    """Records host syncs, device-less factories and tensors off ``device``.

    ``counts``: ``Counter`` of sync kind ("copy to host", "scalar to host", "nonzero",
    "boolean mask", ...); ``sites``: ``Counter`` of ``(kind, caller)``; ``undeviced``:
    ``Counter`` of ``(function, caller)`` for factories called without ``device=``;
    ``strays``: ``Counter`` of ``(function, tensor device, caller)``; ``calls``: every call seen.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str]] = Counter()
        self.undeviced: Counter[tuple[str, str]] = Counter()
        self.strays: Counter[tuple[str, str, str]] = Counter()
        self.calls = 0

    @property
    def syncs(self) -> int:
        return sum(self.counts.values())

    def _note(self, kind: str) -> None:
        self.counts[kind] += 1
        self.sites[(kind, _caller())] += 1

    def _expected(self, device: torch.device) -> bool:
        if device.type != self.device.type:
            return False
        return self.device.index is None or device.index == self.device.index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self._note(_HOST_READS[name])
        elif name in _DATA_SIZED:
            self._note(_DATA_SIZED[name])
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            self._note("repeat_interleave")
        elif name == "where" and len(args) + len(kwargs) == 1:
            self._note("nonzero")
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
            self._note("boolean mask")
        elif name in _FACTORIES and getattr(func, "__module__", "") == "torch" and kwargs.get("device") is None:
            self.undeviced[(name, _caller())] += 1
        out = func(*args, **kwargs)
        if name not in _HOST_RESULTS:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not self._expected(t.device):
                    self.strays[(name, str(t.device), _caller())] += 1
        return out
