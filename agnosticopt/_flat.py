"""A model's trainable arrays as a list, or as one flat vector and back."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, overload

from agnosticopt._containers import KeyPath, flatten, format_path
from agnosticopt._leaf import trainable_adapter
from agnosticopt._protocols import ArrayAdapter
from agnosticopt._xp import adapter_for

__all__ = ["Restructure", "destructure", "trainables"]


@dataclasses.dataclass(frozen=True)
class _Found:
    """One trainable array of a model, where it first appears, and its adapter."""

    path: KeyPath
    x: Any
    xp: ArrayAdapter


def _find(model: Any) -> list[_Found]:
    """The trainable arrays of ``model``, depth first, each tied array once."""
    found: list[_Found] = []
    seen: set[int] = set()
    open_: set[int] = set()

    def walk(x: Any, path: KeyPath) -> None:
        if id(x) in seen:
            return
        node = flatten(x)
        if node is None:
            xp = trainable_adapter(x)
            if xp is not None:
                seen.add(id(x))
                found.append(_Found(path, x, xp))
            return
        if id(x) in open_:
            msg = f"the model contains itself at {format_path(path)}"
            raise ValueError(msg)
        open_.add(id(x))
        for key, child in zip(node.keys, node.children, strict=True):
            if key not in node.untrainable:
                walk(child, (*path, key))
        open_.discard(id(x))
        seen.add(id(x))

    walk(model, ())
    return found


@overload
def trainables(model: Any, path: Literal[False] = ...) -> list[Any]: ...
@overload
def trainables(model: Any, path: Literal[True]) -> list[tuple[KeyPath, Any]]: ...
def trainables(model: Any, path: bool = False) -> list[Any]:
    """The trainable (floating-point and complex) arrays of ``model``.

    Parameters
    ----------
    model
        Nested containers of arrays, as for :func:`agnosticopt.setup`.
    path
        If true, return ``(key_path, array)`` pairs, where ``key_path`` is the
        tuple of keys leading to the array, such as ``('layers', 0, 'w')``.

    Returns
    -------
    list
        The arrays (or pairs) in depth-first order; an array that appears at
        several places (a tied array) is listed once, at its first place.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> w = np.ones(2)
    >>> opt.trainables({"a": w, "b": [w, np.arange(3)]}, path=True)
    [(('a',), array([1., 1.]))]
    """
    found = _find(model)
    if path:
        return [(f.path, f.x) for f in found]
    return [f.x for f in found]


def destructure(model: Any) -> tuple[Any, Restructure]:
    """Flatten the trainable arrays of ``model`` into one vector.

    Parameters
    ----------
    model
        Nested containers of arrays of one backend.

    Returns
    -------
    flat
        A new one-dimensional array: every trainable array, flattened in C
        order, joined in the order of :func:`trainables` (tied arrays once). It
        is differentiable, as in Optimisers.jl: on torch it carries autograd
        history (a ``grad_fn``) back to the model's tensors, and under
        ``jax.grad`` it is traced. Its
        dtype is what the backend's ``concat`` promotes the dtypes to. With no
        trainable array it is empty: float64, of the backend of any array in the
        model, else of numpy.
    restructure
        ``restructure(flat)`` rebuilds the model from a vector like ``flat``.

    Raises
    ------
    TypeError
        If the trainable arrays belong to different backends.

    Examples
    --------
    >>> import numpy as np, agnosticopt as opt
    >>> flat, re = opt.destructure({"a": np.ones((2, 2)), "b": np.zeros(1), "n": 3})
    >>> flat
    array([1., 1., 1., 1., 0.])
    >>> re(flat * 2)["a"]
    array([[2., 2.],
           [2., 2.]])
    """
    found = _find(model)
    if not found:
        return _empty_flat(model), Restructure(model, [])
    xp = found[0].xp
    for f in found[1:]:
        if f.xp.name != xp.name:
            msg = (
                f"destructure: the array at {format_path(f.path)} is a {f.xp.name} "
                f"array, but the one at {format_path(found[0].path)} is a "
                f"{xp.name} array"
            )
            raise TypeError(msg)
    # the namespace's own reshape and concat (not the adapter's, which detach):
    # the flat vector is differentiable, as in Optimisers.jl (torch autograd, jax.grad)
    flat = xp.xp.concat([xp.xp.reshape(f.x, (-1,)) for f in found])
    return flat, Restructure(model, found)


def _empty_flat(model: Any) -> Any:
    """An empty float64 vector of the backend of any array in ``model``, or numpy."""
    array = _any_array(model)
    if array is None:
        import numpy as np

        return np.zeros(0, dtype=np.float64)
    xp = adapter_for(array)
    return xp.xp.zeros_like(xp.flatten(array)[:0], dtype=xp.dtype("float64"))


def _any_array(x: Any) -> Any:
    node = flatten(x)
    if node is None:
        return x if adapter_for(x) is not None else None
    for child in node.children:
        found = _any_array(child)
        if found is not None:
            return found
    return None


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one trainable array lives in the flat vector."""

    x: Any
    offset: int
    size: int
    shape: tuple[int, ...]
    dtype: str
    complex: bool


class Restructure:
    """Rebuilds a model from a flat vector; made by :func:`destructure`.

    Calling it with a one-dimensional array of the right length returns a new
    model: each trainable array is replaced by its slice of the vector,
    reshaped (a view where the backend gives one) and cast back to the array's
    dtype (a complex vector gives a real array its real part). The pieces are
    differentiable functions of the vector: on torch they carry autograd
    history, so ``loss(re(w)).backward()`` fills ``w.grad``; ``jax.grad``
    differentiates through ``re``. Tied arrays
    become one object again; everything else comes from the original model.

    Parameters
    ----------
    model
        The model (kept, for its structure and its non-trainable parts).
    found
        Its trainable arrays, in flat order.
    """

    def __init__(self, model: Any, found: list[_Found]) -> None:
        self.model = model
        self._slots: list[_Slot] = []
        offset = 0
        for f in found:
            size = f.xp.size(f.x)
            slot = _Slot(
                f.x,
                offset,
                size,
                f.xp.shape(f.x),
                f.xp.dtype_name(f.x),
                f.xp.is_complex(f.x),
            )
            self._slots.append(slot)
            offset += size
        self.length = offset

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"Restructure({type(self.model).__name__}, arrays={len(self._slots)}, "
            f"length={self.length})"
        )

    def __call__(self, flat: Any) -> Any:
        """The model rebuilt from ``flat``.

        Raises
        ------
        TypeError
            If ``flat`` is not an array.
        ValueError
            If ``flat`` is not one-dimensional of length ``len(self)``.
        """
        fxp = adapter_for(flat)
        if fxp is None:
            msg = f"Restructure expects a one-dimensional array, got a {type(flat).__name__}"
            raise TypeError(msg)
        shape = fxp.shape(flat)
        if len(shape) != 1 or shape[0] != self.length:
            msg = (
                f"Restructure expects a one-dimensional array of length {self.length}, "
                f"got one of shape {shape}"
            )
            raise ValueError(msg)
        import numpy as np  # host warnings only; no backend's no-grad mode: differentiable

        with np.errstate(all="ignore"):
            pieces = {id(slot.x): _piece(fxp, flat, slot) for slot in self._slots}
        return _rebuild(self.model, pieces)


def _piece(fxp: ArrayAdapter, flat: Any, slot: _Slot) -> Any:
    part = fxp.xp.reshape(flat[slot.offset : slot.offset + slot.size], slot.shape)
    if fxp.is_complex(part) and not slot.complex:
        part = fxp.xp.real(part)
    if fxp.dtype_name(part) != slot.dtype:
        part = fxp.astype_tracked(part, slot.dtype)
    return part


def _rebuild(model: Any, pieces: dict[int, Any]) -> Any:
    memo: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        if id(x) in pieces:
            return pieces[id(x)]
        node = flatten(x)
        if node is None:
            return x
        if id(x) not in memo:
            memo[id(x)] = node.unflatten([walk(c) for c in node.children])
        return memo[id(x)]

    return walk(model)
