"""The compiled fast path of ``update_`` for numpy arrays and CPU torch tensors.

``update_`` hands the leaves of one adapter to :func:`plan`, which

1. checks each leaf: float32/float64, C-contiguous, on the CPU, state arrays of
   the parameter's shape; anything else stays on the plain path;
2. groups the leaves by rule, dtype and the host values of their state (a
   signature that tells ``-0.0`` from ``0.0``), and records one step of each group
   with :func:`agnosticopt._trace.trace`: the recording gives the
   program, its parameter values and the new host values;
3. compiles each program once (``adapters/_numba.py``) and builds, per group, a
   table of the data addresses of every leaf's parameter, gradient and state;
4. refuses the whole plan if an array written by a kernel overlaps another array.

Nothing is written while planning: rules that raise (a ``ClipNorm`` that finds an
infinite norm) raise on the plain path, and ``update_`` then changes nothing.
:meth:`FastPlan.run` runs the kernels in the commit phase; they write the new
state into the leaf's state arrays and the parameter in place. The new state is
a new container holding the same arrays and the new host values, the values the
plain path gives, bit for bit.

A leaf whose recording fails (a reduction, an unknown operation, a Python
operator applied to an array, which also warns with ``OperatorWarning``, a
compile error) takes the plain path, which then raises whatever the rule raises.
Without numba, :func:`plan` returns ``None``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import math
import operator
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from agnosticopt._ops import OperatorWarning
from agnosticopt._speed import fast_path_enabled
from agnosticopt._trace import (
    OperatorUsed,
    Program,
    Recording,
    Untraceable,
    flatten_state,
    record,
    split_state,
    trace,
)

__all__ = ["SKIP", "Arrays", "FastPlan", "available", "counters", "plan", "replay"]

#: A leaf that the plan does not update (it takes the plain path).
SKIP: Any = object()

#: Since import (tests): leaves updated by kernels and leaves left to the plain
#: path; steps recorded once (``recorded``) and steps recorded with their host
#: values (``traced``: rules whose host code cannot be recorded symbolically);
#: plans reused from the step before (``reused``).
counters = {"fast": 0, "plain": 0, "recorded": 0, "traced": 0, "reused": 0}

_numba_ok: bool | None = None


def available() -> bool:
    """Whether the fast path can run: numba imports and the switch is on.

    numba is imported on the first call (a few tenths of a second), not when
    agnosticopt is.
    """
    global _numba_ok
    if not fast_path_enabled():
        return False
    if _numba_ok is None:
        _numba_ok = False
        if importlib.util.find_spec("numba") is not None:
            try:
                importlib.import_module("agnosticopt.adapters._numba")
            except Exception as exc:  # noqa: BLE001  (a broken numba: no fast path)
                warnings.warn(
                    f"agnosticopt: numba cannot be used, no fast path: {exc!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                _numba_ok = True
    return _numba_ok


# -- backends -------------------------------------------------------------------------------------


class Arrays(Protocol):
    """How the fast path reads and writes one backend's arrays.

    Implemented next to each adapter: ``NumpyArrays`` in
    :mod:`agnosticopt.adapters.numpy`, ``TorchArrays`` in
    :mod:`agnosticopt.adapters.torch`.
    """

    name: str
    array_type: type

    def dtype(self, a: Any) -> str | None:
        """``"float32"``/``"float64"`` for an array a kernel can read in place, else None."""

    def readable(self, arrays: list[Any], dtype: str) -> bool:
        """Whether :meth:`dtype` of each of ``arrays`` is ``dtype`` (one call for many)."""

    def unchanged(self, arrays: list[Any], dtypes: list[Any]) -> bool:
        """Whether each of ``arrays``, read by :meth:`dtype` before, still has its
        dtype object of ``dtypes`` and the layout a kernel reads (it can change in
        place under the same object and memory)."""

    def writeable(self, a: Any) -> bool:
        """Whether a kernel may write into ``a``."""

    def still_writeable(self, arrays: list[Any]) -> Callable[[], bool]:
        """A test of whether a kernel may still write into each of ``arrays``
        (writeable now): what cannot change for these objects is asked once."""

    def address(self, a: Any) -> int:
        """The address of the first element."""

    def addresses(self, arrays: list[Any]) -> list[int]:
        """:meth:`address` of each of ``arrays`` (one call for many)."""

    def written(self, arrays: list[Any]) -> None:
        """Called after kernels wrote into ``arrays``."""

    def scaled(self, a: Any, factor: Any) -> Any:
        """A new array ``a * factor`` (one correctly rounded product per element)."""

    def empty(self, size: int, dtype: str) -> Any:
        """A new 1-d array of ``size`` elements of ``dtype``, for the kernels to fill."""


# -- the plan -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Launch:
    """One kernel call: a compiled program over a table of leaves (one row each)."""

    kernel: Any
    table: np.ndarray
    sizes: np.ndarray
    values: tuple[Any, ...]
    itemsizes: tuple[int, ...]
    targets: frozenset[int]
    written: list[Any]
    chunks: np.ndarray


@dataclasses.dataclass
class FastPlan:
    """What the fast path will do: the new states now, the writes in :meth:`run`.

    Attributes
    ----------
    states
        The new state of each leaf given to :func:`plan`, or :data:`SKIP` for a
        leaf left to the plain path.
    """

    states: list[Any]
    launches: list[_Launch]
    arrays: Arrays
    #: Arrays the plan made (scaled gradients) that the kernels read: kept alive.
    made: list[Any] = dataclasses.field(default_factory=list)
    #: Whether the plan is kept for the next update of the same leaves (:func:`replay`).
    replayable: bool = False

    @property
    def handled(self) -> list[bool]:
        """Whether each leaf is updated by the plan (else: the plain path)."""
        return list(map(operator.is_not, self.states, itertools.repeat(SKIP)))

    def run(self) -> None:
        """Run the kernels: write every new state and parameter in place."""
        written: list[Any] = []
        for launch in self.launches:
            launch.kernel.run(launch.table, launch.sizes, launch.values, launch.chunks)
            written.extend(launch.written)
        self.arrays.written(written)


class _Leaf(NamedTuple):
    position: int
    rule: Any
    state: Any
    x: Any
    grad: Any
    arrays: list[Any]
    size: int


Items = list[tuple[Any, Any, Any, Any]]


def plan(arrays: Arrays, items: Items) -> FastPlan | None:
    """Plan the in-place update of the leaves ``items``: ``(rule, state, x, grad)``.

    Returns ``None`` when the fast path is off or unavailable, or when no leaf
    can take it. Never writes; raises only on an internal error.
    """
    if not available() or not items:
        return None
    kept_key = _kept_key(arrays, items)
    kept = _kept.get(kept_key) if RECORD_ONCE else None
    if kept is not None and kept.arrays is arrays:
        again = _again(kept, arrays, items)
        if again is not None:
            return again
        del _kept[kept_key]
    states: list[Any] = [SKIP] * len(items)
    launches: list[_Launch] = []
    parts: list[_Part] = []
    with np.errstate(all="ignore"):
        given = items
        cross = _cross(arrays, items)
        done = _computed(arrays, items, cross)  # (None only for a kept plan's)
        items, clipped = done if done is not None else (items, [])
        made = [
            new[3]
            for new, old in zip(items, given, strict=True)
            if new[3] is not old[3]
        ]
        staged: list[_Launch] = []  # the launches of the cross-leaf leaves: all or none
        together = set(clipped)
        for key, group in _groups(arrays, items).items():
            found = _launches(arrays, key[1], key[3], group, states, parts)
            (staged if group[0].position in together else launches).extend(found)
        if clipped and any(states[k] is SKIP for k in clipped):
            for (
                k
            ) in clipped:  # a global norm is all leaves or none: all to the plain path
                states[k] = SKIP
        else:
            launches.extend(staged)
    if launches and _overlapping_cached(launches):
        launches = []
    if not launches:
        counters["plain"] += len(items)
        return None
    fast = sum(s is not SKIP for s in states)
    counters["fast"] += fast
    counters["plain"] += len(items) - fast
    changed = [a is not b for a, b in zip(items, given, strict=True)]
    if (
        fast == len(items)
        and all(
            not change or _kept_rule(item[0])
            for item, change in zip(items, changed, strict=True)
        )
        and all(part.step.recording is not None for part in parts)
    ):
        _kept.pop(kept_key, None)
        mine = [k for k in _kept if k[0] == kept_key[0]]
        for old in mine[: max(0, len(mine) - KEPT_PLANS + 1)]:  # the oldest go
            del _kept[old]
        kept = _Kept(arrays, items, states, parts, launches)
        if any(changed):
            kept.cross = cross
            kept.chains = [item[0] for item in given]
        _kept[kept_key] = kept
        return FastPlan(states, launches, arrays, made, replayable=True)
    return FastPlan(states, launches, arrays, made)


def replay(arrays: Arrays, items: Items) -> FastPlan | None:
    """The kept plan of the last update for exactly these leaves, or ``None``.

    As :func:`plan` where the last plan still holds (:class:`_Kept`), but never
    plans anew: for ``update_``'s replay of a tree whose leaves, arrays and
    states are those of its last update (``agnosticopt/_replay.py``), which
    otherwise takes the whole way.
    """
    if not RECORD_ONCE or not available():
        return None
    kept = _kept.get(_kept_key(arrays, items)) if items else None
    if kept is None or kept.arrays is not arrays:
        return None
    return _again(kept, arrays, items)


def _again(kept: _Kept, arrays: Arrays, items: Items) -> FastPlan | None:
    """``kept``'s plan for ``items``, their norm clips and skips computed first.

    A plan kept with clip or skip leaves (:class:`_Cross`) holds the leaves as
    the kernels take them (a wrapper kept from step to step, the gradient
    scaled by λ or λ in the state): their norms, λ and the finiteness of a
    skip's gradients are computed anew, as :func:`plan` does, and the scaled
    gradients are new arrays (the tables' gradient column refreshed), kept alive
    by the plan until it has run.
    """
    with np.errstate(all="ignore"):
        cross = kept.cross
        if cross is None:
            return kept.again(items)
        chains = kept.chains
        if len(items) != len(chains) or not all(
            map(operator.is_, map(_RULE, items), chains)
        ):
            return None
        if cross.scaled is None:
            _scale_ahead(arrays, items, cross)
        dtype_of = arrays.dtype
        if any(dtype_of(items[k][3]) != d for k, d in cross.checked.items()):
            return None  # a gradient the compiled reductions cannot read
        done = _computed(arrays, items, cross)
        if done is None:
            return None
        clipped_items, _ = done
        again = kept.again(clipped_items)
        if again is not None:
            again.made = [
                new[3]
                for new, old in zip(clipped_items, items, strict=True)
                if new[3] is not old[3]
            ]
        return again


def _kept_key(arrays: Arrays, items: Items) -> tuple[int, int]:
    """The key of the kept plan for ``items``: the memory access and the first
    parameter (held by the plan, so its ``id`` is not reused meanwhile)."""
    return id(arrays), id(items[0][2])


@dataclasses.dataclass(frozen=True, eq=False)
class _AfterClip:
    """A chain ``ClipGlobalNorm, *rest`` or ``ClipNorm, *rest`` once the clip
    factor ``lam`` is known (or already applied to the gradient: ``lam`` None)."""

    rest: Any
    #: The factor, or None where the gradient handed in is already ``λ·dx``.
    lam: Any

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        scaled = dx if self.lam is None else xp.multiply(dx, self.lam)
        if self.rest is None:  # the clip alone
            return state, scaled
        sub, step = self.rest.apply(state[1:], x, scaled, xp)
        return (state[0], *sub), step


class _Factor(NamedTuple):
    """The state of a :class:`_ByFactor` leaf: the clip factor λ, a host value (so
    that one recording holds for every λ), and the chain's state."""

    lam: Any
    state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _ByFactor:
    """A chain ``ClipGlobalNorm, *rest`` or ``ClipNorm, *rest`` (``rest`` None: the
    clip alone) whose λ comes in the state (:class:`_Factor`): ``λ·dx``, then
    ``rest``. The new state is the chain's. The same object at every step."""

    rest: Any

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        lam, inner = state
        scaled = xp.multiply(dx, lam)
        if self.rest is None:
            return inner, scaled
        sub, step = self.rest.apply(inner[1:], x, scaled, xp)
        return (inner[0], *sub), step


@dataclasses.dataclass(frozen=True, eq=False)
class _InsideSkip:
    """A ``SkipNonFinite(rule)`` once every gradient is known to be finite."""

    rule: Any

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        from agnosticopt._global import SkipNonFiniteState

        inner, step = self.rule.apply(state.state, x, dx, xp)
        return SkipNonFiniteState(inner, state.skips), step


def _kept_rule(rule: Any) -> bool:
    """Whether ``rule``, a wrapper :func:`_computed` put in, is the same object at
    every step (so that a plan holding it can be kept)."""
    kind = type(rule)
    return (
        kind is _ByFactor
        or kind is _InsideSkip
        or (kind is _AfterClip and rule.lam is None)
    )


@dataclasses.dataclass(eq=False)
class _Cross:
    """The leaves of a plan's items that need a reduction before their kernels.

    Found once per plan by :func:`_cross` (from the rules, dtypes and sizes);
    :func:`_computed` does the reductions, at every step of a kept plan.
    """

    #: The ``ClipNorm, *rest`` leaves: ``(clip, rest, dtype)`` by position.
    clips: dict[int, tuple[Any, Any, str]]
    #: The leaves of each ``ClipGlobalNorm`` (first in a chain of elementwise
    #: rules, ``throw=False``) and the rest of each one's chain.
    globals: dict[Any, list[int]]
    rests: dict[int, Any]
    #: The leaves of each ``SkipNonFinite`` (of an elementwise rule).
    skips: dict[Any, list[int]]
    #: The gradient dtype each of these positions was planned with.
    dtypes: dict[int, str]
    #: False: a cross-leaf leaf the kernels cannot take (all of them go plain).
    whole: bool = True
    #: Once the plan is kept (:func:`_scale_ahead`): the small ``ClipNorm`` leaves,
    #: scaled into one scratch array per (dtype, p); the other ``ClipNorm`` leaves;
    #: the positions whose gradients are checked one by one, with their dtypes.
    scaled: list[_Scaled] | None = None
    per_leaf: dict[int, tuple[Any, Any, str]] = dataclasses.field(default_factory=dict)
    checked: dict[int, str] = dataclasses.field(default_factory=dict)


def _cross(arrays: Arrays, items: Items) -> _Cross:
    """The clip and skip leaves of ``items`` (see :class:`_Cross`)."""
    from agnosticopt._global import ClipGlobalNorm, SkipNonFinite, has_stages
    from agnosticopt._wrappers import OptimiserChain

    cross = _Cross({}, {}, {}, {}, {})
    dtype_of = arrays.dtype
    for k, (rule, _, x, grad) in enumerate(items):
        if not has_stages(rule):
            found = _clip_norm_first(arrays, rule, x, grad)
            if found is not None:
                cross.clips[k] = found
                cross.dtypes[k] = found[2]
            continue
        if not cross.whole:
            continue
        dtype = dtype_of(x)
        if dtype is None or dtype_of(grad) != dtype:
            cross.whole = False
            continue
        if isinstance(rule, SkipNonFinite) and not has_stages(rule.rule):
            cross.skips.setdefault(rule, []).append(k)
            cross.dtypes[k] = dtype
            continue
        if isinstance(rule, ClipGlobalNorm):
            clip, rest = rule, None
        elif (
            isinstance(rule, OptimiserChain)
            and rule.opts
            and isinstance(rule.opts[0], ClipGlobalNorm)
            and not any(has_stages(r) for r in rule.opts[1:])
        ):
            clip, rest = rule.opts[0], _tail(rule)
        else:
            cross.whole = False
            continue
        if clip.throw:
            cross.whole = False
            continue
        cross.globals.setdefault(clip, []).append(k)
        cross.rests[k] = rest
        cross.dtypes[k] = dtype
    for positions in cross.globals.values():
        if len({cross.dtypes[k] for k in positions}) != 1 or not sum(
            math.prod(items[k][3].shape) for k in positions
        ):
            cross.whole = False  # one dtype per clip, some element to scale
    return cross


def _computed(
    arrays: Arrays, items: Items, cross: _Cross
) -> tuple[Items, list[int]] | None:
    """The items with every leaf of ``cross`` as the kernels take it, and the
    positions of the cross-leaf ones (all updated by the kernels, or none).

    A ``ClipNorm, *rest`` leaf as :func:`_clip_norms` makes it (each keeps the fast
    path on its own); the leaves of a ``ClipGlobalNorm`` as :class:`_ByFactor` with
    the clip's λ (the compiled aligned-block reduction over all its gradients:
    the plain path's bits), those of a ``SkipNonFinite`` as :class:`_InsideSkip`
    when all its gradients are finite. Otherwise (a skip's gradient not finite,
    or ``cross`` not whole) the cross-leaf leaves are left as they are, for the
    plain path, and no position is returned. ``None`` (only once
    :func:`_scale_ahead` has grouped the small ``ClipNorm`` leaves): a gradient
    of a group that the kernels cannot read, or a norm that ``throw`` refuses.
    """
    out = list(items)
    clips = cross.clips
    if cross.scaled is not None:
        for group in cross.scaled:
            if not group.scale(arrays, items, out):
                return None
        clips = cross.per_leaf
    if clips:
        _clip_norms(arrays, items, out, clips)
    if not cross.whole or not (cross.globals or cross.skips):
        return out, []
    for positions in cross.skips.values():
        if not _all_finite(arrays, [items[k] for k in positions]):
            return out, []  # the plain path skips the step
    from agnosticopt.adapters._numba import tree_root

    for skip, positions in cross.skips.items():
        inside = _wrapper(("skip", id(skip.rule)), skip.rule, _InsideSkip)
        for k in positions:
            out[k] = (inside, *items[k][1:])
    for clip, positions in cross.globals.items():
        dtype = cross.dtypes[positions[0]]
        t = np.dtype(dtype).type
        grads = [items[k][3] for k in positions]
        addresses = np.array(arrays.addresses(grads), dtype=np.int64)
        sizes = np.array([math.prod(g.shape) for g in grads], dtype=np.int64)
        value = tree_root(dtype, clip.p, addresses, sizes)
        if clip.p == 2:
            value = np.sqrt(value)
        lam = np.minimum(t(clip.omega) / value, t(1))
        for k in positions:
            rest = cross.rests[k]
            _, state, x, grad = items[k]
            out[k] = (_factor_wrapper(rest), _Factor(lam, state), x, grad)
    return out, [k for k in cross.dtypes if k not in cross.clips]


class _Scaled:
    """The small ``ClipNorm, *rest`` leaves of a kept plan of one dtype and p.

    Their gradients are scaled by their λ into one scratch array, each leaf's
    part of it the same view at every step (so the kernels' tables stay as they
    are): per step, one compiled reduction for the norms, λ for all of them at
    once (:func:`_factors`), one compiled pass for the products.
    """

    def __init__(
        self,
        arrays: Arrays,
        items: Items,
        clips: dict[int, tuple[Any, Any, str]],
        positions: list[int],
        kind: tuple[str, float],
    ) -> None:
        self.dtype, self.p = kind
        self.positions = positions
        shapes = [items[k][3].shape for k in positions]
        sizes = [math.prod(shape) for shape in shapes]
        self.sizes = np.array(sizes, dtype=np.int64)
        self.offsets = np.cumsum(self.sizes) - self.sizes
        self.omegas = np.array([clips[k][0].omega for k in positions], np.float64)
        self.throw = any(clips[k][0].throw for k in positions)
        self.scratch = arrays.empty(int(self.sizes.sum()), self.dtype)
        self.address = arrays.address(self.scratch)
        self.views = [
            self.scratch[o : o + n].reshape(shape)
            for o, n, shape in zip(self.offsets.tolist(), sizes, shapes, strict=True)
        ]
        self.wrappers = [_scaled_wrapper(clips[k][1]) for k in positions]

    def scale(self, arrays: Arrays, items: Items, out: Items) -> bool:
        """Put each leaf into ``out`` with its gradient scaled by its λ; ``False``
        (nothing put) for a gradient the kernels cannot read, or a norm that is
        not finite where a clip has ``throw`` (for the plain path to raise)."""
        from agnosticopt.adapters._numba import scale_into, tree_roots

        dtype, dtype_of = self.dtype, arrays.dtype
        grads = [items[k][3] for k in self.positions]
        if not all(dtype_of(g) == dtype for g in grads):
            return False
        addresses = np.array(arrays.addresses(grads), dtype=np.int64)
        values = tree_roots(dtype, self.p, addresses, self.sizes)
        if self.p == 2:
            values = np.sqrt(values)
        if self.throw and not np.isfinite(values).all():
            return False
        lams = _factors(self.omegas, values, dtype)
        scale_into(
            dtype, self.p, addresses, self.sizes, lams, self.address, self.offsets
        )
        for k, wrapper, view in zip(
            self.positions, self.wrappers, self.views, strict=True
        ):
            _, state, x, _ = items[k]
            out[k] = (wrapper, state, x, view)
        return True


def _factors(omegas: np.ndarray, norms: np.ndarray, dtype: str) -> np.ndarray:
    """:meth:`ClipNorm.factor` of each norm at once: ``T(min(ω / float(n), 1))``, with
    ω / 0 taken as ∞ (IEEE float64 division and rounding to ``T``: the same bits)."""
    wide = norms.astype(np.float64)
    with np.errstate(all="ignore"):  # ω / subnormal overflows to ∞, as in Python
        ratio = np.divide(
            omegas, wide, out=np.full_like(omegas, np.inf), where=wide != 0
        )
        return np.minimum(ratio, 1.0).astype(np.dtype(dtype))


def _scale_ahead(arrays: Arrays, items: Items, cross: _Cross) -> None:
    """Group the kept plan's small ``ClipNorm`` leaves (:class:`_Scaled`: at most
    :data:`SCALE_AT_MOST` elements, ``ClipNorm`` itself with a Python float ω, whose
    λ :func:`_factors` gives); the others stay one by one (:meth:`ClipNorm.factor`)."""
    from agnosticopt._clip import ClipNorm

    kinds: dict[tuple[str, float], list[int]] = {}
    for k, (clip, _, dtype) in cross.clips.items():
        if (
            type(clip) is ClipNorm
            and type(clip.omega) is float  # (a numpy ω divides in its own dtype)
            and math.prod(items[k][3].shape) <= SCALE_AT_MOST
        ):
            kinds.setdefault((dtype, clip.p), []).append(k)
        else:
            cross.per_leaf[k] = cross.clips[k]
    cross.scaled = [
        _Scaled(arrays, items, cross.clips, positions, kind)
        for kind, positions in kinds.items()
    ]
    grouped = {k for positions in kinds.values() for k in positions}
    cross.checked = {k: d for k, d in cross.dtypes.items() if k not in grouped}


def _all_finite(arrays: Arrays, items: Items) -> bool:
    """Whether every gradient of ``items`` is finite: the compiled max-|g| reduction
    of each dtype is finite exactly when no element is NaN or infinite."""
    from agnosticopt.adapters._numba import tree_root

    by_dtype: dict[str | None, list[Any]] = {}
    for _, _, x, grad in items:
        by_dtype.setdefault(arrays.dtype(x), []).append(grad)
    for dtype, grads in by_dtype.items():
        if dtype is None:  # not a dtype the kernels read (checked before): plain path
            return False
        sizes = np.array([math.prod(g.shape) for g in grads], dtype=np.int64)
        keep = sizes > 0
        if not keep.any():
            continue
        addresses = np.array(arrays.addresses(grads), dtype=np.int64)
        if not np.isfinite(tree_root(dtype, math.inf, addresses[keep], sizes[keep])):
            return False
    return True


#: A ``ClipNorm`` leaf of at most this many elements has its gradient scaled by its λ
#: before the kernels (one extra pass over a small array; a kept plan's into its
#: scratch, :class:`_Scaled`), so that all the leaves of one chain share one recorded
#: program and one kernel call; a larger leaf takes λ in its state
#: (:class:`_ByFactor`: no extra pass, no scratch; a kernel call of its own).
SCALE_AT_MOST = 1 << 17


def _clip_norm_first(
    arrays: Arrays, rule: Any, x: Any, grad: Any
) -> tuple[Any, Any, str] | None:
    """``(clip, rest, dtype)`` for a leaf whose rule is ``ClipNorm, *rest`` (or the
    clip alone: ``rest`` None) that the compiled reduction can take, else None."""
    from agnosticopt._clip import ClipNorm
    from agnosticopt._wrappers import OptimiserChain

    if isinstance(rule, ClipNorm):
        clip, rest = rule, None
    elif (
        isinstance(rule, OptimiserChain)
        and rule.opts
        and isinstance(rule.opts[0], ClipNorm)
    ):
        clip, rest = rule.opts[0], _tail(rule)
    else:
        return None
    dtype = arrays.dtype(x)
    if (
        clip.p not in (1, 2, math.inf)
        or dtype is None
        or arrays.dtype(grad) != dtype
        or not math.prod(x.shape)
    ):
        return None
    return clip, rest, dtype


def _clip_norms(
    arrays: Arrays,
    items: Items,
    out: Items,
    clips: dict[int, tuple[Any, Any, str]],
) -> None:
    """Compute the λ of every ``ClipNorm, *rest`` leaf of ``clips`` and wrap its rule.

    The norms of one (dtype, p) come from one call of the compiled aligned-block
    reduction (the plain path's bits), λ from :meth:`ClipNorm.factor`. A small
    leaf's gradient is replaced by ``λ·dx`` (the plain path's product) and its
    rule by a wrapper shared by every leaf of the chain (see
    :data:`SCALE_AT_MOST`); a larger one keeps its gradient, its rule becomes
    :class:`_ByFactor` and its state a :class:`_Factor` holding λ. A leaf whose
    norm is not finite with ``throw`` is left as it is, for the plain path to
    raise naming the key path.
    """
    from agnosticopt.adapters._numba import tree_roots

    by_kind: dict[tuple[str, float], list[int]] = {}
    for k, (clip, _, dtype) in clips.items():
        by_kind.setdefault((dtype, clip.p), []).append(k)
    for (dtype, p), positions in by_kind.items():
        grads = [items[k][3] for k in positions]
        sizes = [math.prod(g.shape) for g in grads]
        values = tree_roots(
            dtype,
            p,
            np.array(arrays.addresses(grads), dtype=np.int64),
            np.array(sizes, dtype=np.int64),
        )
        if p == 2:
            values = np.sqrt(values)
        host = _HostDtype(dtype)
        for k, grad, size, value in zip(positions, grads, sizes, values, strict=True):
            clip, rest, _ = clips[k]
            _, state, x, _ = items[k]
            if clip.throw and not math.isfinite(value):
                continue
            lam = clip.factor(value, x, host)
            if size <= SCALE_AT_MOST:
                out[k] = (_scaled_wrapper(rest), state, x, arrays.scaled(grad, lam))
            else:
                out[k] = (_factor_wrapper(rest), _Factor(lam, state), x, grad)


def clipped_by(
    arrays: Arrays,
    rest: Any,
    lam: Any,
    grad: Any,
    wrappers: dict[Any, Any],
    *,
    scale: bool,
) -> tuple[_AfterClip, Any]:
    """The rule and gradient of a leaf clipped by its own λ before ``rest``.

    With ``scale``, the gradient becomes ``λ·grad`` (one correctly rounded product
    per element) under a wrapper shared by every such leaf of ``rest``, so that
    they share one recorded program and one kernel call; else the gradient is
    kept and the wrapper holds λ (one per value of λ). ``wrappers`` holds the
    wrappers made so far, by key. (The DTensor adapter's clip plan.)
    """
    if scale:
        return _scaled_wrapper(rest), arrays.scaled(grad, lam)
    key = ("lambda", id(rest), lam.dtype.name, lam.tobytes())
    wrapper = wrappers.get(key)
    if wrapper is None or wrapper.rest is not rest:
        wrapper = wrappers[key] = _AfterClip(rest, lam)
    return wrapper, grad


def _scaled_wrapper(rest: Any) -> _AfterClip:
    """The wrapper of ``rest`` for leaves whose gradients come scaled by λ."""
    return _wrapper(("scaled", id(rest)), rest, lambda r: _AfterClip(r, None))


def _factor_wrapper(rest: Any) -> _ByFactor:
    """The wrapper of ``rest`` for leaves whose λ comes in the state."""
    return _wrapper(("factor", id(rest)), rest, _ByFactor)


def _wrapper(key: tuple[str, int], inner: Any, make: Any) -> Any:
    """The wrapper ``make(inner)`` kept under ``key`` (the same object at every
    step, so that its steps are recorded once and its plans kept)."""
    found = _WRAPPERS.get(key)
    if found is None or found[0] is not inner:  # (an id reused by a new rule)
        if len(_WRAPPERS) >= RECORDINGS:
            _WRAPPERS.clear()
        found = _WRAPPERS[key] = (inner, make(inner))
    return found[1]


def _tail(chain: Any) -> Any:
    """``OptimiserChain(*chain.opts[1:])``, the same object at every step (so that
    its steps are recorded once)."""
    from agnosticopt._wrappers import OptimiserChain

    found = _TAILS.get(id(chain))
    if found is None or found[0] is not chain:
        if len(_TAILS) >= RECORDINGS:
            _TAILS.clear()
        found = _TAILS[id(chain)] = (chain, OptimiserChain(*chain.opts[1:]))
    return found[1]


#: Each chain's tail after its first rule (a norm clip), by ``id`` of the chain
#: (held), and the wrappers of the tails (and of a skip's rule) that the plans
#: put in (:func:`_wrapper`'s keys): the same objects at every step.
_TAILS: dict[int, tuple[Any, Any]] = {}
_WRAPPERS: dict[tuple[str, int], tuple[Any, Any]] = {}


class _HostDtype:
    """The one adapter method :meth:`ClipNorm.factor` needs: ``scalar_type``."""

    def __init__(self, dtype: str) -> None:
        self.type = np.dtype(dtype).type

    def scalar_type(self, x: Any) -> type:
        return self.type


def _groups(arrays: Arrays, items: Items) -> dict[Any, list[_Leaf]]:
    """The eligible leaves, by (rule, dtype, state signature, state dtypes)."""
    groups: dict[Any, list[_Leaf]] = {}
    dtype_of, array_type = arrays.dtype, arrays.array_type
    memo: dict[int, Any] = {}  # the states (and so the ids) stay alive meanwhile
    for k, (rule, state, x, grad) in enumerate(items):
        dtype = dtype_of(x)
        if dtype is None or dtype_of(grad) != dtype:
            continue
        found: list[Any] = []
        try:
            signature = flatten_state(state, array_type, found, memo)
        except Untraceable:  # a state it cannot describe: plain path
            signature = SKIP
        if signature is SKIP:
            continue
        shape = x.shape
        dtypes = tuple([dtype_of(a) if a.shape == shape else None for a in found])
        if None in dtypes:
            continue
        key = (id(rule), dtype, signature, dtypes)
        leaf = _Leaf(k, rule, state, x, grad, found, math.prod(shape))
        group = groups.get(key)
        if group is None:
            groups[key] = [leaf]
        else:
            group.append(leaf)
    return groups


class _Step(NamedTuple):
    """One group's step: its program, parameter values and new states."""

    program: Program
    values: tuple[Any, ...]
    state: Any  # state(arrays): the new state of a leaf whose state arrays are arrays
    shape_used: bool
    recording: Recording | None  # None: recorded with this step's host values
    states: Any  # states(arrays of each leaf): the list of their new states


def _launches(
    arrays: Arrays,
    dtype: str,
    dtypes: tuple[str, ...],
    group: list[_Leaf],
    states: list[Any],
    parts: list[_Part],
) -> list[_Launch]:
    """Find (or record) the group's step, compile it, and tabulate the group's leaves."""
    first = group[0]
    step = _step_of(
        arrays, first.rule, first.state, first.arrays, first.x, dtype, dtypes
    )
    if step is None:
        return []
    if not step.shape_used:
        return _launch(arrays, step, group, states, parts, dtype, dtypes)
    by_shape: dict[tuple[int, ...], list[_Leaf]] = {}  # the rule read a shape
    for leaf in group:
        by_shape.setdefault(tuple(leaf.x.shape), []).append(leaf)
    launches = []
    for part in by_shape.values():
        leaf = part[0]
        again = (
            step
            if leaf is first
            else _step_of(
                arrays, leaf.rule, leaf.state, leaf.arrays, leaf.x, dtype, dtypes
            )
        )
        if again is not None:
            launches.extend(_launch(arrays, again, part, states, parts, dtype, dtypes))
    return launches


#: Steps recorded once (:func:`agnosticopt._trace.record`), by
#: ``(id(rule), dtype, state structure, state dtypes)`` (and the shape, for a
#: rule that reads it): ``(rule, recordings)``, the recordings of the guards met
#: so far, or ``(rule, None)`` for a rule recorded at every step instead.
_recordings: dict[Any, tuple[Any, list[Recording] | None]] = {}
#: Most keys kept (beyond, the cache starts again), most guard variants per key.
RECORDINGS = 1024
VARIANTS = 8
#: Off: every step is recorded anew with its host values and no plan is kept
#: (the fast path before steps were recorded once; for measuring, same bits).
RECORD_ONCE = True


def _step_of(
    arrays: Arrays,
    rule: Any,
    state: Any,
    leaf_arrays: list[Any],
    x: Any,
    dtype: str,
    dtypes: tuple[str, ...],
) -> _Step | None:
    """The step of a leaf: a recording's replay on the state's host values, or a
    new recording; ``None`` when it cannot be recorded (the plain path)."""
    if not RECORD_ONCE:
        return _traced(arrays, rule, state, leaf_arrays, x, dtype, dtypes)
    hosts: list[Any] = []
    try:
        structure = split_state(state, arrays.array_type, [], hosts)
    except Untraceable:
        return _traced(arrays, rule, state, leaf_arrays, x, dtype, dtypes)
    key: tuple[Any, ...] = (id(rule), dtype, structure, dtypes)
    entry = _recordings.get(key)
    if entry is not None and entry[0] is not rule:  # an id reused by a new rule
        entry = None
    if entry is not None and entry[1] is None:
        return _traced(arrays, rule, state, leaf_arrays, x, dtype, dtypes)
    if entry is not None and entry[1] and entry[1][0].shape_used:
        key = (*key, tuple(x.shape))
        entry = _recordings.get(key)
    variants = entry[1] if entry is not None and entry[1] is not None else []
    for recording in variants:
        step = _replay(recording, hosts)
        if step is not None:
            return step
    try:
        recording = record(
            rule, state, leaf_arrays, tuple(x.shape), dtype, dtypes, arrays.name
        )
    except OperatorWarning:  # the rule's Python operator, a warning made an error
        raise
    except OperatorUsed:  # warned once; recording at this state would warn again
        return None
    except Exception:  # noqa: BLE001  (not recordable once: record at every step)
        step = _traced(arrays, rule, state, leaf_arrays, x, dtype, dtypes)
        if step is not None and not variants:
            _remember(key, rule, None)
        return step
    counters["recorded"] += 1
    if recording.shape_used and len(key) == 4:
        _remember(key, rule, [recording])  # the marker: look up by shape
        key = (*key, tuple(x.shape))
    _remember(key, rule, [*variants, recording][-VARIANTS:])
    return _replay(recording, hosts)


def _remember(key: Any, rule: Any, recordings: list[Recording] | None) -> None:
    if len(_recordings) >= RECORDINGS:
        _recordings.clear()
    _recordings[key] = (rule, recordings)


def _replay(recording: Recording, hosts: list[Any]) -> _Step | None:
    """The step of ``recording`` for these host values, or ``None`` (a guard differs)."""
    try:
        out = recording.host(*hosts)
    except Exception:  # noqa: BLE001  (the rule raises here: the plain path raises it)
        return None
    if out is None:
        return None
    values, shared = out
    rebuild, rebuild_all = recording.rebuild, recording.rebuild_all
    return _Step(
        recording.program,
        values,
        lambda a: rebuild(a, shared),
        recording.shape_used,
        recording,
        lambda arrays: rebuild_all(arrays, shared),
    )


def _traced(
    arrays: Arrays,
    rule: Any,
    state: Any,
    leaf_arrays: list[Any],
    x: Any,
    dtype: str,
    dtypes: tuple[str, ...],
) -> _Step | None:
    """The step recorded with the state's host values (for this step only)."""
    try:
        recorded = trace(
            rule, state, leaf_arrays, tuple(x.shape), dtype, dtypes, arrays.name
        )
    except OperatorWarning:  # the rule's Python operator, a warning made an error
        raise
    except Exception:  # noqa: BLE001  (not recordable: plain path)
        return None
    counters["traced"] += 1
    rebuild = recorded.rebuild
    return _Step(
        recorded.program,
        recorded.values,
        rebuild,
        recorded.shape_used,
        None,
        lambda arrays: list(map(rebuild, arrays)),
    )


@dataclasses.dataclass(eq=False)
class _Part:
    """A launch's leaves, kept with the plan for the next step (see :class:`_Kept`)."""

    step: _Step
    leaves: list[_Leaf]
    dtype: str
    dtypes: tuple[str, ...]
    launch: _Launch

    def __post_init__(self) -> None:
        #: The leaves' positions and state arrays (the same at every step).
        self.positions = [leaf.position for leaf in self.leaves]
        self.state_arrays = [leaf.arrays for leaf in self.leaves]
        #: (Without their gradients, which the plan does not read again: new
        #: gradients at every step are not held here, nor the first ones kept.)
        self.leaves = [leaf._replace(grad=None) for leaf in self.leaves]


_RULE, _STATE, _X, _GRAD = (operator.itemgetter(k) for k in range(4))
_CALL = weakref.ref.__call__  # (operator.call is Python >= 3.11)
_DTYPE = operator.attrgetter("dtype")


def _launch(
    arrays: Arrays,
    step: _Step,
    group: list[_Leaf],
    states: list[Any],
    parts: list[_Part],
    dtype: str,
    dtypes: tuple[str, ...],
) -> list[_Launch]:
    program = step.program
    from agnosticopt.adapters._numba import kernel_for  # numba imports: see available()

    try:
        kernel = kernel_for(program)
        kernel.prepare(step.values)
    except Exception:  # noqa: BLE001  (cannot compile: plain path)
        return []
    targets = frozenset(a for a, _ in program.stores)
    state_targets = [a - 2 for a in targets if a >= 2]
    writeable, rebuild = arrays.writeable, step.state
    chosen, written = [], []
    for leaf in group:
        outs = [leaf.arrays[a] for a in state_targets]
        if 0 in targets:
            outs.append(leaf.x)
        if not all(writeable(a) for a in outs):
            continue
        chosen.append(leaf)
        written.extend(outs)
        states[leaf.position] = rebuild(leaf.arrays)
    if not chosen:
        return []
    table = _table(arrays, chosen, len(program.inputs))
    itemsizes = tuple(np.dtype(d).itemsize for d in program.inputs)
    launch = _Launch(
        kernel,
        table.table,
        table.sizes,
        step.values,
        itemsizes,
        targets,
        written,
        table.chunks,
    )
    parts.append(_Part(step, chosen, dtype, dtypes, launch))
    return [launch]


class _Kept:
    """The plan of the last update, for the next one of the same leaves.

    Valid while the next update has, at every place, the same rule, the state
    that this plan produced (held here, compared with ``is``), the same
    parameter array and, where the gradient is the same array too, nothing more
    to do; new gradient arrays (torch's ``zero_grad(set_to_none=True)``) only
    refresh the gradient column of the tables. On torch, whose tensors can move
    to other memory (``p.data = ...``, ``state.m.data = ...``, ``set_``,
    ``swap_tensors``), the data addresses of the parameters, the written state
    tensors and the gradients must be the same too. (numpy arrays keep their
    memory, but for ``resize(refcheck=False)``, which numpy itself calls unsafe
    with other references alive: that one is not detected.) Each group's step is then the
    replay of its recording on the new host values (a guard that differs, or a
    structure never seen, records again); nothing is walked per leaf but these
    comparisons and the new state.
    """

    def __init__(
        self,
        arrays: Arrays,
        items: Items,
        states: list[Any],
        parts: list[_Part],
        launches: list[_Launch],
    ) -> None:
        self.arrays = arrays
        #: The clip and skip leaves, computed again at every step (None: none),
        #: and then the rules given (the chains) that they came from.
        self.cross: _Cross | None = None
        self.chains: list[Any] = []
        self.rules = [item[0] for item in items]
        self.xs = [item[2] for item in items]
        self.written = [a for launch in launches for a in launch.written]
        self.writeable = arrays.still_writeable(self.written)
        grads = list(map(_GRAD, items))
        self.grads = list(map(weakref.ref, grads))
        self.states = states
        self.parts = parts
        self.launches = launches
        self.torch = arrays.array_type is not np.ndarray
        #: torch: the data addresses of the parameters and written state arrays, and
        #: of the gradients (a tensor's memory can move: ``.data =``, ``set_``).
        self.watched = list({id(a): a for a in (*self.xs, *self.written)}.values())
        self.addresses = arrays.addresses(self.watched) if self.torch else []
        self.grad_addresses = arrays.addresses(grads) if self.torch else []
        #: The dtypes of the parameters and gradients, which can change in place
        #: (numpy ``a.dtype = ...``, torch ``p.data = p.data.view(torch.int32)``).
        self.x_dtypes = list(map(_DTYPE, self.xs))
        self.grad_dtypes = list(map(_DTYPE, grads))
        #: Whether some leaves come with λ in their state (:class:`_Factor`).
        self.factored = any(type(item[1]) is _Factor for item in items)
        #: The sorted spans of the arrays the kernels write (:func:`_written_spans`),
        #: made when new gradients first come.
        self.written_spans: tuple[np.ndarray, np.ndarray] | None = None
        #: One launch for all leaves, in their order: its new states are the list.
        self.whole = len(parts) == 1 and parts[0].positions == list(range(len(items)))

    def again(self, items: Items) -> FastPlan | None:
        """The plan for ``items``, or ``None`` when it must be made anew."""
        states, xs = self.states, self.xs
        if len(items) != len(states):
            return None
        given: Any = map(_STATE, items)
        if self.factored:
            given = [s.state if type(s) is _Factor else s for s in given]
        if not (
            all(map(operator.is_, map(_RULE, items), self.rules))
            and all(map(operator.is_, given, states))
            and all(map(operator.is_, map(_X, items), xs))
        ):
            return None
        grads = list(map(_GRAD, items))
        fresh = not all(map(operator.is_, map(_CALL, self.grads), grads))
        arrays = self.arrays
        if self.torch and (
            arrays.addresses(self.watched) != self.addresses
            or (not fresh and arrays.addresses(grads) != self.grad_addresses)
        ):
            return None  # memory moved under the same tensor (.data =, set_, ...)
        if not arrays.unchanged(xs, self.x_dtypes) or (
            not fresh and not arrays.unchanged(grads, self.grad_dtypes)
        ):
            return None  # another dtype or layout in place (a.dtype =, .data = p.T)
        if not self.writeable():
            return None
        steps = []
        for part in self.parts:
            first = part.leaves[0]
            state = items[first.position][1]  # states[...], or λ and it
            if type(state) is _Factor and not _one_factor(items, part.leaves, state):
                return None  # the leaves of one kernel call have other λ now
            step = _step_of(
                arrays,
                first.rule,
                state,
                first.arrays,
                first.x,
                part.dtype,
                part.dtypes,
            )
            if step is None or step.program is not part.step.program:
                return None  # another program (a guard, a structure): plan anew
            steps.append(step)
        if fresh and not self._new_grads(items):
            return None
        new_states = list(states)
        launches = []
        for part, step in zip(self.parts, steps, strict=True):  # nothing declines now
            made = step.states(part.state_arrays)
            if self.whole:
                new_states = made
            else:
                deque(map(new_states.__setitem__, part.positions, made), maxlen=0)
            launches.append(dataclasses.replace(part.launch, values=step.values))
            part.step = step
        self.states = new_states
        counters["fast"] += len(items)
        counters["reused"] += len(items)
        return FastPlan(new_states, launches, arrays, replayable=True)

    def _new_grads(self, items: Items) -> bool:
        """Take new gradient arrays: check them, refresh the tables' gradient column.

        ``False`` when one cannot be read by the kernels or overlaps a written array.
        """
        arrays = self.arrays
        grads = list(map(_GRAD, items))
        for part in self.parts:  # (before any address: one may have no storage)
            if not arrays.readable(
                grads if self.whole else [grads[k] for k in part.positions], part.dtype
            ):
                return False
        try:
            addresses = np.array(arrays.addresses(grads), dtype=np.int64)
        except RuntimeError:  # a torch tensor without storage (a functorch wrapper)
            return False
        launches = []
        for part in self.parts:
            launch = part.launch
            table = launch.table.copy()
            table[:, 1] = addresses[part.positions]
            launches.append(dataclasses.replace(launch, table=table))
        if self.written_spans is None:  # (the same while the plan is kept)
            self.written_spans = _written_spans(launches)
        if _reads_overlap(self.written_spans, launches, 1):
            return False
        for part, launch in zip(self.parts, launches, strict=True):
            part.launch = launch
        self.grads = list(map(weakref.ref, grads))
        self.grad_dtypes = list(map(_DTYPE, grads))
        if self.torch:
            self.grad_addresses = addresses.tolist()
        return True


def _one_factor(items: Items, leaves: list[_Leaf], first: _Factor) -> bool:
    """Whether every leaf of ``leaves`` has the λ of ``first`` (the same bits)."""
    lam = first.lam
    for leaf in leaves:
        other = items[leaf.position][1].lam
        if other is not lam and other.tobytes() != lam.tobytes():
            return False
    return True


#: The kept plans (:class:`_Kept`) of the last updates, by :func:`_kept_key`: the
#: :data:`KEPT_PLANS` newest of each memory access, so that trees stepped in turn
#: on one backend (a GAN's generator and discriminator) keep theirs (as many as
#: ``agnosticopt/_replay.py`` remembers; two trees of the same parameters share a
#: key, so each replans at every step).
_kept: dict[tuple[int, int], _Kept] = {}
KEPT_PLANS = 4


@dataclasses.dataclass(eq=False)
class _Table:
    """The addresses of a set of leaves' arrays, kept while those arrays are the same.

    ``refs`` are weak references to every array of every row (a table holds no
    array alive); the table is valid while each still refers to the array at its
    place: an array replaced in the model, in the gradients or in a state, or
    an ``id`` reused by a new array, gives a new table.
    """

    refs: list[Any]
    table: np.ndarray
    sizes: np.ndarray
    chunks: np.ndarray


#: Tables by the identities of their arrays (see :func:`_table`).
_tables: dict[Any, _Table] = {}
#: Most tables kept; beyond, the cache starts again (a model rebuilt at every step).
TABLES = 256


def _table(arrays: Arrays, leaves: list[_Leaf], width: int) -> _Table:
    """The table of ``leaves`` (one row of ``width`` addresses each), from the cache.

    The key is the ``id`` of every array, and for a backend whose array objects
    can change memory (torch: ``p.data = ...``, ``set_``, ``resize_``) its data
    address too; sizes are part of it. numpy arrays keep their memory for
    their lifetime, so their ``id`` suffices.
    """
    flat = [a for leaf in leaves for a in (leaf.x, leaf.grad, *leaf.arrays)]
    if arrays.array_type is np.ndarray:
        key: tuple[Any, ...] = (width, *map(id, flat), *[leaf.size for leaf in leaves])
    else:
        address = arrays.address
        key = (
            width,
            *[(id(a), address(a)) for a in flat],
            *[leaf.size for leaf in leaves],
        )
    found = _tables.get(key)
    if found is not None and all(
        r() is a for r, a in zip(found.refs, flat, strict=True)
    ):
        return found
    from agnosticopt.adapters._numba import chunks_of

    address = arrays.address
    table = np.array([address(a) for a in flat], dtype=np.int64).reshape(
        len(leaves), width
    )
    sizes = np.array([leaf.size for leaf in leaves], dtype=np.int64)
    if len(_tables) >= TABLES:
        _tables.clear()
        _overlaps.clear()
    found = _tables[key] = _Table(
        [weakref.ref(a) for a in flat], table, sizes, chunks_of(sizes)
    )
    return found


#: Whether the launches of a plan overlap, by the identity of their tables.
_overlaps: dict[Any, tuple[list[np.ndarray], bool]] = {}


def _overlapping_cached(launches: list[_Launch]) -> bool:
    """:func:`_overlapping`, remembered while the launches use the same tables."""
    key = tuple(
        (id(launch.table), launch.targets, launch.itemsizes) for launch in launches
    )
    found = _overlaps.get(key)
    if found is not None and all(
        t is launch.table for t, launch in zip(found[0], launches, strict=True)
    ):
        return found[1]
    verdict = _overlapping(launches)
    _overlaps[key] = ([launch.table for launch in launches], verdict)
    return verdict


def _spans(launch: _Launch, column: int) -> tuple[np.ndarray, np.ndarray]:
    """The start and end addresses of the arrays of a table column (none empty)."""
    full = launch.sizes > 0
    start = launch.table[full, column]
    return start, start + launch.sizes[full] * launch.itemsizes[column]


def _written_spans(launches: list[_Launch]) -> tuple[np.ndarray, np.ndarray]:
    """The starts and ends of the arrays that ``launches`` write, in address order.

    Only for launches that :func:`_overlapping` passed: no written array overlaps
    another, so the ends are in order too.
    """
    found = [_spans(launch, c) for launch in launches for c in sorted(launch.targets)]
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    start = np.concatenate([s for s, _ in found])
    end = np.concatenate([e for _, e in found])
    order = np.argsort(start, kind="stable")
    return start[order], end[order]


def _reads_overlap(
    written: tuple[np.ndarray, np.ndarray], launches: list[_Launch], column: int
) -> bool:
    """Whether an array of table ``column`` (read only) overlaps a written one.

    :func:`_overlapping` for a kept plan whose only new arrays are that column's
    (new gradients): reads may overlap reads, and the written arrays were checked
    when the plan was made. The last written array starting before a read one
    ends is the one that reaches furthest (:func:`_written_spans`).
    """
    w_start, w_end = written
    if not len(w_start):
        return False
    for launch in launches:
        start, end = _spans(launch, column)
        last = np.searchsorted(w_start, end, side="left") - 1
        if np.any((last >= 0) & (w_end[np.maximum(last, 0)] > start)):
            return True
    return False


def _overlapping(launches: list[_Launch]) -> bool:
    """Whether an array that a kernel writes overlaps any other array of the plan.

    Reads may overlap reads (one gradient for two parameters); a written array
    may overlap nothing, else the whole plan goes to the plain path.
    """
    if sum(launch.table.size for launch in launches) <= 12:  # a few arrays: pairwise
        spans = [
            (row[c], row[c] + size * itemsize, c in launch.targets)
            for launch in launches
            for row, size in zip(
                launch.table.tolist(), launch.sizes.tolist(), strict=True
            )
            if size
            for c, itemsize in enumerate(launch.itemsizes)
        ]
        return any(
            (w0 or w1) and s0 < e1 and s1 < e0
            for (s0, e0, w0), (s1, e1, w1) in itertools.combinations(spans, 2)
        )
    starts, ends, writes = [], [], []
    for launch in launches:
        full = launch.sizes > 0
        for column, itemsize in enumerate(launch.itemsizes):
            start = launch.table[full, column]
            starts.append(start)
            ends.append(start + launch.sizes[full] * itemsize)
            writes.append(np.full(start.shape, column in launch.targets))
    start, end, write = (
        np.concatenate(starts),
        np.concatenate(ends),
        np.concatenate(writes),
    )
    order = np.lexsort((end, start))
    start, end, write = start[order], end[order], write[order]
    reach = np.maximum.accumulate(end)
    hit = np.zeros(start.shape, dtype=bool)
    hit[1:] |= start[1:] < reach[:-1]  # overlaps an interval that starts earlier
    hit[:-1] |= start[1:] < end[:-1]  # overlaps the next interval
    return bool(np.any(hit & write))
