"""``train_``: Optimisers.jl's (and Flux's) ``train!`` loop, with a progress bar.

The loop lives here; how a backend differentiates lives in its adapter module,
as a function ``value_and_grad(fn, arrays) -> (value, grads)`` (torch: autograd,
JAX: ``jax.grad``). numpy has none: pass your own ``value_and_grad``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from collections.abc import Callable, Iterable, Sized
from typing import Any, NamedTuple

from agnosticopt._containers import flatten
from agnosticopt._flat import _find, _rebuild
from agnosticopt._update import update_

__all__ = ["History", "TrainStep", "train_"]


class TrainStep(NamedTuple):
    """What a callback of :func:`train_` sees after each step.

    ``step`` counts from 1 over all epochs; ``loss`` is the batch's loss (a
    Python float) before the step; ``model`` and ``tree`` are after it.
    """

    step: int
    epoch: int
    loss: float
    model: Any
    tree: Any
    batch: Any


@dataclasses.dataclass
class History:
    """What :func:`train_` returns.

    Attributes
    ----------
    loss
        The loss of every step, as Python floats, in order.
    model, tree
        The model and state tree after the last step (the same objects that were
        passed in where every parameter was written in place: numpy, torch).
    stopped
        Whether a callback stopped the training early.
    """

    loss: list[float]
    model: Any
    tree: Any
    stopped: bool = False

    @property
    def steps(self) -> int:
        """The number of steps taken."""
        return len(self.loss)


ValueAndGrad = Callable[..., tuple[Any, Any]]


def train_(
    loss: Callable[..., Any] | None,
    model: Any,
    data: Iterable[Any],
    tree: Any,
    *,
    value_and_grad: ValueAndGrad | None = None,
    epochs: int = 1,
    callbacks: Iterable[Callable[[TrainStep], Any]] = (),
    progress: bool | None = None,
) -> History:
    """Train ``model`` in place: one :func:`update_` per batch of ``data``.

    For each ``batch`` in ``data`` (``epochs`` times), as Flux's
    ``train!(loss, model, data, opt_state)``::

        value, grads = value_and_grad(model, *batch)  # loss(model, *batch) and its gradient
        tree, model = opt.update_(tree, model, grads)

    A batch that is a ``tuple`` is splatted into ``loss``; anything else is
    passed as one argument.

    Parameters
    ----------
    loss
        ``loss(model, *batch)``, a scalar. Differentiated by the backend of the
        model's arrays: torch (autograd, the model's tensors need not require
        grad) or JAX (``jax.grad``). May be ``None`` when ``value_and_grad`` is
        given.
    model
        The model (nested containers of arrays), as for :func:`setup`.
    data
        An iterable of batches; it must be re-iterable when ``epochs > 1``.
    tree
        The state tree from :func:`setup`.
    value_and_grad
        ``value_and_grad(model, *batch) -> (loss, grads)``, ``grads`` mirroring
        the model as for :func:`update`: your own gradients (numpy, which has
        no automatic differentiation), used instead of the backend's.
    epochs
        Passes over ``data``.
    callbacks
        Called after every step with a :class:`TrainStep`; a callback that
        returns ``True`` stops the training after that step.
    progress
        A tqdm progress bar showing the loss: ``True`` shows it, ``False`` never,
        ``None`` (default) when standard error is a terminal. Without tqdm
        (``pip install agnosticopt[progress]``) there is none (``True`` warns).

    Returns
    -------
    History
        The losses, the final model and tree, and whether a callback stopped.

    Raises
    ------
    TypeError
        If the model's backend cannot differentiate and no ``value_and_grad``
        is given, or ``loss`` returns no scalar. Errors of :func:`update_` name
        the key path.

    Notes
    -----
    The steps are exactly those of the hand-written loop above: the same
    gradients give the same bits.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        msg = f"train_: epochs must be an integer >= 1, got {epochs!r}"
        raise ValueError(msg)
    if epochs > 1 and iter(data) is data:
        msg = "train_: with epochs > 1, data must be re-iterable (a list, a DataLoader), not an iterator"
        raise ValueError(msg)
    if value_and_grad is None:
        if loss is None:
            msg = "train_ needs a loss, or a value_and_grad function"
            raise TypeError(msg)
        value_and_grad = _autodiff(loss)
    elif not callable(value_and_grad):
        msg = f"train_: value_and_grad must be callable, got {value_and_grad!r}"
        raise TypeError(msg)
    callbacks = list(callbacks)
    total = len(data) * epochs if isinstance(data, Sized) else None
    bar = _progress_bar(progress, total)
    history = History([], model, tree)
    try:
        for epoch in range(epochs):
            for batch in data:
                args = batch if isinstance(batch, tuple) else (batch,)
                value, grads = value_and_grad(model, *args)
                tree, model = update_(tree, model, grads)
                lost = float(value)
                history.loss.append(lost)
                history.model, history.tree = model, tree
                if bar is not None:
                    bar.set_postfix(loss=f"{lost:.4g}", refresh=False)
                    bar.update()
                info = TrainStep(history.steps, epoch, lost, model, tree, batch)
                stops = [cb(info) is True for cb in callbacks]  # every callback runs
                if any(stops):
                    history.stopped = True
                    return history
    finally:
        if bar is not None:
            bar.close()
    return history


def _autodiff(loss: Callable[..., Any]) -> ValueAndGrad:
    """``value_and_grad`` by the backend of the model's arrays (its adapter module)."""

    def value_and_grad(model: Any, *args: Any) -> tuple[Any, Any]:
        found = _find(model)
        if not found:
            msg = "train_: the model has no trainable arrays"
            raise TypeError(msg)
        xp = found[0].xp
        module = sys.modules.get(type(xp).__module__) or importlib.import_module(
            type(xp).__module__
        )
        backend_grad = getattr(module, "value_and_grad", None)
        if backend_grad is None:
            msg = (
                f"train_: {xp.name} arrays have no automatic differentiation; pass "
                "value_and_grad=fn, with fn(model, *batch) -> (loss, grads)"
            )
            raise TypeError(msg)
        ids = [id(f.x) for f in found]
        if _holds_module(model):  # its parameters cannot be swapped: autograd in place
            in_place = getattr(module, "value_and_grad_in_place", None)
            if in_place is None:
                msg = f"train_: {xp.name} has no in-place differentiation for a module"
                raise TypeError(msg)
            value, grads = in_place(lambda: loss(model, *args), [f.x for f in found])
            return value, _grad_tree(model, dict(zip(ids, grads, strict=True)))

        def of_arrays(arrays: list[Any]) -> Any:
            return loss(_rebuild(model, dict(zip(ids, arrays, strict=True))), *args)

        value, grads = backend_grad(of_arrays, [f.x for f in found])
        return value, _grad_tree(model, dict(zip(ids, grads, strict=True)))

    return value_and_grad


def _holds_module(model: Any) -> bool:
    """Whether ``model`` is or holds a backend module (``torch.nn.Module``)."""
    node = flatten(model)
    if node is None:
        return False
    return node.kind == "module" or any(_holds_module(c) for c in node.children)


def _grad_tree(model: Any, grads: dict[int, Any]) -> Any:
    """Gradients mirroring ``model`` (dicts and lists); a tied array's at its first place."""
    placed: set[int] = set()

    def walk(x: Any) -> Any:
        node = flatten(x)
        if node is None:
            if id(x) not in grads or id(x) in placed:
                return None
            placed.add(id(x))
            return grads[id(x)]
        children = [
            None if k in node.untrainable else walk(c)
            for k, c in zip(node.keys, node.children, strict=True)
        ]
        if node.named:
            return dict(zip(node.keys, children, strict=True))
        return children

    return walk(model)


def _progress_bar(progress: bool | None, total: int | None) -> Any:
    if progress is False:
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        if progress:
            warnings.warn(
                "train_: progress=True needs tqdm (pip install "
                "'agnosticopt[progress]'); training without a progress bar",
                UserWarning,
                stacklevel=3,
            )
        return None
    return tqdm(total=total, desc="train_", unit="step")
