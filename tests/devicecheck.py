"""The meta device as a stand-in accelerator, and a dispatch mode that fails on any operation
mixing devices.

These machines have no GPU. A model on the `meta` device runs forward and backward with real
shapes and no data, and most operations that mix a meta tensor with a CPU tensor raise, exactly
as they would with a CUDA tensor; some do not (an embedding lookup with CPU ids works). The mode
below closes that gap: every ATen operation is checked for tensors on more than one device,
except explicit copies. Reading values back (`.item()`, `.cpu()`) is answered with zeros, so
a whole training loop, checkpoints included, runs with its model "on the accelerator".
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ATEN = torch.ops.aten
TRANSFERS = {ATEN._to_copy.default, ATEN.copy_.default, ATEN._copy_from.default, ATEN._copy_from_and_resize.default}


class DeviceMismatch(AssertionError):
    pass


class MetaAccelerator(TorchDispatchMode):
    """Fail on operations whose tensors live on different devices; answer reads of meta data."""

    def __init__(self) -> None:
        super().__init__()
        self.ops_on_meta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "meta" in devices:
            self.ops_on_meta += 1
        if len(devices) > 1 and func not in TRANSFERS:
            shapes = [(t.device.type, tuple(t.shape)) for t in tensors]
            raise DeviceMismatch(f"{func} mixes devices: {shapes}")
        if func in (ATEN._local_scalar_dense.default, ATEN.is_nonzero.default) and args[0].device.type == "meta":
            return (False if func is ATEN.is_nonzero.default or args[0].dtype == torch.bool
                    else 0.0 if args[0].dtype.is_floating_point else 0)
        if func is ATEN._to_copy.default and args[0].device.type == "meta" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)
