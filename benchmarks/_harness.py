"""Benchmark: one ``update_`` step of agnosticopt against torch.optim and optax.

For each parameter set (``big``: one 4096×4096 float32 array; ``resnet``: the 62
parameter arrays of torchvision's ResNet-18, 11.7M values, written out by hand;
``tiny``: 200 arrays of 32×32) and each rule (Adam, AdamW, Momentum, RMSProp,
ClipGrad then Adam, ClipGlobalNorm or ClipNorm then AdamW against
``clip_grad_norm_`` then AdamW), every implementation takes warm-up steps, then timed steps
in interleaved rounds (one step of each implementation per round, so that a
machine that gets busier slows them all alike); the median is reported, with
the ratio to ``torch.optim``'s ``fused=True`` step (or, where torch has no fused
kernel, its fastest other step, marked ``*``).

Implementations: agnosticopt ``update_`` on a numpy list and on a list of torch
``nn.Parameter`` (fast path on, and the plain path), the flat-buffer mode (the
arrays and gradients are views of one buffer each, see the README; one leaf per
step), the ``torch.optim`` drop-in (``agnosticopt.TorchOptimizer.step()`` on
parameters whose ``.grad`` is set), ``torch.optim`` for-loop,
foreach and fused, optax (``jax.jit`` with donated buffers) when installed, and
agnosticopt's ``update`` on JAX arrays under ``jax.jit`` the same way ("jax jit";
its bits are XLA's, see :mod:`agnosticopt.adapters.jax`).

Extra peak memory of a step (memory allocated during the step beyond what was
in use before it) is measured two ways: with ``tracemalloc`` for numpy (numpy
reports its allocations to it), and for every implementation from the
process's resident set: ``malloc_trim`` returns freed heap pages to the system,
``/proc/self/clear_refs`` resets the peak (``VmHWM``), and the peak after the
step minus the resident size before it is the extra memory. torch's CPU
allocator has no statistics of its own (``torch.cuda.memory_stats`` is CUDA
only); its allocations go through ``malloc``/``mmap`` and so show in the
resident set.

Run it with ``python benchmarks/bench.py`` (``--help`` for the options).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import math
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from agnosticopt.conformance._cases import BENCHMARK, cases_in

import agnosticopt as opt

__all__ = [
    "RESNET18",
    "RULES",
    "SETS",
    "Result",
    "chart",
    "machine",
    "run",
    "steps",
    "table",
]


def _resnet18() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ``resnet18()``, in its order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            first = cin if block == 0 else width
            shapes += [
                (width, first, 3, 3),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
            ]
            if block == 0 and first != width:
                shapes += [(width, first, 1, 1), (width,), (width,)]
        cin = width
    return [*shapes, (1000, 512), (1000,)]


#: torchvision ResNet-18's 62 parameter shapes (11,689,512 values).
RESNET18 = _resnet18()

#: The parameter sets.
SETS: dict[str, list[tuple[int, ...]]] = {
    "big": [(4096, 4096)],
    "resnet": RESNET18,
    "tiny": [(32, 32)] * 200,
}

#: The torch.optim counterpart of each case of the shared table's ``benchmark`` list
#: (agnosticopt.conformance._cases): class name, keywords, clip value.
TORCH_OPTIM: dict[str, tuple[str, dict[str, Any], float | None]] = {
    "Adam": ("Adam", {"lr": 1e-3}, None),
    "AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, None),
    "Momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}, None),
    "RMSProp": ("RMSprop", {"lr": 1e-3, "alpha": 0.9, "eps": 1e-8}, None),
    "ClipGrad+Adam": ("Adam", {"lr": 1e-3}, 1.0),
    "ClipGlobalNorm+AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, None),
    "ClipNorm+AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, None),
}


def _rules() -> dict[str, tuple[opt.Rule, str, dict[str, Any], float | None]]:
    cases = {case.name: case.rule for case in cases_in(BENCHMARK)}
    if set(cases) != set(TORCH_OPTIM):
        msg = (
            f"the benchmark list of agnosticopt.conformance._cases ({sorted(cases)}) and "
            f"TORCH_OPTIM ({sorted(TORCH_OPTIM)}) must name the same cases"
        )
        raise LookupError(msg)
    return {name: (cases[name], *torch) for name, torch in TORCH_OPTIM.items()}


#: The rules, as (agnosticopt rule, torch.optim class name and keywords, clip value).
RULES = _rules()

#: Rules whose torch.optim counterpart runs ``clip_grad_norm_(max_norm)`` first (a
#: global norm; torch has no per-array one, so ClipNorm is compared with it too).
NORM_CLIPS: dict[str, float] = {"ClipGlobalNorm+AdamW": 1.0, "ClipNorm+AdamW": 1.0}

IMPLEMENTATIONS = (
    "numpy fast",
    "numpy plain",
    "numpy flat",
    "torch fast",
    "torch plain",
    "torch flat",
    "torch drop-in",
    "torch for-loop",
    "torch foreach",
    "torch fused",
    "optax",
    "jax jit",
)


@dataclasses.dataclass
class Result:
    """One implementation on one parameter set and rule."""

    set: str
    rule: str
    impl: str
    ms: float
    rounds: int
    extra_rss: int | None = None
    extra_traced: int | None = None
    note: str = ""


# -- the implementations ---------------------------------------------------------------------------


Step = Callable[[], Any]


@dataclasses.dataclass
class Fresh:
    """A step whose gradients are new arrays at every step, as in a training loop
    with ``zero_grad(set_to_none=True)``: ``before`` makes them (not timed)."""

    step: Step
    before: Step

    def __call__(self) -> Any:
        return self.step()


def _fresh(step: Step, make: Step, new_grads: bool) -> Step:
    """``step``, given new gradients by ``make`` before each call if ``new_grads``."""
    return Fresh(step, make) if new_grads else step


def _data(shapes: list[tuple[int, ...]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    return params, grads


def _agnostic(
    backend: str,
    rule: opt.Rule,
    shapes: list[tuple[int, ...]],
    fast: bool,
    new_grads: bool = False,
) -> Step:
    params, arrays = _data(shapes)
    model: list[Any] = list(params)
    grads: list[Any] = list(arrays)
    if backend == "torch":
        import torch

        model = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
        grads = [torch.from_numpy(g) for g in arrays]
    first = list(grads)
    tree = opt.setup(rule, model)

    def step() -> None:
        previous = opt.set_fast_path(fast)
        try:
            opt.update_(tree, model, grads)
        finally:
            opt.set_fast_path(previous)

    def make() -> None:
        grads[:] = [g.clone() if backend == "torch" else g.copy() for g in first]

    return _fresh(step, make, new_grads)


def _agnostic_flat(backend: str, rule: opt.Rule, shapes: list[tuple[int, ...]]) -> Step:
    """The flat-buffer mode: one parameter buffer and one gradient buffer.

    The model's arrays are views of ``flat`` and the gradients views of
    ``gflat`` (``restructure`` of :func:`agnosticopt.destructure`), where a
    training loop writes them; a step is one ``update_`` of one leaf.
    """
    params, arrays = _data(shapes)
    model: list[Any] = list(params)
    grads: list[Any] = list(arrays)
    if backend == "torch":
        import torch

        model = [torch.from_numpy(p) for p in params]
        grads = [torch.from_numpy(g) for g in arrays]
    flat, restructure = opt.destructure(model)
    gflat, _ = opt.destructure(grads)
    model, grads = restructure(flat), restructure(gflat)  # views: what the loop uses
    tree = opt.setup(rule, flat)

    def step() -> None:
        opt.update_(tree, flat, gflat)

    return step


def _dropin(
    rule: opt.Rule, shapes: list[tuple[int, ...]], new_grads: bool = False
) -> Step:
    """``agnosticopt.TorchOptimizer``'s ``step()`` over ``nn.Parameter`` with ``.grad``."""
    import torch

    params, grads = _data(shapes)
    tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    _set_grads(tensors, grads)
    optimizer = opt.TorchOptimizer(tensors, rule)

    def step() -> None:
        optimizer.step()

    return _fresh(step, lambda: _set_grads(tensors, grads), new_grads)


def _set_grads(tensors: list[Any], grads: list[np.ndarray]) -> None:
    """A new ``.grad`` tensor for each of ``tensors`` (a copy of ``grads``)."""
    import torch

    for t, g in zip(tensors, grads, strict=True):
        t.grad = torch.from_numpy(g.copy())


def _torch(
    kind: str,
    name: str,
    keywords: dict[str, Any],
    clip: float | None,
    shapes: list[tuple[int, ...]],
    norm_clip: float | None = None,
    new_grads: bool = False,
) -> Step | None:
    import torch

    params, grads = _data(shapes)
    tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    _set_grads(tensors, grads)
    flags = {
        "for-loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[kind]
    try:
        optimiser = getattr(torch.optim, name)(tensors, **keywords, **flags)
    except (TypeError, RuntimeError, ValueError):  # no such kernel for this optimiser
        return None
    foreach = kind != "for-loop"

    def step() -> None:
        if clip is not None:
            torch.nn.utils.clip_grad_value_(tensors, clip, foreach=foreach)
        if norm_clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, norm_clip, foreach=foreach)
        optimiser.step()

    return _fresh(step, lambda: _set_grads(tensors, grads), new_grads)


def _optax(rule: str, shapes: list[tuple[int, ...]]) -> Step | None:
    if importlib.util.find_spec("optax") is None:
        return None
    import jax
    import optax

    transforms = {
        "Adam": lambda: optax.adam(1e-3),
        "AdamW": lambda: optax.adamw(1e-3, weight_decay=0.01),
        "Momentum": lambda: optax.sgd(0.01, momentum=0.9),
        "RMSProp": lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8),
        "ClipGrad+Adam": lambda: optax.chain(optax.clip(1.0), optax.adam(1e-3)),
        "ClipGlobalNorm+AdamW": lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01)
        ),
    }
    if rule not in transforms:  # optax has no per-array norm clip
        return None
    tx = transforms[rule]()
    params, grads = _data(shapes)
    state = {"params": [jax.numpy.asarray(p) for p in params]}
    jgrads = [jax.numpy.asarray(g) for g in grads]
    state["opt"] = tx.init(state["params"])

    def apply(p: Any, s: Any, g: Any) -> Any:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    update = jax.jit(apply, donate_argnums=(0, 1))  # parameters and state in place

    def step() -> None:
        state["params"], state["opt"] = update(state["params"], state["opt"], jgrads)
        jax.block_until_ready(state["params"])

    return step


def _jax_jit(rule: opt.Rule, shapes: list[tuple[int, ...]]) -> Step | None:
    """agnosticopt's ``update`` on JAX arrays inside ``jax.jit`` (buffers donated)."""
    if importlib.util.find_spec("jax") is None:
        return None
    import jax

    params, grads = _data(shapes)
    state = {"params": [jax.numpy.asarray(p) for p in params]}
    jgrads = [jax.numpy.asarray(g) for g in grads]
    state["tree"] = opt.setup(rule, state["params"])
    update = jax.jit(opt.update, donate_argnums=(0, 1))  # parameters and state in place

    def step() -> None:
        state["tree"], state["params"] = update(state["tree"], state["params"], jgrads)
        jax.block_until_ready(state["params"])

    return step


def steps(
    impls: tuple[str, ...],
    rule: str,
    shapes: list[tuple[int, ...]],
    new_grads: bool = False,
) -> dict[str, Step | None]:
    """One step function per implementation (``None``: not available here).

    With ``new_grads``, the ``update_``, drop-in and torch.optim steps get new
    gradient arrays before each step (:class:`Fresh`); the flat mode (one
    buffer, written in place), optax and jax jit (immutable arrays) are as they are.
    """
    ours, name, keywords, clip = RULES[rule]
    norm = NORM_CLIPS.get(rule)
    new = new_grads
    makers: dict[str, Callable[[], Step | None]] = {
        "numpy fast": lambda: _agnostic("numpy", ours, shapes, True, new),
        "numpy plain": lambda: _agnostic("numpy", ours, shapes, False, new),
        "numpy flat": lambda: _agnostic_flat("numpy", ours, shapes),
        "torch fast": lambda: _agnostic("torch", ours, shapes, True, new),
        "torch flat": lambda: _agnostic_flat("torch", ours, shapes),
        "torch plain": lambda: _agnostic("torch", ours, shapes, False, new),
        "torch drop-in": lambda: _dropin(ours, shapes, new),
        "torch for-loop": lambda: _torch(
            "for-loop", name, keywords, clip, shapes, norm, new
        ),
        "torch foreach": lambda: _torch(
            "foreach", name, keywords, clip, shapes, norm, new
        ),
        "torch fused": lambda: _torch("fused", name, keywords, clip, shapes, norm, new),
        "optax": lambda: _optax(rule, shapes),
        "jax jit": lambda: _jax_jit(ours, shapes),
    }
    return {impl: makers[impl]() for impl in impls}


# -- measuring -------------------------------------------------------------------------------------------


def _libc() -> Any:
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def _rss_peak(step: Step) -> int | None:
    """Extra resident memory at the peak of ``step`` (Linux only), in bytes."""
    status, clear = "/proc/self/status", "/proc/self/clear_refs"
    if not (os.path.exists(status) and os.access(clear, os.W_OK)):
        return None
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # freed heap pages back to the system: reuse must fault
    with open(clear, "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    _before(step)  # (new gradients: not the step's memory; malloc_trim is before)
    before = _status_kb(status, "VmRSS")
    step()
    return (_status_kb(status, "VmHWM") - before) * 1024


def _status_kb(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    msg = f"{key} not in {path}"
    raise OSError(msg)


def _traced_peak(step: Step) -> int:
    """Extra memory at the peak of ``step`` as ``tracemalloc`` sees it (numpy, Python)."""
    _before(step)
    tracemalloc.start()
    try:
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - current


def run(
    sets: tuple[str, ...] = tuple(SETS),
    rules: tuple[str, ...] = tuple(RULES),
    impls: tuple[str, ...] = IMPLEMENTATIONS,
    rounds: int = 15,
    warmup: int = 3,
    memory: bool = True,
    log: Callable[[str], None] = print,
    new_grads: bool = False,
) -> list[Result]:
    """Measure every implementation on every set and rule; see the module docstring.

    Parameters
    ----------
    sets, rules, impls
        Names from :data:`SETS`, :data:`RULES` and :data:`IMPLEMENTATIONS`.
    rounds
        Timed steps of each implementation (the median is reported); the plain
        paths, ten times slower, get a third of them.
    warmup
        Untimed steps first (compilation, caches).
    memory
        Also measure the extra peak memory of one step.
    log
        Where progress lines go.
    new_grads
        New gradient arrays before each step, not timed (see :func:`steps`).
    """
    results: list[Result] = []
    for set_name in sets:
        shapes = SETS[set_name]
        for rule in rules:
            made = steps(impls, rule, shapes, new_grads)
            missing = [i for i, s in made.items() if s is None]
            live = {i: s for i, s in made.items() if s is not None}
            for step in live.values():
                for _ in range(warmup):
                    _before(step)
                    step()
            times: dict[str, list[float]] = {i: [] for i in live}
            for r in range(rounds):
                for impl, step in live.items():
                    if "plain" in impl and r % 3:
                        continue
                    _before(step)
                    start = time.perf_counter()
                    step()
                    times[impl].append(time.perf_counter() - start)
            for impl, step in live.items():
                result = Result(
                    set_name,
                    rule,
                    impl,
                    1e3 * statistics.median(times[impl]),
                    len(times[impl]),
                )
                if memory:
                    result.extra_rss = _rss_peak(step)
                    if impl.startswith("numpy"):
                        result.extra_traced = _traced_peak(step)
                results.append(result)
            results.extend(
                Result(set_name, rule, i, math.nan, 0, note="not available")
                for i in missing
            )
            log(
                f"{set_name:6} {rule:14} "
                + "  ".join(
                    f"{r.impl} {r.ms:.2f}"
                    for r in results
                    if (r.set, r.rule) == (set_name, rule)
                )
            )
            del made, live
    return results


def _before(step: Step) -> None:
    """What must happen before ``step`` and is not timed (:class:`Fresh`)."""
    if isinstance(step, Fresh):
        step.before()


# -- reporting -----------------------------------------------------------------------------------------


def _reference(results: list[Result], set_name: str, rule: str) -> tuple[float, str]:
    """The torch fused time, or the fastest other torch.optim time (marked ``*``)."""
    row = {r.impl: r.ms for r in results if (r.set, r.rule) == (set_name, rule)}
    fused = row.get("torch fused", math.nan)
    if not math.isnan(fused):
        return fused, ""
    others = [
        row[i]
        for i in ("torch foreach", "torch for-loop")
        if not math.isnan(row.get(i, math.nan))
    ]
    return (min(others), "*") if others else (math.nan, "")


def table(results: list[Result]) -> str:
    """A Markdown table: time per step and ratio to torch's fused step."""
    impls = [
        i for i in IMPLEMENTATIONS if any(r.impl == i and r.rounds for r in results)
    ]
    lines = [
        "| set | rule | " + " | ".join(impls) + " |",
        "|---|---|" + "---|" * len(impls),
    ]
    pairs = list(dict.fromkeys((r.set, r.rule) for r in results))
    for set_name, rule in pairs:
        ref, mark = _reference(results, set_name, rule)
        row = {r.impl: r for r in results if (r.set, r.rule) == (set_name, rule)}
        cells = []
        for impl in impls:
            r = row.get(impl)
            if r is None or math.isnan(r.ms):
                cells.append("n/a")
            else:
                cells.append(f"{r.ms:.2f} ms ({r.ms / ref:.2f}×{mark})")
        lines.append(f"| {set_name} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(results: list[Result]) -> str:
    """A Markdown table of extra peak memory (MB) per step, with the limit."""
    lines = [
        "| set | rule | impl | extra RSS peak | tracemalloc peak | limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.extra_rss is None and r.extra_traced is None:
            continue
        n = sum(math.prod(s) for s in SETS[r.set])
        limit = max(0.01 * 4 * n, 8 * 2**20)
        rss = "n/a" if r.extra_rss is None else f"{r.extra_rss / 2**20:.2f} MB"
        traced = "" if r.extra_traced is None else f"{r.extra_traced / 2**20:.3f} MB"
        lines.append(
            f"| {r.set} | {r.rule} | {r.impl} | {rss} | {traced} | "
            f"{limit / 2**20:.1f} MB |"
        )
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and in agnosticopt's kernels."""
    import torch
    from agnosticopt.adapters import _numba

    torch.set_num_threads(threads)
    _numba.THREADS = threads


def machine() -> str:
    """The machine and library versions, for the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = [f"numpy {np.__version__}"]
    for name in ("torch", "numba", "jax", "optax"):
        if importlib.util.find_spec(name) is not None:
            module = __import__(name)
            versions.append(f"{name} {module.__version__}")
    load = (
        " ".join(f"{x:.2f}" for x in os.getloadavg())
        if hasattr(os, "getloadavg")
        else "?"
    )
    threads = ""
    if importlib.util.find_spec("torch") is not None:
        import torch

        threads = f", torch threads {torch.get_num_threads()}"
    return (
        f"{cpu}, {os.cpu_count()} CPUs{threads}; {platform.python_implementation()} "
        f"{platform.python_version()}; {', '.join(versions)}; load average {load}"
    )


def chart(results: list[Result], path: str) -> str:
    """A bar chart of the ratios to torch fused, as a PNG at ``path``.

    Returns a line saying where it went, or why there is none (no matplotlib).
    """
    if importlib.util.find_spec("matplotlib") is None:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys((r.set, r.rule) for r in results))
    impls = [
        i
        for i in IMPLEMENTATIONS
        if "plain" not in i and any(r.impl == i and r.rounds for r in results)
    ]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(pairs)), 5.4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ratios = []
        for set_name, rule in pairs:
            ref, _ = _reference(results, set_name, rule)
            ms = next(
                (
                    r.ms
                    for r in results
                    if (r.set, r.rule, r.impl) == (set_name, rule, impl)
                ),
                math.nan,
            )
            ratios.append(ms / ref)
        xs = [j + (k - (len(impls) - 1) / 2) * width for j in range(len(pairs))]
        ax.bar(xs, ratios, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    ax.set_yticks([0.1, 0.2, 0.5, 1, 2, 5, 10, 20])
    ax.set_ylabel("time / torch fused (* fastest torch)")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([f"{s}\n{r}" for s, r in pairs], fontsize=8)
    ax.set_title(
        "One optimiser step on the CPU: time relative to torch.optim fused "
        "(lower is faster)"
    )
    ax.legend(
        fontsize=8, ncol=len(impls), loc="upper center", bbox_to_anchor=(0.5, -0.14)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"
