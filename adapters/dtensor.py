"""torch DTensor (FSDP2 ``fully_shard``, ``distribute_tensor``): compute on the local shards.

A DTensor parameter is updated through its local tensor: ``update_`` hands the
rules (and the compiled fast path) the plain local shard of the parameter, of
its gradient and of every state array, so every operation is the exact torch
adapter's and the bits are those of one process; writes go into the local
tensors, which are the DTensors' memory. States are DTensors with the
parameter's placements (so ``torch.distributed.checkpoint`` reshards them).

Reductions (:class:`~agnosticopt.ClipNorm`, :class:`~agnosticopt.ClipGlobalNorm`)
see a local shard marked with its :class:`Shard` (``_agnosticopt_shard``): the
shard reduces the aligned-block tree nodes of its global index range
(``agnosticopt._norm.reduce_piece``), the nodes of every rank are exchanged in
one small all-gather, and every rank finishes the same tree: the same bits for
any shard count, uneven and empty shards included. The ClipNorm leaves of one
update share that all-gather (:meth:`Shard.gather_many`, staged by
``agnosticopt._global.ShardNorms``), as the leaves of a global clip do.

Only placements whose local shard is one contiguous range of the flattened
array take part in reductions: ``Shard(0)`` and ``Replicate()`` on a 1-D mesh
(FSDP2's layout). Others are updated elementwise; a norm over them raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from agnosticopt.adapters.torch import TorchAdapter, torch_arrays
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from agnosticopt._containers import KeyPath, format_path
from agnosticopt._norm import Node

__all__ = ["DTensorAdapter", "LocalAdapter", "Shard", "adapter", "is_dtensor"]

_ATTR = "_agnosticopt_shard"


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (an FSDP2 parameter included)."""
    return isinstance(x, DTensor)


class Shard:
    """Where a local shard lies in its whole array, and how to reach the other ranks.

    Attributes
    ----------
    offset
        Global index (flattened, C order) of the shard's first element.
    total
        Number of elements of the whole array.
    contributes
        False on the ranks that hold a replicated copy they do not reduce (all
        but the first rank of the mesh).
    reason
        Why the shard cannot take part in a reduction (``None`` if it can).
    """

    def __init__(self, x: DTensor) -> None:
        mesh, placements = x.device_mesh, tuple(x.placements)
        self.mesh = mesh
        self.group = mesh.get_group() if mesh.ndim == 1 else None
        self.total = math.prod(x.shape)
        self.offset = 0
        self.contributes = True
        self.reason: str | None = None
        if mesh.ndim != 1:
            self.reason = f"a {mesh.ndim}-D device mesh"
        elif isinstance(placements[0], Replicate):
            self.contributes = mesh.get_local_rank() == 0
        elif isinstance(placements[0], ShardPlacement) and placements[0].dim == 0:
            _, start = compute_local_shape_and_global_offset(x.shape, mesh, placements)
            inner = math.prod(x.shape[1:])
            self.offset = start[0] * inner if x.ndim else 0
        else:
            self.reason = f"placements {placements} (not Shard(0) or Replicate())"

    def check(self, what: str) -> None:
        """Raise if this shard cannot take part in the reduction ``what``."""
        if self.reason is not None:
            msg = (
                f"{what} of a DTensor with {self.reason}: the local shard is not one "
                "contiguous range of the array; use Shard(0) or Replicate() on a 1-D mesh "
                "(FSDP2's layout)"
            )
            raise ValueError(msg)

    def gather(self, nodes: list[Node], width: int) -> list[Node]:
        """The nodes of every rank: one all-gather of ``width`` rows ``(level, block, value)``.

        ``width`` (the same on every rank) bounds the number of nodes of a rank.
        Values travel as float64, which holds every float16/bfloat16/float32 value
        and every index exactly.
        """
        return self.gather_many([(nodes, width)])[0]

    def gather_many(self, pieces: list[tuple[list[Node], int]]) -> list[list[Node]]:
        """The nodes of every rank for several reductions at once: ONE all-gather.

        ``pieces`` holds, per reduction, this rank's nodes and the number of rows
        reserved for them, a bound known alike on every rank (``node_width`` of
        the array's length): every rank sends the same layout, the pieces in the
        same order, so each reduction finds its rows at the same place in every
        rank's message. Returns, per piece, the nodes of every rank (rank order).
        """
        import torch.distributed as dist

        kinds, tables = [], []
        for nodes, width in pieces:
            if len(nodes) > width:
                msg = f"{len(nodes)} tree nodes do not fit the {width} rows of the exchange"
                raise RuntimeError(msg)
            dtype = nodes[0].value.dtype if nodes else torch.float64
            kinds.append(float(_DTYPE_CODE.get(dtype, 0)))
            rows = torch.full((width, 3), -1.0, dtype=torch.float64)
            if nodes:
                rows[: len(nodes), 0] = torch.tensor(
                    [n.level for n in nodes], dtype=torch.float64
                )
                rows[: len(nodes), 1] = torch.tensor(
                    [n.block for n in nodes], dtype=torch.float64
                )
                rows[: len(nodes), 2] = torch.cat(
                    [n.value.reshape(1) for n in nodes]
                ).double()
            tables.append(rows.reshape(-1))
        sent = torch.cat([torch.tensor(kinds, dtype=torch.float64), *tables])
        world = dist.get_world_size(self.group)
        out = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(out, sent, group=self.group)
        found: list[list[Node]] = [[] for _ in pieces]
        for part in out:
            at = len(pieces)
            for k, (_, width) in enumerate(pieces):
                table = part[at : at + 3 * width].reshape(width, 3)
                at += 3 * width
                used = table[:, 0] >= 0
                if not bool(used.any()):
                    continue
                values = table[used, 2].to(_CODE_DTYPE[int(part[k])])
                for (level, block), value in zip(
                    table[used, :2].tolist(), values, strict=True
                ):
                    found[k].append(Node(int(level), int(block), value.reshape(1)))
        return found

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t[0])

    def sum_count(self, count: int) -> int:
        """The sum of ``count`` over the contributing ranks (one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor([count if self.contributes else 0], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return int(t[0])


_DTYPE_CODE = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


class LocalAdapter(TorchAdapter):
    """The torch adapter of the local shards of DTensor parameters.

    Its own name (``torch-dtensor``) keeps them out of the fast plans of plain
    tensors (a global norm over both raises); its fast path leaves norm clips,
    which need the other ranks, to the plain path.
    """

    def __init__(self) -> None:
        super().__init__("torch-dtensor")

    def fast_plan(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        from agnosticopt.adapters import _fast

        keep = [k for k, item in enumerate(items) if not _needs_other_ranks(item[0])]
        if not keep:
            return None
        plan = _fast.plan(torch_arrays(self), [items[k] for k in keep])
        if plan is None:
            return None
        states: list[Any] = [_fast.SKIP] * len(items)
        for k, state in zip(keep, plan.states, strict=True):
            states[k] = state
        plan.states = states
        return plan


def _needs_other_ranks(rule: Any) -> bool:
    """Whether ``rule`` is or holds a norm clip (a reduction over the whole array)."""
    from agnosticopt._clip import ClipNorm
    from agnosticopt._global import has_stages

    if isinstance(rule, ClipNorm) or has_stages(rule):
        return True
    inner = getattr(rule, "opts", None) or (
        [rule.rule] if hasattr(rule, "rule") else []
    )
    return any(_needs_other_ranks(r) for r in inner)


_LOCAL = LocalAdapter()


class DTensorAdapter(TorchAdapter):
    """Adapter of DTensors: the tree steps them through :meth:`local_view`.

    Called directly (``apply`` on a DTensor) its operations are torch's on
    DTensors, which are not all exact (``sqrt``): use ``update``/``update_``.
    """

    def __init__(self) -> None:
        super().__init__("torch-dtensor")

    local_adapter = _LOCAL

    def check_pickle(self, x: DTensor) -> None:
        """Refuse to pickle a sharded state (``dcp.save`` would keep one rank's shard)."""
        if all(isinstance(p, Replicate) for p in x.placements):
            return
        msg = (
            f"a Leaf whose state holds a DTensor with placements {tuple(x.placements)} "
            "cannot be pickled: each rank holds another shard, and "
            "torch.distributed.checkpoint saves a pickled object from one rank only. "
            "Save opt.state_dict(tree) (a flat mapping of DTensors, which dcp.save "
            "shards) and load it with opt.load_state_dict, or use opt.TorchOptimizer "
            "with get_optimizer_state_dict (see docs/scaling.md)"
        )
        raise TypeError(msg)

    def local(self, x: DTensor) -> torch.Tensor:
        """The local shard of ``x``, marked with its :class:`Shard`."""
        return _marked_local(x)

    def local_grad(self, x: DTensor, g: Any, path: KeyPath) -> Any:
        """The local shard of gradient ``g``; raise if it is not laid out as ``x``."""
        if not isinstance(g, DTensor):
            msg = (
                f"the parameter at {format_path(path)} is a DTensor but its gradient is a "
                f"{type(g).__name__}; give the DTensor gradient (p.grad), not its local "
                "shard (or give plain tensors for both)"
            )
            raise TypeError(msg)
        if g.device_mesh != x.device_mesh or tuple(g.placements) != tuple(x.placements):
            msg = (
                f"the gradient at {format_path(path)} is a DTensor with placements "
                f"{tuple(g.placements)} on {g.device_mesh}, but the parameter has "
                f"{tuple(x.placements)} on {x.device_mesh}; redistribute it first"
            )
            raise ValueError(msg)
        if g.shape != x.shape:
            msg = (
                f"the gradient at {format_path(path)} has shape {tuple(g.shape)}, but the "
                f"parameter has shape {tuple(x.shape)}"
            )
            raise ValueError(msg)
        return g._local_tensor

    def local_state(self, x: DTensor, state: Any) -> Any:
        """``state`` with every DTensor replaced by its local tensor."""
        return _map_tensors(state, _marked_local)

    def wrap_state(self, x: DTensor, local: torch.Tensor, state: Any) -> Any:
        """A new local ``state`` as DTensors laid out as ``x`` (arrays of the shard's shape)."""
        return _map_tensors(state, lambda t: self.wrap(x, local, t))

    def wrap(self, x: DTensor, local: torch.Tensor, t: Any) -> Any:
        """Local tensor ``t`` as a DTensor of ``x``'s layout if it has the shard's shape."""
        if (
            not isinstance(t, torch.Tensor)
            or isinstance(t, DTensor)
            or t.shape != local.shape
        ):
            return t
        return DTensor.from_local(
            t,
            x.device_mesh,
            x.placements,
            run_check=False,
            shape=x.shape,
            stride=x.stride(),
        )

    def rewrap(self, old: Any, new: Any) -> Any:
        if isinstance(new, DTensor):
            return new
        return self.wrap(old, old._local_tensor, new)


def _marked_local(t: Any) -> Any:
    """A DTensor's local tensor, marked with its :class:`Shard` (others unchanged)."""
    if not isinstance(t, DTensor):
        return t
    local = t._local_tensor
    setattr(local, _ATTR, Shard(t))
    return local


def _map_tensors(state: Any, fn: Callable[[Any], Any]) -> Any:
    """``state`` (tensors in tuples, named tuples, lists, dicts) with ``fn`` on each tensor."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple):
        items = [_map_tensors(s, fn) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
    if isinstance(state, list):
        return [_map_tensors(s, fn) for s in state]
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn) for k, v in state.items()}
    return state


_ADAPTER = DTensorAdapter()


def adapter(x: Any) -> DTensorAdapter | None:
    """The DTensor adapter for a DTensor ``x`` (None otherwise)."""
    return _ADAPTER if isinstance(x, DTensor) else None


def marked_local(t: Any) -> bool:
    """Whether plain tensor ``t`` is (a view of) the local shard of a DTensor."""
    base = t._base if t._base is not None else t
    return hasattr(base, _ATTR) or hasattr(t, _ATTR)
