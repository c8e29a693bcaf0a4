"""Rules that need a value reduced over every leaf: global-norm clipping, skipping.

Most rules update each array on its own. A *cross-leaf* rule
(:class:`CrossLeaf`) needs one value computed from the steps of **all** leaves
at its place in the chain: the global norm of :class:`ClipGlobalNorm`, the
"is every gradient finite" of :class:`SkipNonFinite`. The tree runs such chains
in stages (:func:`run_stages`, called by ``update``/``update_`` before any
write):

1. every leaf runs its chain up to the cross-leaf rule, which *yields* a
   request (the rule and the leaf's step at that point);
2. the requests of equal rules are handed to the rule's :meth:`CrossLeaf.reduce`
   together, in tree order (the order of :func:`agnosticopt.trainables`), which
   returns one shared value per leaf (the clip factor);
3. each leaf resumes its chain with that value, up to the next cross-leaf rule
   or the end.

Chains are generators: :func:`staged` runs a rule, ``yield from``-ing into the
rules that have stages (:class:`~agnosticopt.OptimiserChain`,
:class:`~agnosticopt.MixedPrecision`, :class:`SkipNonFinite`, and types given to
:func:`register_staged`). A rule called directly with ``apply`` cannot see the
other leaves: :class:`CrossLeaf` rules raise there.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agnosticopt._clip import ClipNorm
from agnosticopt._containers import KeyPath, format_path
from agnosticopt._norm import (
    ShardNorm,
    combine_nodes,
    finish_norm,
    node_width,
    norm_nodes,
    shard_norm_finish,
    shard_norm_nodes,
    shard_of,
)
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import NONNEGATIVE_OR_INF, Replace, Rule, hyperparameter
from agnosticopt._wrappers import MixedPrecision, MixedPrecisionState, OptimiserChain

__all__ = [
    "ClipGlobalNorm",
    "CrossLeaf",
    "Part",
    "Request",
    "ShardNorms",
    "SkipNonFinite",
    "SkipNonFiniteState",
    "cross_leaf_plain",
    "has_stages",
    "register_staged",
    "run_stages",
    "staged",
]

Staged = Generator["Request", Any, tuple[Any, Any]]


class Request(NamedTuple):
    """What a leaf's chain yields at a cross-leaf rule: the rule and its input."""

    rule: CrossLeaf
    dx: Any


class Part(NamedTuple):
    """One leaf's share of a cross-leaf reduction, as :meth:`CrossLeaf.reduce` sees it."""

    path: KeyPath
    xp: RuleNamespace
    x: Any
    dx: Any


@dataclass(frozen=True)
class CrossLeaf(Rule):
    """Base class of rules whose step needs a reduction over every leaf.

    A subclass defines :meth:`reduce` (all leaves at once) and :meth:`finish`
    (one leaf, given its shared value), or overrides :meth:`apply_staged`.
    Equal rules (``==``) met at the same stage of one update reduce together,
    so one ``ClipGlobalNorm(1.0)`` in the chains of two parts of a model (per-path
    rules) clips by the norm of both parts.
    """

    def init(self, x: Any, xp: RuleNamespace) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> tuple[Any, Any]:
        msg = (
            f"{type(self).__name__} reduces over every leaf of a model: use it through "
            "setup and update/update_ (alone, in an OptimiserChain or a MixedPrecision), "
            "not by calling apply on one array"
        )
        raise TypeError(msg)

    def apply_staged(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> Staged:
        """One leaf's step: yield the request, then :meth:`finish` with the answer."""
        shared = yield Request(self, dx)
        return self.finish(state, x, dx, xp, shared)

    def reduce(self, parts: list[Part]) -> list[Any]:
        """The shared value of every leaf, from all their inputs (tree order)."""
        raise NotImplementedError

    def finish(
        self, state: Any, x: Any, dx: Any, xp: RuleNamespace, shared: Any
    ) -> tuple[Any, Any]:
        """``(new_state, step)`` of one leaf, given its shared value."""
        raise NotImplementedError


_WIDTH = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
_REAL = {"complex64": "float32", "complex128": "float64"}


def _real_name(xp: RuleNamespace, a: Any) -> str:
    name = xp.dtype_name(a)
    return _REAL.get(name, name)


def _reduction_dtype(parts: list[Part]) -> str:
    """The widest real dtype of the parts (float32 for float16 with bfloat16)."""
    names = {_real_name(p.xp, p.dx) for p in parts}
    if len(names) == 1:
        return names.pop()
    widest = max(_WIDTH[n] for n in names)
    return "float32" if widest == 16 else f"float{widest}"


def one_backend(rule: str, parts: list[Part]) -> Any:
    """The adapter shared by every part; raise naming two paths if there are two."""
    first = parts[0]
    for part in parts[1:]:
        if part.xp.name != first.xp.name:
            msg = (
                f"{rule}: the gradient at {format_path(first.path)} is a {first.xp.name} "
                f"array and the one at {format_path(part.path)} a {part.xp.name} array; "
                "a reduction over every leaf needs them on one backend"
            )
            raise TypeError(msg)
    return first.xp


def _shards(rule: str, parts: list[Part]) -> list[Any]:
    """Each part's shard (:func:`agnosticopt._norm.shard_of`): all or none, on one mesh."""
    shards = [shard_of(p.x) for p in parts]
    sharded = [k for k, s in enumerate(shards) if s is not None]
    if not sharded:
        return shards
    plain = [k for k, s in enumerate(shards) if s is None]
    if plain:
        msg = (
            f"{rule}: the parameter at {format_path(parts[sharded[0]].path)} is sharded "
            f"(a DTensor) and the one at {format_path(parts[plain[0]].path)} is not; a "
            "reduction over every leaf needs all of them DTensors on one mesh (make the "
            "others DTensors with Replicate() placements, or give them their own rule)"
        )
        raise TypeError(msg)
    first = shards[0]
    for k, shard in enumerate(shards):
        shard.check(rule)
        if shard.mesh != first.mesh:
            msg = (
                f"{rule}: the parameters at {format_path(parts[0].path)} and "
                f"{format_path(parts[k].path)} are DTensors on different device meshes"
            )
            raise ValueError(msg)
    return shards


def _terms_combine(xp: RuleNamespace, p: float) -> Any:
    return xp.maximum if p == math.inf else xp.add


@dataclass(frozen=True)
class ClipGlobalNorm(CrossLeaf):
    """Rescale all gradients together so that their global p-norm is at most ω.

    .. math::

        u_i = g_i \\cdot T_i(\\lambda), \\qquad
        \\lambda = \\min\\!\\left(\\omega / \\lVert (g_1, \\dots, g_k) \\rVert_p,\\, 1\\right)

    as torch's ``clip_grad_norm_`` and optax's ``clip_by_global_norm``: the norm
    is that of the concatenation of every leaf's step at this place of the
    chain, in tree order, reduced by the library's aligned-block tree, so it is
    the same bits on every backend and however the leaves (or, later, shards)
    are laid out. Use it anywhere in a chain:
    ``OptimiserChain(WeightDecay(), ClipGlobalNorm(1.0), Adam())``.

    Parameters
    ----------
    omega
        Largest allowed global norm (ω).
    p
        2, 1 or ``inf``.
    throw
        Keyword only. Raise ``FloatingPointError`` when the global norm is NaN or
        infinite (one host synchronisation per step). Default ``False``: no host
        synchronisation, and a non-finite norm gives λ = 0 (infinite norm) or
        NaN, so the steps are NaN; combine with :class:`SkipNonFinite`.

    Notes
    -----
    The norm, ω/‖g‖ and λ are computed on the device in the widest real dtype
    ``R`` of the leaves (ω rounded to ``R``); λ is then rounded to each leaf's
    dtype. Unlike :class:`ClipNorm` (Optimisers.jl's, per array) the ratio is
    not evaluated in float64 on the host: that would need a host
    synchronisation. Leaves with no gradient (``None``) or frozen take no part.

    References
    ----------
    - Pascanu, Mikolov and Bengio, *On the difficulty of training recurrent neural
      networks*, [arXiv:1211.5063](https://arxiv.org/abs/1211.5063).
    - torch's ``torch.nn.utils.clip_grad_norm_`` and optax's
      ``clip_by_global_norm``.
    """

    omega: float = hyperparameter(1.0, NONNEGATIVE_OR_INF)
    p: float = 2.0
    throw: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p not in (1, 2, math.inf):
            msg = f"ClipGlobalNorm: p must be 2, 1 or inf (the exact norms), got {self.p!r}"
            raise ValueError(msg)

    def global_norm(self, parts: list[Part]) -> tuple[Any, Any, str]:
        """``(xp, norm, dtype)``: the global norm of the parts as a 1-element array."""
        xp = one_backend(type(self).__name__, parts)
        dtype = _reduction_dtype(parts)
        shards = _shards(type(self).__name__, parts)
        nodes: list[Any] = []
        offset = width = 0
        combine: Any = None
        for part, shard in zip(parts, shards, strict=True):
            if shard is None:
                found, combine = norm_nodes(xp, part.dx, self.p, offset, dtype)
                offset += xp.size(part.dx)
            else:  # a local shard: its range of the leaf, the leaf at its global offset
                found, combine = norm_nodes(
                    xp, part.dx, self.p, offset + shard.offset, dtype
                )
                if not shard.contributes:
                    found = []
                width += node_width(shard.total)
                offset += shard.total
            nodes += found
        if shards[0] is not None:  # one all-gather of the nodes of every leaf
            nodes = shards[0].gather(nodes, width)
            combine = _terms_combine(xp, self.p)
        if offset == 0:
            return xp, None, dtype
        return xp, finish_norm(xp, combine_nodes(nodes, offset, combine), self.p), dtype

    def reduce(self, parts: list[Part]) -> list[Any]:
        xp, value, dtype = self.global_norm(parts)
        if value is None:  # every gradient is empty: nothing to scale
            return [None] * len(parts)
        return self.factors(xp, value, dtype, parts)

    def factors(
        self, xp: RuleNamespace, value: Any, dtype: str, parts: list[Part]
    ) -> list[Any]:
        """λ of every part (a 0-d array of its real dtype) from the global norm ``value``.

        ``value`` is the norm as a one-element array of ``dtype`` (the widest real
        dtype of the parts, :meth:`global_norm`). Raises ``FloatingPointError``
        for a non-finite norm when ``throw``.
        """
        if self.throw:
            host = xp.to_host(value[0])
            if not math.isfinite(float(host)):
                size = sum(xp.size(p.dx) for p in parts)
                msg = (
                    f"the gradients have a global {self.p}-norm of {host}, over "
                    f"{len(parts)} arrays and {size} elements"
                )
                raise FloatingPointError(msg)
        import numpy as np

        omega = np.dtype(dtype).type(self.omega)
        lam = xp.minimum(xp.divide(omega, value), 1)
        by_dtype: dict[str, Any] = {}
        shared = []
        for part in parts:
            name = _real_name(xp, part.dx)
            if name not in by_dtype:
                by_dtype[name] = (lam if name == dtype else xp.astype(lam, name))[0]
            shared.append(by_dtype[name])
        return shared

    def finish(
        self, state: Any, x: Any, dx: Any, xp: RuleNamespace, shared: Any
    ) -> tuple[Any, Any]:
        if shared is None:
            return None, dx
        return None, xp.multiply(dx, shared)


class SkipNonFiniteState(NamedTuple):
    """The wrapped rule's ``state`` and how many steps were skipped (``skips``)."""

    state: Any
    skips: int


@dataclass(frozen=True)
class SkipNonFinite(CrossLeaf):
    """Skip the whole step when any gradient of the model is NaN or infinite.

    ``SkipNonFinite(rule)`` runs ``rule`` on every leaf if all gradients (the
    inputs of this rule, for every leaf of the update) are finite; otherwise
    no leaf takes a step, every inner state is left as it was, and the
    ``skips`` counter of every leaf's state goes up by one (as optax's
    ``apply_if_finite``).

    Parameters
    ----------
    rule
        The rule (or chain) to run when the step is finite.

    Notes
    -----
    The decision costs one host synchronisation per step for the whole model
    (per backend, if a model mixes backends): rules keep host scalars in their
    state (step counters, Adam's β powers, by the numerics contract), which a
    device-side select cannot keep unchanged. On numpy and CPU torch it is
    free. Frozen leaves and leaves without a gradient take no part.

    References
    ----------
    - optax's ``apply_if_finite``.
    """

    rule: Rule

    def __post_init__(self) -> None:
        if not isinstance(self.rule, Rule):
            msg = f"SkipNonFinite expects a rule, got {type(self.rule).__name__}"
            raise TypeError(msg)
        super().__post_init__()

    def init(self, x: Any, xp: RuleNamespace) -> SkipNonFiniteState:
        return SkipNonFiniteState(self.rule.init(x, xp), 0)

    def apply_staged(self, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> Staged:
        finite = yield Request(self, dx)
        if not finite:
            return SkipNonFiniteState(state.state, state.skips + 1), None
        inner, step = yield from staged(self.rule, state.state, x, dx, xp)
        return SkipNonFiniteState(inner, state.skips), step

    def reduce(self, parts: list[Part]) -> list[Any]:
        verdict: dict[
            str, Any
        ] = {}  # adapter name -> 0-d bool array, all finite so far
        adapters = {}
        for part in parts:
            xp = part.xp
            ok = xp.xp.all(xp.isfinite(part.dx))
            seen = verdict.get(xp.name)
            verdict[xp.name] = ok if seen is None else xp.xp.logical_and(seen, ok)
            adapters[xp.name] = xp
        finite = all(bool(adapters[name].to_host(v)) for name, v in verdict.items())
        shard = next((s for s in (shard_of(p.x) for p in parts) if s is not None), None)
        if shard is not None:  # every rank skips, or none
            finite = shard.all_true(finite)
        return [finite] * len(parts)

    def hyperparameter_names(self) -> frozenset[str]:
        return self.rule.hyperparameter_names()

    def _adjust(self, changes: Any) -> Rule:
        return SkipNonFinite(self.rule._adjust(changes))


@dataclass(frozen=True)
class ShardNorms(CrossLeaf):
    """The per-array norms of :class:`~agnosticopt.ClipNorm` on local shards, exchanged at once.

    Not a rule of its own: on a sharded leaf (a DTensor's local shard, see
    :func:`agnosticopt._norm.shard_of`) ``ClipNorm`` is run in stages
    (:func:`staged`): each leaf reduces the tree nodes of its shard and yields
    them to this stage; :meth:`reduce` exchanges the nodes of **every** such
    leaf of the update in one all-gather per device mesh (each leaf's rows at
    the same place on every rank: ``node_width`` of its length, which every rank
    knows), and each leaf finishes its own norm from the nodes of all ranks,
    the same bits as :func:`agnosticopt.norm` of the whole array in one process.
    All instances are equal, so all sharded ``ClipNorm`` leaves meeting at one
    stage share the exchange, whatever their ω and p.
    """

    def reduce(self, parts: list[Part]) -> list[Any]:
        meshes: list[tuple[Any, list[int]]] = []  # (a shard, the parts on its mesh)
        for k, part in enumerate(parts):
            shard = shard_of(part.x)
            for first, members in meshes:
                if first.mesh == shard.mesh:
                    members.append(k)
                    break
            else:
                meshes.append((shard, [k]))
        norms: list[Any] = [None] * len(parts)
        for shard, members in meshes:
            planned = [parts[k].dx for k in members]
            pieces = [(pl.nodes, node_width(pl.total)) for pl in planned]
            many = getattr(shard, "gather_many", None)
            found = (
                many(pieces)
                if many is not None
                else [shard.gather(nodes, width) for nodes, width in pieces]
            )
            for k, pl, nodes in zip(members, planned, found, strict=True):
                norms[k] = shard_norm_finish(pl, nodes)
        return norms


_SHARD_NORMS = ShardNorms()

#: True while a sharded leaf's chain runs in :func:`run_stages`: there ClipNorm has stages.
_ON_SHARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "_ON_SHARD", default=False
)


@contextlib.contextmanager
def _on_shard(sharded: bool) -> Iterator[None]:
    token = _ON_SHARD.set(sharded)
    try:
        yield
    finally:
        _ON_SHARD.reset(token)


def _clip_norm_staged(
    rule: ClipNorm, state: Any, x: Any, dx: Any, xp: RuleNamespace
) -> Staged:
    """:meth:`ClipNorm.apply` on a local shard, its node exchange shared (:class:`ShardNorms`)."""
    if (
        getattr(xp, "lazy_clip", False)
        and rule.p in (2, 1, math.inf, -math.inf)
        and xp.size(dx) > 0
    ):
        return rule.apply(state, x, dx, xp)
    planned = shard_norm_nodes(shard_of(x), dx, rule.p)
    n = (
        (yield Request(_SHARD_NORMS, planned))
        if isinstance(planned, ShardNorm)
        else planned
    )
    return None, xp.multiply(dx, rule.factor(n, x, xp))


# -- running chains in stages -------------------------------------------------------------

StagedFn = Callable[[Any, Any, Any, Any, Any], Staged]
_STAGED: dict[type, tuple[StagedFn, Callable[[Any], bool]]] = {}


def register_staged(kind: type, run: StagedFn, needs: Callable[[Any], bool]) -> None:
    """Let a wrapper rule type hold cross-leaf rules.

    Parameters
    ----------
    kind
        The wrapper's type.
    run
        ``run(rule, state, x, dx, xp)``: a generator like :func:`staged` that
        does what ``rule.apply`` does, calling its inner rules with
        ``yield from staged(...)``.
    needs
        ``needs(rule)``: whether this wrapper holds a cross-leaf rule (use
        :func:`has_stages` on its inner rules).
    """
    _STAGED[kind] = (run, needs)


def has_stages(rule: Any) -> bool:
    """Whether ``rule`` is, or holds, a cross-leaf rule."""
    if isinstance(rule, CrossLeaf) or (isinstance(rule, ClipNorm) and _ON_SHARD.get()):
        return True
    found = _STAGED.get(type(rule))
    return found is not None and found[1](rule)


def staged(rule: Any, state: Any, x: Any, dx: Any, xp: RuleNamespace) -> Staged:
    """Run ``rule`` on one leaf as a generator of :class:`Request` s.

    Returns ``(new_state, step)`` as ``rule.apply`` does; rules without stages
    are simply applied.
    """
    if isinstance(rule, CrossLeaf):
        return (yield from rule.apply_staged(state, x, dx, xp))
    if isinstance(rule, ClipNorm) and _ON_SHARD.get() and shard_of(x) is not None:
        return (yield from _clip_norm_staged(rule, state, x, dx, xp))
    found = _STAGED.get(type(rule))
    if found is not None and found[1](rule):
        return (yield from found[0](rule, state, x, dx, xp))
    return rule.apply(state, x, dx, xp)


def _chain(
    rule: OptimiserChain, state: Any, x: Any, dx: Any, xp: RuleNamespace
) -> Staged:
    """:meth:`OptimiserChain.apply` in stages."""
    states = []
    step = dx
    for sub_rule, sub in zip(rule.opts, state, strict=True):
        if step is not None:
            sub, step = yield from staged(sub_rule, sub, x, step, xp)
        states.append(sub)
    return tuple(states), step


def _mixed(
    rule: MixedPrecision, state: MixedPrecisionState, x: Any, dx: Any, xp: RuleNamespace
) -> Staged:
    """:meth:`MixedPrecision.apply` in stages."""
    master = state.master
    inner, step = yield from staged(
        rule.rule, state.state, master, xp.astype(dx, rule.dtype), xp
    )
    if step is None:
        return MixedPrecisionState(master, inner), None
    master = xp.subtract(master, step)
    return MixedPrecisionState(master, inner), Replace(
        xp.astype(master, xp.dtype_name(x))
    )


register_staged(OptimiserChain, _chain, lambda r: any(has_stages(s) for s in r.opts))
register_staged(MixedPrecision, _mixed, lambda r: has_stages(r.rule))


def cross_leaf_plain(entries: list[Any]) -> set[int]:
    """``id`` s of the entries that must take the plain path of ``update_``.

    An adapter's fast path sees only its own leaves, so when leaves of several
    adapters have cross-leaf rules, all of those go to :func:`run_stages` (which
    then reports the mixed backends).
    """
    memo: dict[int, bool] = {}
    found = [
        e
        for e in entries
        if e.grad is not None
        and not e.leaf.frozen
        and memo.setdefault(id(e.leaf.rule), has_stages(e.leaf.rule))
    ]
    if len({e.xp.name for e in found}) <= 1:
        return set()
    return {id(e) for e in found}


class _Running(NamedTuple):
    entry: Any
    steps: Staged
    sharded: bool  # a local shard: its ClipNorm rules have stages (ShardNorms)


def run_stages(entries: list[Any]) -> dict[int, tuple[Any, Any]]:
    """Apply the rules of ``entries`` that have cross-leaf stages, writing nothing.

    Parameters
    ----------
    entries
        The tree's leaves to step (objects with ``leaf``, ``x``, ``xp``, ``path``
        and ``grad``), in tree order.

    Returns
    -------
    dict
        ``id(entry) -> (new_state, step)`` for each entry whose rule has stages;
        the others are left to the caller.
    """
    memo: dict[int, bool] = {}
    results: dict[int, tuple[Any, Any]] = {}
    waiting: list[tuple[_Running, Request]] = []
    for entry in entries:
        rule = entry.leaf.rule
        sharded = shard_of(entry.x) is not None
        if memo.setdefault(id(rule), has_stages(rule)) or (
            sharded and _sharded_stages(rule)
        ):
            steps = staged(rule, entry.leaf.state, entry.x, entry.grad, entry.xp)
            _advance(
                _Running(entry, steps, sharded), None, results, waiting, first=True
            )
    while waiting:
        groups: dict[Any, list[tuple[_Running, Request]]] = {}
        for item in waiting:
            groups.setdefault(item[1].rule, []).append(item)
        waiting = []
        for rule, members in groups.items():
            parts = [
                Part(r.entry.path, r.entry.xp, r.entry.x, req.dx) for r, req in members
            ]
            with members[0][0].entry.xp.computing():
                shared = rule.reduce(parts)
            for (run, _), value in zip(members, shared, strict=True):
                _advance(run, value, results, waiting, first=False)
    return results


def _sharded_stages(rule: Any) -> bool:
    """Whether ``rule`` has stages on a local shard (it holds a ClipNorm)."""
    with _on_shard(True):
        return has_stages(rule)


def _advance(
    run: _Running,
    value: Any,
    results: dict[int, tuple[Any, Any]],
    waiting: list[tuple[_Running, Request]],
    *,
    first: bool,
) -> None:
    entry = run.entry
    with entry.xp.computing(), _on_shard(run.sharded):
        try:
            request = next(run.steps) if first else run.steps.send(value)
        except StopIteration as stop:
            results[id(entry)] = stop.value
            return
        except Exception as exc:
            add_note = getattr(exc, "add_note", None)  # Python >= 3.11
            if add_note is not None:
                add_note(f"while updating the parameter at {format_path(entry.path)}")
            raise
    waiting.append((run, request))
