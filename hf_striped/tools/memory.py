"""Measure the tensor memory a piece of code allocates, on any device, without a profiler."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated under this mode and still alive (``live``), and their
    peak (``peak``).

    Every op's output storage is counted once when first seen and uncounted when Python frees
    it (storages keep their Python object, so ``weakref.finalize`` fires exactly then). Views and
    in-place results share an input's storage and are not counted. Tensors that existed before
    the mode was entered are not counted either::

        with LiveBytes() as mem:
            loss = model(**batch).loss
            loss.backward()
        print(mem.peak / 2**20, "MiB")
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, nbytes)
        return out
