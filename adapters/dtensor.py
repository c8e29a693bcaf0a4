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

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from agnosticopt.adapters.torch import TorchAdapter, torch_arrays
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from agnosticopt._containers import KeyPath, format_path
from agnosticopt._norm import Node, combine_nodes, finish_norm, node_width, norm_nodes

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
        encoded = []
        for nodes, width in pieces:
            dtype = nodes[0].value.dtype if nodes else torch.float64
            rows = np.empty((len(nodes), 3), dtype=np.float64)
            if nodes:
                rows[:, 0] = [n.level for n in nodes]
                rows[:, 1] = [n.block for n in nodes]
                rows[:, 2] = (
                    torch.cat([n.value.reshape(1) for n in nodes]).double().numpy()
                )
            encoded.append((rows, width, _DTYPE_CODE.get(dtype, 0)))
        return [_as_nodes(found) for found in self.gather_rows(encoded)]

    def gather_rows(
        self, pieces: list[tuple[np.ndarray, int, int]]
    ) -> list[list[tuple[np.ndarray, int]]]:
        """:meth:`gather_many` on arrays: ONE all-gather of rows ``(level, block, value)``.

        ``pieces`` holds, per reduction, this rank's rows (a float64 array of
        shape ``(m, 3)``), the rows reserved for them (the same on every rank) and
        the code of the nodes' dtype (``_DTYPE_CODE``). The message is a float64
        vector: the codes of the pieces, then each piece's rows, unused rows
        ``-1``. Values travel as float64, which holds every float16/bfloat16/
        float32 value and every index exactly. Returns, per piece, the rows and
        the code of every rank that sent any (rank order).
        """
        import torch.distributed as dist

        sent = np.full(len(pieces) + 3 * sum(w for _, w, _ in pieces), -1.0)
        sent[: len(pieces)] = [code for _, _, code in pieces]
        at = len(pieces)
        for rows, width, _ in pieces:
            if len(rows) > width:
                msg = f"{len(rows)} tree nodes do not fit the {width} rows of the exchange"
                raise RuntimeError(msg)
            sent[at : at + rows.size] = rows.reshape(-1)
            at += 3 * width
        message = torch.from_numpy(sent)
        world = dist.get_world_size(self.group)
        out = [torch.empty_like(message) for _ in range(world)]
        dist.all_gather(out, message, group=self.group)
        found: list[list[tuple[np.ndarray, int]]] = [[] for _ in pieces]
        for received in out:
            part = received.numpy()
            at = len(pieces)
            for k, (_, width, _) in enumerate(pieces):
                table = part[at : at + 3 * width].reshape(width, 3)
                at += 3 * width
                used = table[:, 0] >= 0
                if used.any():
                    found[k].append((table[used], int(part[k])))
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
_CODE_NAME = {1: "float64", 2: "float32"}  # the dtypes of the compiled reductions


def _as_nodes(found: list[tuple[np.ndarray, int]]) -> list[Node]:
    """The rows of every rank (:meth:`Shard.gather_rows`) as nodes of torch values."""
    nodes = []
    for rows, code in found:
        values = torch.from_numpy(rows[:, 2].copy()).to(_CODE_DTYPE[code])
        for (level, block), value in zip(rows[:, :2].tolist(), values, strict=True):
            nodes.append(Node(int(level), int(block), value.reshape(1)))
    return nodes


class LocalAdapter(TorchAdapter):
    """The torch adapter of the local shards of DTensor parameters.

    Its own name (``torch-dtensor``) keeps them out of the fast plans of plain
    tensors (a global norm over both raises). Its fast path takes the chains
    with one norm clip too, first or in the middle (:func:`_clip_plan`): the
    clip's exchange between the ranks first, as the plain path does it, then
    the chain on the compiled fast path.
    """

    def __init__(self) -> None:
        super().__init__("torch-dtensor")

    def fast_plan(self, items: list[tuple[Any, Any, Any, Any]]) -> Any:
        from agnosticopt.adapters import _fast

        staged = [k for k, item in enumerate(items) if _needs_other_ranks(item[0])]
        clips = _clip_items(items, staged) if staged else None
        if clips is not None:
            return _clip_plan(self, items, clips)
        skipped = set(staged)
        keep = [k for k in range(len(items)) if k not in skipped]
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


# -- norm clips on the fast path -------------------------------------------------------------
#
# A chain ``ClipNorm, *rest`` or ``ClipGlobalNorm, *rest`` (or the clip alone) on
# local shards needs the other ranks for λ only. :func:`_clip_plan` does that part
# itself, with the collectives of the plain path (``agnosticopt._global``:
# ``ShardNorms`` for the ClipNorm leaves, one exchange per global clip, in the order
# in which the plain path's stages meet them, the same messages), so every rank
# issues the same collectives whichever path its own leaves then take: the fast
# path off, a non-contiguous gradient, a kernel that cannot be built. Each shard's
# tree nodes come from the compiled reduction (the plain path's bits) where its
# gradient can be read in place, else from the plain functions. With λ known, the
# rest of each chain is elementwise: ``_fast.plan`` takes it as ``_AfterClip``; a
# leaf it leaves to the plain path gets the same ``_AfterClip`` (with λ as the plain
# path holds it) as its ``plain_rules`` entry, so that the plain path does not run
# the exchange again (see ``agnosticopt/_commit.py``). A clip in the middle,
# ``*head, clip, *rest`` (``head`` needing no other rank: WeightDecay, SignDecay,
# ...), is reduced over ``head``'s gradient, which the plan computes first with the
# plain functions (the plain path's bits; nothing written); the kernels then take
# the whole chain as ``_AfterHead`` (``head`` again, λ, ``rest``: its state updated
# with the others), and so does the plain path of a leaf the kernels leave. Its λ is
# never applied ahead (no ``SCALE_AT_MOST`` scaling): ``head`` must run first.


class _Clip(NamedTuple):
    """A leaf whose chain has one norm clip, first or after elementwise rules."""

    at: int  # its position in the items
    clip: Any  # the ClipNorm or ClipGlobalNorm
    rest: Any  # the rules after it (an OptimiserChain), None for the clip alone
    shard: Shard
    #: The rules before the clip (an OptimiserChain), None when the clip is first.
    head: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class _AfterHead:
    """A chain ``*head, clip, *rest`` once the clip's λ is known (``after``).

    ``head`` (rules that need no other rank) runs on the gradient, then ``after``
    (an ``_AfterClip``: ``λ·``, then ``rest``) on its result, each on its part of
    the chain's state: the chain's own steps, without the exchange, which
    :func:`_clip_plan` has done on ``head``'s gradient (the plain path's bits:
    the same functions of the local adapter, or the kernels that give them).
    """

    head: Any
    after: Any

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        n = len(self.head.opts)
        sub, dx = self.head.apply(state[:n], x, dx, xp)
        after, step = self.after.apply(state[n:], x, dx, xp)
        return (*sub, *after), step


#: The key of the ClipNorm leaves' stage (``ShardNorms``: all share one exchange).
_NORMS = object()
#: The norms of the compiled reduction.
_COMPILED_P = (2, 1, math.inf)


def _split_chain(rule: Any, parts: dict[int, Any]) -> tuple[Any, Any, Any] | None:
    """``(head, clip, rest)`` of a chain with one rule that needs other ranks, a norm
    clip itself (``head`` None when it is first), else None; the chains of
    ``head`` and ``rest`` are made once per chain (``parts``, by id)."""
    from agnosticopt._wrappers import OptimiserChain

    staged = [i for i, r in enumerate(rule.opts) if _needs_other_ranks(r)]
    if len(staged) != 1:
        return None
    (at,) = staged
    found = parts.get(id(rule))
    if found is None:
        head = OptimiserChain(*rule.opts[:at]) if at else None
        found = parts[id(rule)] = (
            head,
            rule.opts[at],
            OptimiserChain(*rule.opts[at + 1 :]),
        )
    return found


def _clip_items(
    items: list[tuple[Any, Any, Any, Any]], staged: list[int]
) -> list[_Clip] | None:
    """The leaves ``staged`` (those whose rule needs other ranks) as :class:`_Clip` s,
    or None if one of them is not a chain of one norm clip (first, or after rules
    that need no other rank) that the stage can do.

    The answer depends only on what every rank knows alike (the rules, the
    layouts, the lengths), so that all ranks take the same collectives.
    """
    from agnosticopt._clip import ClipNorm
    from agnosticopt._global import ClipGlobalNorm
    from agnosticopt._wrappers import OptimiserChain

    rests: dict[int, Any] = {}
    clips = []
    mesh = None
    for k in staged:
        rule, _, x, _ = items[k]
        clip, rest, head = rule, None, None
        if type(rule) is OptimiserChain and rule.opts:
            split = _split_chain(rule, rests)
            if split is None:
                return None
            head, clip, rest = split
        if not (
            type(clip) is ClipGlobalNorm
            or (type(clip) is ClipNorm and clip.p in _COMPILED_P)
        ):
            return None
        shard = getattr(x, _ATTR, None)
        if not isinstance(shard, Shard) or shard.reason is not None:
            return None  # the plain path raises
        if mesh is not None and shard.mesh != mesh:
            return None
        mesh = shard.mesh
        clips.append(_Clip(k, clip, rest, shard, head))
    totals: dict[Any, int] = {}
    for c in clips:
        if type(c.clip) is ClipGlobalNorm:
            totals[c.clip] = totals.get(c.clip, 0) + c.shard.total
    if any(total == 0 for total in totals.values()):
        return None  # every gradient of a global clip empty: nothing to scale
    return clips


@dataclasses.dataclass
class _ShardPlan:
    """A fast plan of local shards, with the leaves it leaves to the plain path
    and the rules they take there (``plain_rules``, see ``agnosticopt/_commit.py``)."""

    states: list[Any]
    plain_rules: list[Any]
    inner: Any
    #: Arrays the plan made (scaled gradients) that the kernels read: kept alive.
    made: list[Any] = dataclasses.field(default_factory=list)

    @property
    def handled(self) -> list[bool]:
        from agnosticopt.adapters import _fast

        return [s is not _fast.SKIP for s in self.states]

    def run(self) -> None:
        if self.inner is not None:
            self.inner.run()


def _clip_plan(
    xp: LocalAdapter, items: list[tuple[Any, Any, Any, Any]], clips: list[_Clip]
) -> _ShardPlan:
    """Every clip's λ (the collectives), then the fast plan of all leaves.

    The leaves of one global clip share λ, so one wrapper and one kernel group.
    A ClipNorm leaf has its own λ: as in ``adapters/_fast.py``, a shard of at
    most :data:`~agnosticopt.adapters._fast.SCALE_AT_MOST` elements whose
    gradient a kernel can read gets ``λ·dx`` (the plain path's product) as its
    gradient and a wrapper shared by every such leaf of its chain (one recorded
    program and one kernel call); a larger one keeps its gradient and gets a
    wrapper holding λ.
    """
    from agnosticopt.adapters import _fast

    from agnosticopt._clip import ClipNorm

    arrays = torch_arrays(xp)
    staged = list(items)  # a clip after a head: the head's gradient, for the exchange
    for c in clips:
        if c.head is not None:
            _, state, x, dx = items[c.at]
            n = len(c.head.opts)
            staged[c.at] = (None, None, x, c.head.apply(state[:n], x, dx, xp)[1])
    lams = _clip_stage(xp, staged, clips)
    plain_rules: list[Any] = [None] * len(items)
    offered = dict(enumerate(items))
    wrappers: dict[Any, Any] = {}
    made: list[Any] = []  # the scaled gradients, which the kernels read
    for c, (plain, fast) in zip(clips, lams, strict=True):
        if c.head is not None:  # the kernels run the head again, then λ and the rest
            plain_rules[c.at] = _AfterHead(c.head, _fast._AfterClip(c.rest, plain))
            if fast is None:
                del offered[c.at]
                continue
            key = (id(c.head), id(c.rest), fast.dtype.str, fast.tobytes())  # one λ
            wrapper = wrappers.get(key)
            if wrapper is None:
                after = _fast._AfterClip(c.rest, fast)
                wrapper = wrappers[key] = (_AfterHead(c.head, after), fast)
            offered[c.at] = (wrapper[0], *items[c.at][1:])
            continue
        plain_rules[c.at] = _fast._AfterClip(c.rest, plain)
        if fast is None:  # not a dtype of the kernels
            del offered[c.at]
            continue
        _, state, x, dx = items[c.at]
        scale = (  # small ClipNorm shards: one group (a global clip has one λ)
            type(c.clip) is ClipNorm
            and 0 < dx.numel() <= _fast.SCALE_AT_MOST
            and arrays.dtype(dx) == fast.dtype.name
        )
        wrapper, dx = _fast.clipped_by(arrays, c.rest, fast, dx, wrappers, scale=scale)
        if scale:
            made.append(dx)
        offered[c.at] = (wrapper, state, x, dx)
    states: list[Any] = [_fast.SKIP] * len(items)
    positions = list(offered)
    plan = _fast.plan(arrays, list(offered.values())) if positions else None
    if plan is not None:
        for k, state in zip(positions, plan.states, strict=True):
            states[k] = state
    for c in clips:
        if states[c.at] is not _fast.SKIP:
            plain_rules[c.at] = None
    return _ShardPlan(states, plain_rules, plan, made)


def _clip_stage(
    xp: LocalAdapter, items: list[tuple[Any, Any, Any, Any]], clips: list[_Clip]
) -> list[tuple[Any, Any]]:
    """λ of every clip leaf, as the plain path has it and as a kernel parameter.

    The stages in the order in which the plain path's ``run_stages`` meets them
    (first appearance in tree order), one exchange each, the plain path's
    messages; a ClipNorm of an empty array needs none. Raises what the plain
    path raises (``throw``), before anything is written and on every rank (the
    norm is the same everywhere).
    """
    from agnosticopt._clip import ClipNorm

    lams: list[Any] = [None] * len(clips)
    stages: dict[Any, list[int]] = {}
    for i, c in enumerate(clips):
        if type(c.clip) is not ClipNorm:
            stages.setdefault(c.clip, []).append(i)
        elif c.shard.total:
            stages.setdefault(_NORMS, []).append(i)
        else:  # as shard_norm_nodes: the norm of an empty array is 0
            _, _, x, dx = items[c.at]
            lam = c.clip.factor(xp.scalar_type(dx)(0), x, xp)
            lams[i] = (lam, _kernel_scalar(lam))
    for key, members in stages.items():
        chosen = [clips[i] for i in members]
        found = (
            _clip_norms(xp, items, chosen)
            if key is _NORMS
            else _global_clip(xp, items, chosen)
        )
        for i, lam in zip(members, found, strict=True):
            lams[i] = lam
    return lams


def _clip_norms(
    xp: LocalAdapter, items: list[tuple[Any, Any, Any, Any]], chosen: list[_Clip]
) -> list[tuple[Any, Any]]:
    """λ of ClipNorm leaves: ``ShardNorms``'s exchange (one piece per leaf)."""
    pieces = _local_nodes(
        xp,
        [
            (items[c.at][3], c.shard.offset, None, c.clip.p, c.shard.contributes)
            for c in chosen
        ],
    )
    found = chosen[0].shard.gather_rows(
        [
            (rows, node_width(c.shard.total), code)
            for c, (rows, code) in zip(chosen, pieces, strict=True)
        ]
    )
    lams = []
    for c, rows in zip(chosen, found, strict=True):
        _, _, x, dx = items[c.at]
        real = xp.scalar_type(dx)
        n = real(xp.to_host(_root(rows, c.shard.total, c.clip.p)[0]))
        if c.clip.p == 2:
            n = np.sqrt(n)
        try:
            lam = c.clip.factor(n, x, xp)
        except Exception as exc:  # throw: FloatingPointError, named by its key path
            exc.agnosticopt_item = c.at  # type: ignore[attr-defined]
            raise
        lams.append((lam, _kernel_scalar(lam)))
    return lams


def _global_clip(
    xp: LocalAdapter, items: list[tuple[Any, Any, Any, Any]], chosen: list[_Clip]
) -> list[tuple[Any, Any]]:
    """λ of the leaves of one ClipGlobalNorm: one piece, every leaf at its offset."""
    from agnosticopt._global import Part, _reduction_dtype

    clip = chosen[0].clip
    parts = [Part((), xp, items[c.at][2], items[c.at][3]) for c in chosen]
    dtype = _reduction_dtype(parts)
    wanted: list[tuple[Any, int, str | None, float, bool]] = []
    offset = width = 0
    for c, part in zip(chosen, parts, strict=True):
        wanted.append(
            (part.dx, offset + c.shard.offset, dtype, clip.p, c.shard.contributes)
        )
        offset += c.shard.total
        width += node_width(c.shard.total)
    pieces = _local_nodes(xp, wanted)
    rows = np.concatenate([r for r, _ in pieces])
    code = next((code for r, code in pieces if len(r)), _DTYPE_CODE[torch.float64])
    (found,) = chosen[0].shard.gather_rows([(rows, width, code)])
    value = finish_norm(xp, _root(found, offset, clip.p), clip.p)
    shared = clip.factors(xp, value, dtype, parts)
    return [(lam, _kernel_scalar(lam)) for lam in shared]


def _kernel_scalar(lam: Any) -> Any:
    """λ as a numpy scalar for a kernel (float32/float64), else None.

    None for a λ off the CPU too: the kernels read CPU memory only, and reading
    it back would synchronise with its device.
    """
    if isinstance(lam, torch.Tensor):
        name = {torch.float32: "float32", torch.float64: "float64"}.get(lam.dtype)
        if name is None or not lam.is_cpu:
            return None
        return np.dtype(name).type(lam.item())
    return lam if isinstance(lam, np.float32 | np.float64) else None


#: The rows of a rank that sends no node, and their code (as ``gather_many``'s).
_NO_ROWS = (np.empty((0, 3), dtype=np.float64), 1)


def _local_nodes(
    xp: LocalAdapter, wanted: list[tuple[Any, int, str | None, float, bool]]
) -> list[tuple[np.ndarray, int]]:
    """This rank's tree nodes of pieces ``(dx, offset, dtype, p, contributes)``.

    Rows ``(level, block, value)`` and the nodes' dtype code per piece: the
    compiled reduction for a float32/float64 gradient that a kernel can read
    (in the reduction dtype ``dtype``; ``None``: its own), else the plain
    path's :func:`~agnosticopt._norm.norm_nodes`. The same nodes and bits
    either way.
    """
    from agnosticopt.adapters import _fast

    arrays = torch_arrays(xp)
    compiled = _fast.available()
    out: list[tuple[np.ndarray, int]] = [_NO_ROWS] * len(wanted)
    batches: dict[tuple[str, float], list[int]] = {}
    for j, (dx, offset, dtype, p, contributes) in enumerate(wanted):
        if not contributes or dx.numel() == 0:
            continue
        name = arrays.dtype(dx) if compiled else None
        if name is not None and dtype in (None, name):
            batches.setdefault((name, p), []).append(j)
            continue
        nodes, _ = norm_nodes(xp, dx, p, offset, dtype)
        rows = np.empty((len(nodes), 3), dtype=np.float64)
        if nodes:
            rows[:, 0] = [n.level for n in nodes]
            rows[:, 1] = [n.block for n in nodes]
            rows[:, 2] = torch.cat([n.value.reshape(1) for n in nodes]).double().numpy()
        code = _DTYPE_CODE.get(nodes[0].value.dtype, 0) if nodes else _NO_ROWS[1]
        out[j] = (rows, code)
    if batches:
        from agnosticopt.adapters._numba import piece_nodes

        for (name, p), js in batches.items():
            found = piece_nodes(
                name,
                p,
                np.array([arrays.address(wanted[j][0]) for j in js], dtype=np.int64),
                np.array([wanted[j][0].numel() for j in js], dtype=np.int64),
                np.array([wanted[j][1] for j in js], dtype=np.int64),
            )
            code = _DTYPE_CODE[getattr(torch, name)]
            for j, (levels, blocks, values) in zip(js, found, strict=True):
                rows = np.empty((len(levels), 3), dtype=np.float64)
                rows[:, 0], rows[:, 1], rows[:, 2] = levels, blocks, values
                out[j] = (rows, code)
    return out


def _root(found: list[tuple[np.ndarray, int]], total: int, p: float) -> Any:
    """The root of the tree (a one-element tensor of the nodes' dtype) from every rank's rows.

    The compiled fold where the nodes are float32/float64 and cover ``[0, total)``
    once; otherwise :func:`~agnosticopt._norm.combine_nodes` on torch values (the
    plain path's finish, which also says what is wrong with a bad cover).
    """
    from agnosticopt.adapters import _fast

    name = _CODE_NAME.get(found[0][1]) if found else None
    if name is not None and _fast.available():
        rows = np.concatenate([r for r, _ in found])
        levels, blocks = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        starts = blocks << levels
        order = np.argsort(starts, kind="stable")
        levels, blocks, starts = levels[order], blocks[order], starts[order]
        ends = starts + (np.int64(1) << levels)
        top = (total - 1).bit_length()
        if (
            len({code for _, code in found}) == 1
            and starts[0] == 0
            and ends[-1] == total
            and bool(np.all(starts[1:] == ends[:-1]))
            and bool(np.all((levels >= 0) & (levels <= top)))
        ):
            from agnosticopt.adapters._numba import nodes_root

            values = rows[order, 2].astype(name)
            return torch.from_numpy(
                np.array([nodes_root(name, p, levels, blocks, values)])
            )
    combine = _LOCAL.maximum if p == math.inf else _LOCAL.add
    return combine_nodes(_as_nodes(found), total, combine)


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
