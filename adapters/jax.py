"""JAX adapter: functional (arrays are never written in place).

Measured on CPU (jax 0.10), against the numpy adapter, a million values each:

* ``x / python_scalar`` and ``x / 0-d array`` are multiplications by the
  reciprocal (26% of float32 quotients differ). Fix: the divisor is broadcast to
  the full shape, which XLA divides truly. Under ``jax.jit`` XLA also rewrites
  division by a broadcast constant, so a traced divisor is passed through
  ``lax.optimization_barrier`` first.
* ``jnp.sign(-0.0)`` is ``-0.0`` (numpy: ``+0.0``). Fix: zeros give ``+0``.
* float64 -> float16/bfloat16 casts round twice (through float32). Fix: round to
  float32 *to odd* first, which makes the second rounding exact.
* Deviation, not fixable: XLA on CPU runs with the x86 DAZ and FTZ flags and no
  switch turns them off (jax-ml/jax#16200). In the dtypes named by
  :attr:`JaxAdapter.flushes_subnormals`, arithmetic, ``sqrt``, comparisons,
  ``sign``, ``maximum``/``minimum`` and casts read a subnormal input as a zero of
  the same sign and flush a subnormal result to a zero of the same sign; bit
  operations (``abs``, negation, ``where``, copies, ``real``/``imag``) keep
  subnormals. float16 is not affected: XLA computes it in float32, where every
  float16 subnormal is normal. Outside the subnormal range JAX gives numpy's bits.

Not promised: bits under ``jax.jit``. The adapter works there (no host syncs in
elementwise operations), but XLA contracts ``a*b + c`` into fused multiply-adds
when it compiles a whole update (jax-ml/jax#18507) and nothing turns that off.

State trees are pytrees. Importing this module (which ``agnosticopt`` does at
its own import when JAX is already imported, and ``adapter_for`` does at the
first JAX array) registers :class:`~agnosticopt.Leaf`: its rule and frozen flag
are static (aux data), and so are the Python ints of its state (``AccumGrad``'s
counter, ``RAdam``'s ``t``) and its ``None`` parts; its arrays and host float
scalars (``beta_t``) are the children that ``jax.jit`` traces, named
``.state.m``, ``.state.beta_t.0``, ... in key paths. So one compiled step
serves every Adam step (``beta_t`` is traced), ``AccumGrad(n)`` compiles ``n``
variants (one per counter value), and a changed hyperparameter recompiles.
``Scheduled``'s step count is the exception among ints: it is traced, and the
schedules are evaluated on the device (:func:`schedule_value`), so one compiled
step serves a whole schedule.
``ClipNorm(omega, throw=False)`` and ``ClipGlobalNorm`` are traced: the
aligned-block tree is a fixed sequence of adds on static shapes, each square
of ``|g|²`` is read through a guard that no add contracts into an FMA
(:meth:`JaxAdapter.abs2`; XLA on CPU drops ``lax.optimization_barrier``
before it fuses), and ClipNorm's λ is
computed in float64 on the device (64-bit mode) or by its own host code through
``jax.pure_callback`` (otherwise), so the clip alone gives numpy's bits.
``ClipNorm(throw=True)`` (the default) and ``RAdam`` (which branches on
``rho``) decide on the host: a clear ``TypeError`` here; run them outside
``jax.jit``. Explicit-sharding meshes work, inside and outside
``jax.set_mesh``: devices are compared by equivalent sharding. A gradient split
on dim 0 only is reduced shard by shard (:meth:`JaxAdapter.norm_nodes`: one
``shard_map``, one all-gather of the tree's nodes, never of the gradient),
eagerly on any mesh and under ``jax.jit`` on explicit meshes (an automatic
mesh's tracer has no sharding yet: one piece, which XLA partitions); any other
layout is reduced as one piece (replicated first on an explicit mesh), the same
bits. Rule classes are
static pytrees (no leaves), so ``jax.eval_shape(opt.setup, rule, params)``
works and a rule can be an argument of a jitted function. After a jitted step
the host scalars are 0-d JAX arrays;
eager steps, :func:`~agnosticopt.state_dict` and :func:`~agnosticopt.save`
take them as they are.

float64 needs JAX's 64-bit mode, which the adapter does not switch on for you
(it is a global setting): ``jax.config.update("jax_enable_x64", True)`` or the
environment variable ``JAX_ENABLE_X64=1`` before JAX is imported. Without it
JAX has no float64 arrays.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from agnosticopt.adapters._base import Adapter, _is_scalar
from jax import lax

from agnosticopt._schedules import ScheduledState

__all__ = ["JaxAdapter", "adapter"]

_NARROW = ("float16", "bfloat16")


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _to_float32_odd(x: Any) -> Any:
    """float64 -> float32 rounded to odd (an inexact result gets an odd last bit)."""
    y = x.astype(jnp.float32)
    wide = y.astype(jnp.float64)
    even = (lax.bitcast_convert_type(y, jnp.int32) & 1) == 0
    fix = (wide != x) & even & jnp.isfinite(y)
    toward = jnp.where(x > wide, jnp.inf, -jnp.inf).astype(jnp.float32)
    return jnp.where(fix, jnp.nextafter(y, toward), y)


class JaxAdapter(Adapter):
    """Adapter for ``jax.Array`` (and tracers of one, inside ``jax.jit``)."""

    fixes: tuple[str, ...] = (
        "divide: divisor broadcast to full size (not a reciprocal multiply)",
        "divide under jit: divisor behind lax.optimization_barrier",
        "sign: sign(-0.0) is +0.0, as numpy's",
        "astype: float64 -> float16/bfloat16 rounded once (round to odd)",
    )

    #: dtypes whose subnormals XLA reads as zero and flushes to zero, on CPU.
    flushes_subnormals: tuple[str, ...] = (
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )

    def __init__(self, platform: str = "cpu", *, traced: bool = False) -> None:
        super().__init__(jnp, "jax" if platform == "cpu" else f"jax-{platform}")
        self.platform = platform
        #: The adapter of tracers (inside ``jax.jit``): they have no device to
        #: compare (``jit`` places them), so device checks are skipped.
        self.traced = traced
        self.one_device = traced
        if platform != "cpu":  # XLA's GPU default is ``xla_gpu_ftz=false``
            self.flushes_subnormals = ()

    def dtype_name(self, x: Any) -> str:
        return str(jnp.dtype(x.dtype))

    def dtype(self, name: str) -> Any:
        return jnp.dtype(name)

    def astype(self, x: Any, name: str) -> Any:
        if x.dtype == jnp.float64 and name in _NARROW:
            x = _to_float32_odd(x)
        return x.astype(self.dtype(name))

    def copy(self, x: Any) -> Any:
        return jnp.array(x, copy=True)

    def _apply(self, op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        if op is not operator.truediv:
            return op(a, b)
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
        if _is_scalar(b):
            b = jnp.full(shape, b, dtype=jnp.result_type(a))
        elif jnp.shape(b) != shape:
            b = jnp.broadcast_to(b, shape)
        if _traced(a) or _traced(b):
            b = lax.optimization_barrier(b)
        return jnp.divide(a, b)

    def sign(self, a: Any) -> Any:
        return jnp.where(a == 0, 0, jnp.sign(a))

    def make_complex(self, re: Any, im: Any) -> Any:
        return lax.complex(re, im)

    def flatten(self, a: Any) -> Any:
        """``a`` in C order, one-dimensional; replicated if its sharding is explicit.

        The library's reductions slice the flat array with strides, which an
        explicitly sharded array refuses (``ShardingTypeError``: the output
        sharding is ambiguous); replicated, the reduction is exact and the same
        bits. (With the default, automatic sharding XLA places it itself.)
        """
        sharding: Any = getattr(jax.typeof(a), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if (
            sharding is not None
            and spec is not None
            and any(p is not None for p in spec)
        ):  # replicated first: an array split on dim 1 cannot even be reshaped
            whole = jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec()
            )
            a = jax.sharding.reshard(a, whole)
        return jnp.reshape(a, (-1,))

    def concat(self, arrays: list[Any]) -> Any:
        return jnp.concatenate(arrays)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def device(self, x: Any) -> Any:
        """Where ``x`` lies: its sharding, compared by equivalence (``P('d')`` is ``P('d', None)``)."""
        if _traced(x):
            return None
        return _Placement(x.sharding, x.ndim)

    def abs2(self, a: Any) -> Any:
        """``|a|²``; under ``jit`` each product is guarded so no sum contracts it into an FMA.

        XLA on CPU drops ``lax.optimization_barrier`` before it fuses, and LLVM
        then contracts ``x*x + y*y`` (the first level of the norm's tree) into
        ``fma(x, x, y*y)``: measured, 8 of the tree's nodes of 6 float32 arrays
        of ~140k elements changed. A product read through
        ``where(p == p, p, x)`` (the same value: ``p`` is NaN only where ``x`` is)
        is no longer a multiply that LLVM can fuse into the add.
        """
        if not _traced(a):
            return super().abs2(a)
        if self.is_complex(a):
            re, im = jnp.real(a), jnp.imag(a)
            return jnp.add(_product(re), _product(im))
        return _product(a)

    @property
    def lazy_clip(self) -> bool:
        """Under ``jit``, ClipNorm's norm and λ stay on the device (:meth:`clip_factor`)."""
        return self.traced

    def clip_factor(self, rule: Any, norm: Any, x: Any) -> Any:
        """ClipNorm's λ from its one-element ``norm``, traced: the bits of ``rule.factor``.

        ω/‖g‖ in float64 (64-bit mode) on the device, then rounded to the
        parameter's real dtype once; without 64-bit mode the ratio is computed
        on the host by ``rule.factor`` itself, through ``jax.pure_callback``.
        """
        if rule.throw:
            msg = (
                "ClipNorm(throw=True) raises on a non-finite norm, which jax.jit cannot "
                "do: use ClipNorm(omega, throw=False) under jax.jit (or run it eagerly)"
            )
            raise TypeError(msg)
        real = (
            str(jnp.dtype(x.dtype))
            if not jnp.iscomplexobj(x)
            else ("float32" if x.dtype == jnp.complex64 else "float64")
        )
        if not jax.config.read("jax_enable_x64"):
            return _host_factor(rule, norm, real)
        n = self.astype(norm, "float64")
        ratio = jnp.where(n != 0, self.divide(float(rule.omega), n), jnp.inf)
        return self.astype(jnp.minimum(ratio, 1.0), real)[0]

    def norm_nodes(
        self, dx: Any, p: float, offset: int, dtype: str | None
    ) -> list[Any] | None:
        """The tree nodes of ``dx`` reduced shard by shard, if it is split on dim 0.

        For an array whose sharding is known (a concrete array, or a tracer of
        an explicit-sharding mesh) and splits only its first axis, evenly, over
        more than one device: one ``shard_map`` in which every shard reduces the
        nodes of its own index range of the flattened array
        (:func:`~agnosticopt._norm.reduce_piece` at its global offset) and one
        all-gather of those few values (about ``2·log2 n`` per shard) replaces a
        gather of the gradient. ``None`` for any other array: the caller then
        reduces it as one piece (XLA places that itself).
        """
        plan = _row_split(dx)
        if plan is None:
            return None
        from agnosticopt._norm import Node, piece_layout

        mesh, axes, count = plan
        local = math.prod(dx.shape) // count
        layouts = [piece_layout(offset + k * local, local) for k in range(count)]
        reducer = _shard_reducer(
            mesh,
            axes,
            dx.ndim,
            p,
            offset,
            local,
            str(jnp.dtype(dx.dtype)),
            dtype,
            max(len(lay) for lay in layouts),
        )
        values = reducer(dx)  # (count, width), the same on every device
        return [
            Node(level, block, values[k, i : i + 1])
            for k, layout in enumerate(layouts)
            for i, (level, block) in enumerate(layout)
        ]

    def to_host(self, a: Any) -> Any:
        if _traced(a):
            msg = (
                "this rule reads a value back to the host (ClipNorm's norm), which "
                "jax.jit cannot trace: run the update of this rule outside jax.jit"
            )
            raise TypeError(msg)
        return super().to_host(a)


def _product(x: Any) -> Any:
    """``x*x`` under ``jit``, in a form that no add contracts into an FMA (see ``abs2``)."""
    p = jnp.multiply(x, x)
    return jnp.where(p == p, p, x)  # noqa: PLR0124  (False only for NaN)


def _row_split(x: Any) -> tuple[Any, tuple[str, ...], int] | None:
    """``(mesh, axes, count)`` if ``x`` is split evenly on dim 0 only, else ``None``.

    The first axis of ``x`` split over the mesh axes ``axes`` (``count``
    pieces, more than one), every other axis whole: then every shard holds one
    contiguous range of the flattened array. A tracer of an automatic-sharding
    mesh under ``jax.jit`` has no sharding yet (XLA decides it later): ``None``.
    """
    if getattr(x, "ndim", 0) == 0 or math.prod(x.shape) == 0:
        return None
    sharding: Any = (
        getattr(jax.typeof(x), "sharding", None) if _traced(x) else x.sharding
    )
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None or len(spec) == 0 or spec[0] is None:
        return None
    if any(part is not None for part in tuple(spec)[1:]):
        return None
    axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
    count = math.prod(mesh.shape[a] for a in axes)
    if count < 2 or x.shape[0] % count:
        return None
    return mesh, axes, count


@functools.lru_cache(maxsize=256)
def _shard_reducer(
    mesh: Any,
    axes: tuple[str, ...],
    ndim: int,
    p: float,
    offset: int,
    local: int,
    name: str,
    dtype: str | None,
    width: int,
) -> Callable[[Any], Any]:
    """A jitted ``shard_map``: each shard's tree nodes, all-gathered, ``(count, width)``.

    Shard ``k`` (the linear index over ``axes``) holds the elements
    ``[offset + k·local, offset + (k+1)·local)`` of the flattened whole; its
    branch of a ``lax.switch`` reduces that range (the node layout depends on
    where the range lies), padded with zeros to ``width`` values.
    """
    from agnosticopt._norm import _terms, reduce_piece

    count = math.prod(mesh.shape[a] for a in axes)
    spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
    real = dtype or name

    def branch(k: int) -> Callable[[Any], Any]:
        def reduce(block: Any) -> Any:
            xp: Any = adapter(block)  # a tracer's: never None
            terms, combine = _terms(xp, jnp.reshape(block, (-1,)), p)
            if str(jnp.dtype(terms.dtype)) != real:
                terms = xp.astype(terms, real)
            nodes = reduce_piece(xp, terms, offset + k * local, combine)
            pad = [jnp.zeros((width - len(nodes),), jnp.dtype(real))]
            return jnp.concatenate([n.value for n in nodes] + pad)

        return reduce

    def body(block: Any) -> Any:
        index = lax.axis_index(axes)
        mine = lax.switch(index, [branch(k) for k in range(count)], block)
        return lax.all_gather(mine, axes)

    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(jax.sharding.PartitionSpec(*spec, *([None] * (ndim - 1))),),
            out_specs=jax.sharding.PartitionSpec(),
            check_vma=False,  # the all-gather's result is the same on every device
        )
    )


class _Placement:
    """A sharding of an ``ndim``-dimensional array, equal to every equivalent one."""

    __slots__ = ("ndim", "sharding")

    def __init__(self, sharding: Any, ndim: int) -> None:
        self.sharding = sharding
        self.ndim = ndim

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Placement):
            return NotImplemented
        return bool(
            self.ndim == other.ndim
            and self.sharding.is_equivalent_to(other.sharding, self.ndim)
        )

    def __hash__(self) -> int:
        return hash(frozenset(d.id for d in self.sharding.device_set))

    def __repr__(self) -> str:
        return repr(self.sharding)


def _host_factor(rule: Any, norm: Any, real: str) -> Any:
    """``rule.factor`` of a traced norm, run on the host by ``jax.pure_callback``."""
    from agnosticopt.adapters.numpy import NumpyAdapter

    host = NumpyAdapter()
    meta = np.empty(0, dtype=real)

    def factor(value: np.ndarray) -> np.ndarray:
        kind = np.dtype(real).type
        return np.asarray(
            rule.factor(kind(np.asarray(value).reshape(-1)[0]), meta, host), dtype=real
        )

    out = jax.ShapeDtypeStruct((), jnp.dtype(real))
    return jax.pure_callback(factor, out, norm)


_ADAPTERS: dict[tuple[str, bool], JaxAdapter] = {}


def _platform(x: Any) -> str:
    if _traced(x):
        return jax.default_backend()
    return str(next(iter(x.devices())).platform)


def adapter(x: Any) -> Adapter | None:
    """The JAX adapter for a ``jax.Array`` or a tracer, by device platform."""
    if not isinstance(x, (jax.Array, jax.core.Tracer)):
        return None
    key = (_platform(x), _traced(x))
    found = _ADAPTERS.get(key)
    if found is None:
        found = _ADAPTERS[key] = JaxAdapter(key[0], traced=key[1])
    return found


# -- state trees as pytrees ------------------------------------------------------------

_DYNAMIC = ("dynamic",)


def _dynamic(value: Any) -> bool:
    """Everything but Python ints and strings is a child that ``jax.jit`` traces.

    Arrays and host float scalars (``beta_t``) are traced; what JAX puts in
    their place (tracers, ``ShapeDtypeStruct`` of ``eval_shape``, placeholders
    of ``tree_map``) stays a child. Ints (``AccumGrad``'s counter, ``RAdam``'s
    ``t``, on which rules branch on the host) and strings are static.
    """
    return not isinstance(value, (int, str))


def _split(state: Any, name: str, keys: list[Any], children: list[Any]) -> Any:
    """The static skeleton of ``state``; its dynamic parts go to ``children``."""
    if state is None:
        return None
    cls = type(state)
    fields = getattr(cls, "_fields", None)
    if cls is ScheduledState:  # its count is traced, a Python int too: one compilation
        keys.append(jax.tree_util.GetAttrKey(f"{name}.t"))
        children.append(state.t)
        return (
            "namedtuple",
            cls,
            (_DYNAMIC, _split(state.state, f"{name}.state", keys, children)),
        )
    if isinstance(state, tuple) and fields is not None:
        parts = tuple(
            _split(p, f"{name}.{f}", keys, children)
            for f, p in zip(fields, state, strict=True)
        )
        return ("namedtuple", cls, parts)
    if cls is tuple or cls is list:
        parts = tuple(
            _split(p, f"{name}.{i}", keys, children) for i, p in enumerate(state)
        )
        return (cls.__name__, parts)
    if cls is dict:
        names = tuple(state)
        parts = tuple(_split(state[k], f"{name}.{k}", keys, children) for k in names)
        return ("dict", names, parts)
    if _dynamic(state):
        keys.append(jax.tree_util.GetAttrKey(name))
        children.append(state)
        return _DYNAMIC
    return ("static", state)


def _join(skeleton: Any, children: Iterator[Any]) -> Any:
    if skeleton is None:
        return None
    if skeleton == _DYNAMIC:
        return next(children)
    kind = skeleton[0]
    if kind == "static":
        return skeleton[1]
    if kind == "namedtuple":
        return skeleton[1]._make([_join(p, children) for p in skeleton[2]])
    if kind == "dict":
        return {
            k: _join(p, children) for k, p in zip(skeleton[1], skeleton[2], strict=True)
        }
    parts = [_join(p, children) for p in skeleton[1]]
    return tuple(parts) if kind == "tuple" else parts


def _flatten_leaf_with_keys(leaf: Any) -> tuple[list[tuple[Any, Any]], Any]:
    keys: list[Any] = []
    children: list[Any] = []
    skeleton = _split(leaf.state, "state", keys, children)
    return list(zip(keys, children, strict=True)), (leaf.rule, leaf.frozen, skeleton)


def _flatten_leaf(leaf: Any) -> tuple[list[Any], Any]:
    children: list[Any] = []
    skeleton = _split(leaf.state, "state", [], children)
    return children, (leaf.rule, leaf.frozen, skeleton)


def _unflatten_leaf(aux: Any, children: Any) -> Any:
    from agnosticopt._leaf import Leaf

    rule, frozen, skeleton = aux
    return Leaf(rule, _join(skeleton, iter(children)), frozen)


def _register_rule(cls: type) -> None:
    """Make a rule class a static pytree: no leaves, the rule itself is the aux data.

    So a rule passes through ``jax.eval_shape``, ``jax.jit`` and ``tree_map``
    as an argument or inside a tree (compared and hashed as rules are: by
    their hyperparameters).
    """
    with contextlib.suppress(ValueError):  # already registered
        jax.tree_util.register_static(cls)


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _register_pytrees() -> None:
    """Make :class:`~agnosticopt.Leaf` and every rule class pytrees (once per process).

    Rule classes defined later are registered as they are made
    (``agnosticopt._rule.NEW_RULE_CLASS_HOOKS``).
    """
    from agnosticopt._leaf import Leaf
    from agnosticopt._rule import NEW_RULE_CLASS_HOOKS, Rule

    with contextlib.suppress(ValueError):  # already registered (e.g. a module reload)
        jax.tree_util.register_pytree_with_keys(
            Leaf, _flatten_leaf_with_keys, _unflatten_leaf, _flatten_leaf
        )
    for cls in {Rule, *_subclasses(Rule)}:
        _register_rule(cls)
    if _register_rule not in NEW_RULE_CLASS_HOOKS:
        NEW_RULE_CLASS_HOOKS.append(_register_rule)


_register_pytrees()


def value_and_grad(
    fn: Callable[[list[Any]], Any], arrays: list[Any]
) -> tuple[Any, list[Any]]:
    """``fn(arrays)`` (a scalar) and its gradients by ``jax.value_and_grad`` (``train_``)."""
    value, grads = jax.value_and_grad(lambda leaves: fn(list(leaves)))(list(arrays))
    return value, list(grads)


# -- schedules of a traced step count (Scheduled under jax.jit) -------------------------------


def schedule_value(schedule: Any, t: Any) -> Any:
    """The value of ``schedule`` at the traced step count ``t``: a 0-d array.

    The formulas of :mod:`agnosticopt.schedules`, in the same order of
    operations, computed in float64 when JAX's 64-bit mode is on (then rounded to
    the parameter dtype at use, as the host's Python floats are) and in float32
    otherwise. XLA's ``cos`` and ``pow`` are not the host's libm: their float64
    values can differ in the last bit (rarely visible after rounding to float32).
    """
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t = jnp.asarray(t)
    return jnp.broadcast_to(_schedule(schedule, t, dtype), t.shape)


def _schedule(s: Any, t: Any, dtype: Any) -> Any:
    from agnosticopt import _schedules as sch

    def c(v: float) -> Any:
        return jnp.asarray(v, dtype)

    kind = type(s)
    if kind is sch.Constant:
        return c(s.value)
    if kind is sch.Linear:
        value = c(s.start) + c(s.end - s.start) * (t.astype(dtype) / c(s.steps))
        return jnp.where(t >= s.steps, c(s.end), value)
    if kind is sch.Cosine:
        arc = c(math.pi) * t.astype(dtype) / c(s.steps)
        value = c(s.end) + c(s.start - s.end) * (1 + jnp.cos(arc)) / 2
        return jnp.where(t >= s.steps, c(s.end), value)
    if kind is sch.Exponential:
        return c(s.start) * c(s.rate) ** (t.astype(dtype) / c(s.steps))
    if kind is sch.Step:
        return c(s.start) * c(s.rate) ** (t // s.every).astype(dtype)
    if kind is sch.Polynomial:
        value = c(s.end) + c(s.start - s.end) * (1 - t.astype(dtype) / c(s.steps)) ** c(
            s.power
        )
        return jnp.where(t >= s.steps, c(s.end), value)
    if kind is sch.OneCycle:
        up = round(s.pct_start * s.steps)
        low = s.peak / s.div
        after = (
            c(s.peak)
            if up == s.steps
            else _schedule(
                sch.Cosine(s.peak, low / s.final_div, s.steps - up), t - up, dtype
            )
        )
        if up == 0:
            return after
        return jnp.where(
            t < up, _schedule(sch.Cosine(low, s.peak, up), t, dtype), after
        )
    if kind is sch.Join:
        begins = (0, *s.boundaries)
        value = _schedule(s.schedules[-1], t - begins[-1], dtype)
        for schedule, begin, boundary in reversed(
            list(zip(s.schedules, begins, s.boundaries, strict=False))
        ):
            value = jnp.where(
                t < boundary, _schedule(schedule, t - begin, dtype), value
            )
        return value
    msg = (
        f"Scheduled under jax.jit evaluates the schedules of agnosticopt.schedules on the "
        f"device; {s!r} is not one of them: run this update eagerly, or use those schedules"
    )
    raise TypeError(msg)
