"""``update_``'s short way: the last update of a tree again, on the same leaves and arrays.

A training loop calls ``update_(tree, model, grads)`` with the same tree and
model at every step, and the full way (:mod:`agnosticopt._plan`,
:mod:`agnosticopt._commit`) then checks again, leaf by leaf, what has not
changed. After an ``update_`` that its adapter's fast path did whole (one
adapter, every leaf that took a step compiled, nothing on the plain path),
:func:`remember` keeps what that update saw: the tree's Leaf objects in walk
order, the model's arrays, the gradient arrays (weakly), which leaves took a
step, and the objects at the tree's ``None`` places. :func:`replay` takes the
next ``update_`` of the same tree the short way when all of these hold:

* the tree, model and gradients are lists, tuples and dicts only (no registered
  container, no namedtuple, dataclass or module), walked in step: the same Leaf
  objects, the same parameter arrays, the same objects at the tree's ``None``
  places (still not trainable), the same leaves taking a step (a gradient given,
  not frozen), and no extra gradient key;
* each parameter has the shape it had (an array reshaped in place no longer fits
  its state), and each gradient is the same array as last time or a new one of
  the parameter's adapter and dtype, of the parameter's shape (the checks the
  full way passes first);
* the adapter still holds that update's plan for these leaves, rules and states
  (``fast_replay``, see ``adapters/_fast.py``: a rule changed by ``adjust_``, a
  state replaced, a torch ``p.data`` reassigned, an array made read-only or a
  gradient that overlaps a written array make it decline).

Then the plan runs and the new states are stored, as :func:`agnosticopt._commit._commit`
does; the bits are those of the full way. Anything else, and anything that
raises while replaying, takes the full way, which checks everything and
raises with its key path. The last four trees updated are remembered (two trees
updated in turn, a GAN's generator and discriminator, both take the short way).
"""

from __future__ import annotations

import operator
import weakref
from collections import deque
from itertools import repeat
from typing import Any

from agnosticopt._commit import _interrupts_deferred
from agnosticopt._containers import builtins_are_plain, flatten
from agnosticopt._leaf import Leaf, trainable_adapter
from agnosticopt._plan import _Entry, hook
from agnosticopt._speed import fast_path_enabled
from agnosticopt._xp import adapted_by, adapter_for

__all__ = ["counters", "forget", "remember", "replay"]

#: Since import (tests, benchmarks): updates taken the short way.
counters = {"replayed": 0}
#: Off: every update takes the full way (for measuring; the same bits).
SHORT_WAY = True

#: Hooks of an adapter whose leaves the short way does not take (the full way asks
#: them per update). ``check_leaf`` is not one: it looks at the array object only
#: (torch: refuses a ``DTensor.to_local()`` view), and each array was checked when
#: :func:`remember` kept it.
_FULL_WAY_HOOKS = ("local_adapter", "refuses_in_place")


class _Seen:
    """What one ``update_`` saw, in walk order (see the module docstring).

    The parameters are held, as the adapter's kept plan holds them (until four
    newer updates replace it), and compared with ``is``: not through a weak
    reference, one more object per leaf to fetch from memory. The Leaf objects
    are held weakly (each holds its state: a tree dropped by its user, an
    optimiser made anew for the same model, is not kept alive here), and so are
    the gradients (a loop that makes new ones at every step frees the old ones).
    """

    __slots__ = (
        "all_stepping",
        "gradients",
        "leaves",
        "others",
        "shapes",
        "stepping",
        "xp",
        "xs",
    )

    def __init__(
        self,
        xp: Any,
        leaves: list[Leaf],
        xs: list[Any],
        grads: list[Any],
        others: list[Any],
    ) -> None:
        self.xp = xp
        self.leaves = list(map(weakref.ref, leaves))
        self.xs = xs
        self.shapes = list(map(_SHAPE, xs))
        self.others = others
        self.stepping = [
            g is not None and not leaf.frozen
            for leaf, g in zip(leaves, grads, strict=True)
        ]
        #: Every leaf took a step (the usual case: :func:`replay` checks all at once).
        self.all_stepping = all(self.stepping)
        self.gradients: list[Any] = [
            None if g is None else weakref.ref(g) for g in grads
        ]


#: What the last updates saw (:class:`_Seen`), by ``id`` of their tree: the
#: :data:`REMEMBERED` newest (two trees stepped in turn keep theirs). A tree's
#: ``id`` reused by a new tree finds other Leaf objects: the full way.
_SEEN: dict[int, _Seen] = {}
REMEMBERED = 4


def forget() -> None:
    """Forget every update (the next ``update_`` of each tree takes the full way)."""
    _SEEN.clear()


def _walk(
    t: Any,
    m: Any,
    g: Any,
    leaves: list[Any],
    xs: list[Any],
    gs: list[Any],
    others: list[Any],
) -> bool:
    """Walk tree ``t``, model ``m`` and gradients ``g`` of lists, tuples and dicts in step.

    Appends each Leaf with its array and gradient, and the model's object at each
    ``None`` of the tree; ``False`` for anything the full way must see.
    """
    kind = type(m)
    if kind is list or kind is tuple:
        if type(t) is not kind or len(t) != len(m):
            return False
        if g is None:
            children: Any = [None] * len(m)
        elif (type(g) is list or type(g) is tuple) and len(g) == len(m):
            children = g
        else:
            return False
        if all(map(operator.is_, map(type, t), repeat(Leaf))):  # a list of leaves
            leaves.extend(t)
            xs.extend(m)
            gs.extend(children)
            return True
        return all(
            _visit(tc, mc, gc, leaves, xs, gs, others)
            for tc, mc, gc in zip(t, m, children, strict=True)  # lengths checked
        )
    if kind is dict:
        if type(t) is not dict or len(t) != len(m):
            return False
        if g is not None and (type(g) is not dict or len(g) > len(m)):
            return False
        found = 0
        for key, mc in m.items():
            tc = t.get(key, _MISSING)
            if tc is _MISSING:
                return False
            gc = None if g is None else g.get(key)
            if gc is not None:
                found += 1
            if not _visit(tc, mc, gc, leaves, xs, gs, others):
                return False
        return g is None or found == len(g)  # no extra gradient key (nor a None value)
    return False


def _visit(
    tc: Any,
    mc: Any,
    gc: Any,
    leaves: list[Any],
    xs: list[Any],
    gs: list[Any],
    others: list[Any],
) -> bool:
    """One child of :func:`_walk`: a Leaf, a ``None`` of the tree, or a subtree."""
    if type(tc) is Leaf:
        leaves.append(tc)
        xs.append(mc)
        gs.append(gc)
        return True
    if tc is None:
        others.append(mc)
        return True
    return _walk(tc, mc, gc, leaves, xs, gs, others)


_MISSING: Any = object()
_SHAPE = operator.attrgetter("shape")


def remember(
    tree: Any, model: Any, grads: Any, entries: list[_Entry], plans: list[Any]
) -> None:
    """Keep what this ``update_`` saw, if the next one of ``tree`` can take the short way.

    Called after a successful commit with its entries and fast plans
    (``(plan, taken)`` pairs).
    """
    _SEEN.pop(id(tree), None)
    if len(plans) != 1 or not fast_path_enabled() or not builtins_are_plain():
        return
    plan, taken = plans[0]
    if not getattr(plan, "replayable", False):
        return  # the adapter keeps no plan of this update (a global clip...)
    stepping = [e for e in entries if e.grad is not None and not e.leaf.frozen]
    if not stepping or len(taken) != len(stepping):
        return
    xp = stepping[0].xp
    if hook(xp, "fast_replay") is None or any(
        hook(xp, h) is not None for h in _FULL_WAY_HOOKS
    ):
        return
    if any(
        e.xp is not xp or e.outer is not None or e.write is not None for e in entries
    ):
        return
    leaves: list[Any] = []
    xs: list[Any] = []
    gs: list[Any] = []
    others: list[Any] = []
    if not _walk(tree, model, grads, leaves, xs, gs, others):
        return
    if len(leaves) != len(entries) or any(
        e.leaf is not leaf or e.x is not x
        for e, leaf, x in zip(entries, leaves, xs, strict=True)
    ):
        return  # tied arrays (one entry for several places), or another order
    if any(flatten(o) is not None or trainable_adapter(o) is not None for o in others):
        return  # a container without trainable arrays today: the full way looks again
    try:
        seen = _Seen(xp, leaves, xs, gs, others)
    except TypeError:  # an array that cannot be weakly referenced
        return
    while len(_SEEN) >= REMEMBERED:  # the oldest goes
        del _SEEN[next(iter(_SEEN))]
    _SEEN[id(tree)] = seen


def replay(tree: Any, model: Any, grads: Any) -> bool:
    """Take this ``update_`` the short way if it can (see the module docstring).

    Returns whether it did; ``False`` has changed nothing.
    """
    seen = _SEEN.get(id(tree)) if SHORT_WAY else None
    if seen is None or not fast_path_enabled() or not builtins_are_plain():
        return False
    leaves: list[Any] = []
    xs: list[Any] = []
    gs: list[Any] = []
    others: list[Any] = []
    if not _walk(tree, model, grads, leaves, xs, gs, others):
        return False
    if (
        len(leaves) != len(seen.leaves)
        or not all(map(operator.is_, leaves, map(_CALL, seen.leaves)))
        or not all(map(operator.is_, xs, seen.xs))
        or len(others) != len(seen.others)
        or not all(map(operator.is_, others, seen.others))
    ):
        return False
    if any(trainable_adapter(o) is not None for o in others):
        return False
    shapes = list(map(_SHAPE, xs))
    if shapes != seen.shapes:  # a parameter reshaped in place: its state no longer fits
        return False
    xp = seen.xp
    checked = (_all_stepping if seen.all_stepping else _leaf_by_leaf)(
        seen, leaves, xs, gs, shapes
    )
    if checked is None:
        return False
    items, fresh = checked
    try:
        with xp.computing():
            plan = xp.fast_replay(items)
    except Exception:  # noqa: BLE001  (the full way raises it, with its key path)
        return False
    if plan is None or not all(plan.handled):
        return False
    stepped = (
        leaves
        if seen.all_stepping
        else [leaf for leaf, step in zip(leaves, seen.stepping, strict=True) if step]
    )
    states = plan.states
    if len(states) != len(stepped):
        return False
    with _interrupts_deferred():
        plan.run()
        deque(map(setattr, stepped, repeat("state"), states), maxlen=0)
    if len(fresh) == len(gs):  # new gradients everywhere (zero_grad(set_to_none=True))
        seen.gradients = list(map(weakref.ref, gs))
    else:
        for k in fresh:
            seen.gradients[k] = weakref.ref(gs[k])
    counters["replayed"] += 1
    return True


_Checked = tuple[list[Any], list[int]]


def _leaf_by_leaf(
    seen: _Seen, leaves: list[Any], xs: list[Any], gs: list[Any], shapes: list[Any]
) -> _Checked | None:
    """:func:`replay`'s checks of the leaves taking a step, and their items.

    ``(items, positions of new gradient arrays)``, or ``None`` for the full way.
    """
    xp = seen.xp
    items, fresh = [], []
    for k, (leaf, x, g, step, ref) in enumerate(
        zip(leaves, xs, gs, seen.stepping, seen.gradients, strict=True)
    ):
        if (g is not None and not leaf.frozen) is not step:
            return None
        if not step:
            continue
        if ref() is not g:
            if adapter_for(g) is not xp or g.dtype != x.dtype:
                return None
            fresh.append(k)
        if g.shape != shapes[k]:  # (a gradient kept may have been reshaped too)
            return None
        items.append((leaf.rule, leaf.state, x, g))
    return items, fresh


def _all_stepping(
    seen: _Seen, leaves: list[Any], xs: list[Any], gs: list[Any], shapes: list[Any]
) -> _Checked | None:
    """:func:`_leaf_by_leaf` when every leaf took a step last time, each check over
    all leaves at once (a fifth of the time on 200 leaves)."""
    if any(map(operator.is_, gs, repeat(None))) or any(map(_FROZEN, leaves)):
        return None  # a leaf no longer takes a step
    fresh: list[int] = []
    kept = list(map(operator.is_, gs, map(_CALL, seen.gradients)))
    if not all(kept):
        fresh = (
            [k for k, same in enumerate(kept) if not same]
            if any(kept)
            else list(range(len(gs)))  # (zero_grad(set_to_none=True))
        )
    if fresh:
        every = len(fresh) == len(gs)  # (zero_grad(set_to_none=True))
        new = gs if every else [gs[k] for k in fresh]
        dtypes = map(_DTYPE, xs if every else [xs[k] for k in fresh])
        if not adapted_by(new, seen.xp) or not all(
            map(operator.eq, map(_DTYPE, new), dtypes)  # (an unpickled dtype is
        ):  # equal, not the same object)
            return None
    if list(map(_SHAPE, gs)) != shapes:  # (a gradient kept may have been reshaped too)
        return None
    return list(
        zip(map(_RULE, leaves), map(_STATE, leaves), xs, gs, strict=True)
    ), fresh


_FROZEN = operator.attrgetter("frozen")
_RULE = operator.attrgetter("rule")
_STATE = operator.attrgetter("state")
_DTYPE = operator.attrgetter("dtype")
_CALL = weakref.ref.__call__
