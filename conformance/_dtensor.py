"""A conformance backend of torch DTensors sharded over the ranks of a process group.

:class:`DTensorBackend` lays every array out as a DTensor on a 1-D CPU device
mesh of all ranks, ``Shard(0)`` (uneven shards when the length does not divide:
the suite's 131,089-element parameter splits 65,545 + 65,544 on 2 ranks), so the
suite checks that sharded steps, norm clips included, give numpy's bits. It runs
inside an initialised ``torch.distributed`` process group, every rank calling
the same checks in the same order (``tests/dtensor_conformance.py`` starts 2
gloo ranks on 127.0.0.1 and runs the whole suite); outside one it is
unavailable. Use it as ``--backend agnosticopt.conformance._dtensor:DTensorBackend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend, missing_module

__all__ = ["DTensorBackend"]


class DTensorBackend(Backend):
    """torch DTensors, ``Shard(0)`` over every rank of the default process group."""

    writeable = True

    def __init__(self) -> None:
        super().__init__("torch_dtensor")
        self._mesh: Any = None

    def unavailable(self) -> str | None:
        missing = missing_module("torch")
        if missing:
            return missing
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return (
                "needs an initialised torch.distributed process group (every rank "
                "runs the same checks): see tests/dtensor_conformance.py"
            )
        return None

    def mesh(self) -> Any:
        """The 1-D CPU device mesh of every rank (made once)."""
        if self._mesh is None:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        return self._mesh

    def asarray(self, a: np.ndarray) -> Any:
        import torch
        from torch.distributed.tensor import Shard, distribute_tensor

        t = torch.from_numpy(np.array(a, copy=True))
        if t.ndim == 0:
            from torch.distributed.tensor import Replicate

            return distribute_tensor(t, self.mesh(), [Replicate()])
        return distribute_tensor(t, self.mesh(), [Shard(0)])

    def to_numpy(self, a: Any) -> np.ndarray:
        from torch.distributed.tensor import DTensor

        from agnosticopt import adapter_for

        full = a.full_tensor() if isinstance(a, DTensor) else a
        return adapter_for(full).to_numpy(full)

    def device(self, a: Any) -> Any:
        return a.device
