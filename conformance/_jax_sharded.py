"""A conformance backend of JAX arrays sharded over a mesh of 2 or more devices.

:class:`JaxShardedBackend` places every array with a ``NamedSharding`` over a
1-D mesh of all JAX devices: split on its first axis where that length divides
by the device count, replicated otherwise (0-d arrays, odd lengths). On one CPU
JAX must start with several host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX is
imported), so ``tests/test_conformance_sharded.py`` runs it in a subprocess
(``tests/_jax_sharded_conformance.py``); with fewer than 2 devices it is
unavailable. The JAX adapter's declared deviation (``flushes_subnormals``)
applies as on one device. Use it as
``--backend agnosticopt.conformance._jax_sharded:JaxShardedBackend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from agnosticopt.conformance._backends import JaxBackend

__all__ = ["JaxShardedBackend"]


class JaxShardedBackend(JaxBackend):
    """JAX arrays, ``NamedSharding`` on dim 0 over every device where it divides."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "jax_sharded"
        self._mesh: Any = None
        #: The partition specs of the arrays ``to_numpy`` was given (``"P('d',)"``, ``"P()"``).
        self.seen: set[str] = set()

    def unavailable(self) -> str | None:
        missing = super().unavailable()
        if missing:
            return missing
        import jax

        if len(jax.devices()) < 2:
            return (
                "needs 2 or more JAX devices (on CPU: "
                "XLA_FLAGS=--xla_force_host_platform_device_count=2 before JAX starts)"
            )
        return None

    def mesh(self) -> Any:
        """The 1-D mesh ``("d",)`` of every device, auto sharding (made once)."""
        if self._mesh is None:
            import jax
            from jax.sharding import AxisType

            self._mesh = jax.make_mesh(
                (len(jax.devices()),), ("d",), axis_types=(AxisType.Auto,)
            )
        return self._mesh

    def asarray(self, a: np.ndarray) -> Any:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = self.mesh()
        split = a.ndim > 0 and a.shape[0] % mesh.size == 0
        sharding = NamedSharding(mesh, P("d") if split else P())
        return jax.device_put(np.array(a, copy=True), sharding)

    def to_numpy(self, a: Any) -> np.ndarray:
        spec = getattr(getattr(a, "sharding", None), "spec", None)
        if spec is not None:
            self.seen.add(str(spec))
        return np.array(a, copy=True)

    def device(self, a: Any) -> Any:
        return a.sharding
