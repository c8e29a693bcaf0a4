"""The second and third phases of an update: compute every step, then write them.

:func:`_compute` checks each state, applies each rule (or hands the leaves to
their adapter's compiled fast path, :class:`agnosticopt._protocols.FastPlan`)
and checks each step, writing nothing; :func:`_commit` (``update_`` only) runs the
fast plans and writes the parameters and states, with Ctrl-C held back.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any, cast

from agnosticopt._containers import format_path
from agnosticopt._global import cross_leaf_plain, run_stages
from agnosticopt._plan import _Entry, asked_hook
from agnosticopt._protocols import ArrayAdapter, CompiledPlan, FastPlanner
from agnosticopt._rule import Replace
from agnosticopt._speed import fast_path_enabled
from agnosticopt._validate import (
    Written,
    check_state,
    check_step,
    overlapping_parameters,
)

try:  # CPython's C module behind :mod:`signal` (see _interrupts_deferred)
    _raw_signal: ModuleType = importlib.import_module("_signal")
except ImportError:  # pragma: no cover  (another interpreter)
    _raw_signal = signal

#: A fast plan and the entries it updates.
_Planned = tuple[CompiledPlan, list[_Entry]]


def _compute(entries: list[_Entry], *, in_place: bool) -> list[_Planned]:
    """Check and apply every rule, writing nothing: fills ``state``, ``new_x``, ``write``.

    Every leaf that takes a step has its state checked against its parameter
    first, every step is checked after its rule (:mod:`agnosticopt._validate`);
    with ``in_place``, parameters that share memory raise, and a step that shares
    memory with a parameter to be written is copied. Leaves whose adapter has a
    fast path are planned by it (after the state checks); returns those plans,
    whose kernels :func:`_commit` runs.
    """
    stepping = [e for e in entries if e.grad is not None and not e.leaf.frozen]
    for entry in stepping:
        check_state(entry.leaf, entry.x, entry.xp, entry.path)
    written = Written()
    asked: dict[tuple[int, str], tuple[Any, Any]] = {}
    if in_place:
        for entry in stepping:  # an adapter whose arrays cannot be written (dask)
            refused = asked_hook(entry.xp, "refuses_in_place", asked)
            if refused:
                msg = f"update_: the parameter at {format_path(entry.path)}: {refused}"
                raise TypeError(msg)
        writes = [
            e.grad is not None and not e.leaf.frozen and e.xp.writeable(e.x)
            for e in entries
        ]
        overlapping_parameters(
            [(e.x, e.xp, e.path, w) for e, w in zip(entries, writes, strict=True)]
        )
        for e, w in zip(entries, writes, strict=True):
            if w:
                written.add(e.x, e.xp)
    plans = _fast_plans(entries) if in_place and fast_path_enabled() else []
    staged = _cross_leaf_steps(entries)
    for entry in entries:
        leaf, x, xp = entry.leaf, entry.x, entry.xp
        entry.new_x = x
        if entry.fast:
            continue
        entry.state = leaf.state
        if entry.grad is None or leaf.frozen:
            continue
        with xp.computing():
            try:
                found = staged.get(id(entry))
                rule = leaf.rule if entry.plain_rule is None else entry.plain_rule
                entry.state, step = (
                    found
                    if found is not None
                    else rule.apply(leaf.state, x, entry.grad, xp)
                )
            except Exception as exc:
                _add_note(
                    exc, f"while updating the parameter at {format_path(entry.path)}"
                )
                raise
            if step is None:
                continue
            value = step.value if isinstance(step, Replace) else step
            check_step(value, x, xp, entry.path, leaf.rule)
            if in_place and xp.writeable(x):
                if written.overlaps(value, xp):  # e.g. a step that is (a view of) a
                    value = xp.copy(value)  # parameter: written before it is read
                    step = Replace(value) if isinstance(step, Replace) else value
                entry.write = step
            else:
                entry.new_x = _stepped(xp, x, step)
    for entry in entries:
        if entry.outer is not None:  # back to DTensors laid out as the parameter
            outer, oxp = entry.outer, entry.outer_xp
            entry.state = oxp.wrap_state(outer, entry.x, entry.state)
            entry.new_x = (
                outer if entry.new_x is entry.x else oxp.rewrap(outer, entry.new_x)
            )
    return plans


def _cross_leaf_steps(entries: list[_Entry]) -> dict[int, tuple[Any, Any]]:
    """``id(entry) -> (state, step)`` for the leaves whose rule reduces over every
    leaf (global-norm clipping, non-finite skip): see ``agnosticopt/_global.py``."""
    return run_stages(
        [
            e
            for e in entries
            if not e.fast
            and e.plain_rule is None
            and e.grad is not None
            and not e.leaf.frozen
        ]
    )


def _fast_plans(entries: list[_Entry]) -> list[_Planned]:
    """Offer the leaves to take a step to their adapter's ``fast_plan``, if any.

    ``fast_plan(items)`` (:class:`~agnosticopt._protocols.FastPlanner`) takes
    ``(rule, state, x, grad)`` per leaf and returns ``None`` or a
    :class:`~agnosticopt._protocols.CompiledPlan`: ``handled`` and ``states`` (one
    per item) and a ``run()`` that writes the new state arrays and parameters in
    place. Planning
    writes nothing and computes the new states, so that an ``update_`` that
    raises later still changes nothing (see ``adapters/_fast.py``).

    A plan that did a leaf's cross-leaf stage itself (``adapters/dtensor.py``:
    the norm clips of DTensor shards, whose collectives every rank issues alike)
    but leaves the rest of its chain to the plain path names, in
    ``plain_rules``, the rule the plain path applies instead (``None`` where the
    leaf's own rule); such a leaf takes no part in :func:`run_stages`. An error
    raised while planning that carries ``agnosticopt_item`` (the position of the
    leaf whose rule raised) gets the key path of that leaf as a note.
    """
    by_adapter: dict[int, tuple[FastPlanner, list[_Entry]]] = {}
    plain = cross_leaf_plain(entries)  # a reduction over leaves of several adapters
    asked: dict[tuple[int, str], tuple[Any, Any]] = {}
    for entry in entries:
        if entry.grad is None or entry.leaf.frozen or id(entry) in plain:
            continue
        if asked_hook(entry.xp, "fast_plan", asked) is not None:
            xp = cast(FastPlanner, entry.xp)
            by_adapter.setdefault(id(xp), (xp, []))[1].append(entry)
    plans = []
    for xp, group in by_adapter.values():
        items = [(e.leaf.rule, e.leaf.state, e.x, e.grad) for e in group]
        with xp.computing():
            try:
                plan = xp.fast_plan(items)
            except Exception as exc:
                at = getattr(exc, "agnosticopt_item", None)
                if isinstance(at, int):
                    where = format_path(group[at].path)
                    _add_note(exc, f"while updating the parameter at {where}")
                raise
        if plan is None:
            continue
        plain_rules = getattr(plan, "plain_rules", None)
        taken = []
        for k, (entry, handled, state) in enumerate(
            zip(group, plan.handled, plan.states, strict=True)
        ):
            if handled:
                entry.fast, entry.state = True, state
                taken.append(entry)
            elif plain_rules is not None:
                entry.plain_rule = plain_rules[k]
        plans.append((plan, taken))
    return plans


def _stepped(xp: ArrayAdapter, x: Any, step: Any) -> Any:
    """A new array ``x - step`` (or the ``Replace`` value) in the dtype and class of ``x``."""
    new = xp.copy(step.value) if isinstance(step, Replace) else xp.subtract(x, step)
    if xp.dtype_name(new) != xp.dtype_name(x):
        new = xp.astype(new, xp.dtype_name(x))
    return xp.rewrap(x, new)


def _commit(entries: list[_Entry], plans: list[_Planned]) -> None:
    """``update_``'s second phase: run the fast plans, write, store the states.

    Everything written here was checked by :func:`_compute`. A Ctrl-C during
    the commit is held back until it ends (:func:`_interrupts_deferred`), so an
    interrupted ``update_`` has either not started writing or finished. Each
    leaf's parameter is written before its state is replaced, and a plan's leaves
    get their new state right after its kernels: should a write still fail (out
    of memory), the leaves before it are updated and the others untouched, and
    no leaf has a new state with an old parameter.
    """
    with _interrupts_deferred():
        for plan, taken in plans:
            plan.run()
            for entry in taken:
                entry.owner.state = entry.state
        for entry in entries:
            if entry.write is not None:
                xp = entry.xp
                with xp.computing():
                    if isinstance(entry.write, Replace):
                        xp.assign_(entry.x, entry.write.value)
                    else:
                        xp.subtract_(entry.x, entry.write)
            entry.owner.state = entry.state


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) back until the block ends, then raise KeyboardInterrupt.

    Only in the main thread (where Python runs signal handlers) and only when
    SIGINT has Python's default handler; otherwise the block runs as it is.
    (``_signal``'s functions: :mod:`signal`'s wrappers convert to and from enums,
    12 µs a block, a fifth of a short-way step of 200 leaves.)
    """
    if (
        threading.get_ident() != threading.main_thread().ident
        or _raw_signal.getsignal(_SIGINT) is not _DEFAULT
    ):
        yield
        return
    caught: list[Any] = []
    try:
        _raw_signal.signal(_SIGINT, lambda signum, frame: caught.append(frame))
    except ValueError:  # not the main interpreter: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        _raw_signal.signal(_SIGINT, _DEFAULT)
    if caught:
        raise KeyboardInterrupt


_SIGINT = int(signal.SIGINT)
_DEFAULT = signal.default_int_handler


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python >= 3.11
    if add_note is not None:
        add_note(note)
