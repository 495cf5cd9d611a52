"""Test helpers shared by several test files."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """(op, output shapes) of every aten call; host syncs and data-dependent shapes are errors."""

    FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique_dim", "_unique2",
                 "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        assert name not in self.FORBIDDEN, f"{name}: a host sync or a data-dependent shape"
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out
