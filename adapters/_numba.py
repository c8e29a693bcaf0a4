"""Compiling recorded programs (``agnosticopt/_trace.py``) into numba loops.

One kernel per program structure, generated as Python source and compiled by
numba with ``fastmath=False`` (so no FMA contraction, no reciprocal division, no
flush to zero) and ``error_model="numpy"`` (division by zero gives inf/NaN):

.. code-block:: python

    def kernel(table, chunks, c0, c1, p0, p1, ...):
        for c in range(c0, c1):             # a chunk: (leaf row, lo, hi)
            a0 = carray(<address of table[row, 0] + lo>, (hi - lo,), float32)
            ...
            for i in range(hi - lo):
                v0 = a0[i]; v1 = a1[i]; ...  # load every input at i
                v7 = p0 * v2                 # each operation in the array dtype
                ...
                a2[i] = v9; a0[i] = v12      # store the new state, then x

``table[row]`` holds the data addresses of one leaf's arrays (parameter,
gradient, state arrays), so one call updates many leaves: a multi-tensor kernel.
Every value is computed in its array's dtype: parameters arrive as numpy scalars
of that dtype, constants are cast to it, and each operation is the single IEEE
operation of the numpy adapter.

The source is written to a cache directory (``AGNOSTICOPT_CACHE_DIR``, else
``$XDG_CACHE_HOME/agnosticopt`` or ``~/.cache/agnosticopt``) so that numba's disk
cache keeps the compiled code between runs; when that directory cannot be
written, kernels are compiled in memory for the session.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import itertools
import math
import os
import pathlib
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from agnosticopt._ops import OPS
from agnosticopt._trace import Program

__all__ = ["Kernel", "kernel_for", "source"]

#: Elements per chunk: a chunk's arrays stay in L2 while it is processed.
CHUNK = 1 << 18
#: Fewest elements per thread worth a thread hand-off.
PER_THREAD = 1 << 18
#: Pieces of work per thread, taken in turn (finer evens out a late thread).
PIECES = 16


@intrinsic
def _pointer(typingctx: Any, address: Any) -> Any:
    """The integer ``address`` as a ``void*`` (for ``numba.carray``)."""
    sig = types.voidptr(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


# -- code generation --------------------------------------------------------------------------


def _lower(name: str, dtype: str, args: list[str]) -> str:
    """One operation of the table (``agnosticopt._ops.OPS``) as a numba expression.

    Each has the numpy adapter's meaning; the plain arithmetic and comparisons
    are the table's Python operators, which numba compiles to the single IEEE
    operation (``fastmath=False``).
    """
    t = f"np.{dtype}" if dtype in ("float32", "float64") else ""
    zero = f"{t}(0.0)"
    if name in _INFIX:
        return f"{args[0]} {OPS[name].operator} {args[1]}"
    if name == "negative":
        return f"-{args[0]}"
    if name == "sqrt":
        return f"np.sqrt({args[0]})"
    if name == "abs":
        return f"abs({args[0]})"
    if name == "sign":  # numpy: +0 for both zeros, NaN stays NaN
        a = args[0]
        return (
            f"{t}(1.0) if {a} > {zero} else ({t}(-1.0) if {a} < {zero} "
            f"else ({zero} if {a} == {zero} else {a}))"
        )
    if name in (
        "maximum",
        "minimum",
    ):  # IEEE 754-2019: NaN wins; zeros tie as the base adapter
        a, b = args
        if name == "maximum":
            tie, pick = f"{a} + {b}", f"{a} if {a} > {b} else {b}"
        else:
            tie, pick = f"-((-{a}) - {b})", f"{a} if {a} < {b} else {b}"
        return (
            f"{a} if {a} != {a} else ({b} if {b} != {b} else "
            f"(({tie}) if ({a} == {zero} and {b} == {zero}) else ({pick})))"
        )
    if name == "isfinite":
        return f"np.isfinite({args[0]})"
    if name == "where":
        return f"{args[1]} if {args[0]} else {args[2]}"
    if name == "zeros_like":
        return zero
    if name in ("full_like", "astype"):
        return f"{t}({args[0]})"
    msg = f"no lowering for {name}"
    raise ValueError(msg)


#: Recorded operations that are one Python infix operator (``a + b`` ...).
_INFIX = frozenset(
    {"add", "subtract", "multiply", "divide", "greater", "less", "not_equal"}
)


def source(program: Program, *, cache: bool) -> str:
    """The Python source of the numba kernel of ``program``."""
    n_in = len(program.inputs)
    params = [f"p{k}" for k in range(len(program.params))]
    used = {a for a, _ in program.stores}
    for _, _, *operands in program.ops:
        used.update(o for o in operands if 0 <= o < n_in)
    used.update(s for _, s in program.stores if s < n_in)

    def ref(operand: int) -> str:
        return f"v{operand}" if operand >= 0 else f"p{-1 - operand}"

    lines = [
        "import numpy as np",
        "from numba import carray, njit",
        "from agnosticopt.adapters._numba import _pointer",
        "",
        "",
        (
            f"@njit(cache={cache}, nogil=True, fastmath=False, error_model='numpy', "
            "boundscheck=False)"
        ),
        f"def kernel(table, chunks, c0, c1{''.join(', ' + p for p in params)}):",
        "    for c in range(c0, c1):",
        "        row = chunks[c, 0]",
        "        lo = chunks[c, 1]",
        "        n = chunks[c, 2] - lo",
    ]
    for k in sorted(used):
        dtype = program.inputs[k]
        size = np.dtype(dtype).itemsize
        lines.append(
            f"        a{k} = carray(_pointer(table[row, {k}] + lo * {size}), (n,), "
            f"np.{dtype})"
        )
    lines.append("        for i in range(n):")
    lines.extend(f"            v{k} = a{k}[i]" for k in sorted(used))
    for j, (name, dtype, *operands) in enumerate(program.ops):
        lines.append(
            f"            v{n_in + j} = {_lower(name, dtype, [ref(o) for o in operands])}"
        )
    lines.extend(f"            a{a}[i] = v{s}" for a, s in program.stores)
    return "\n".join(lines) + "\n"


# -- compiling and caching ----------------------------------------------------------------------


class Kernel:
    """A compiled program: call :meth:`run` with a table of leaves.

    Parameters
    ----------
    function
        The numba dispatcher ``kernel(table, chunks, c0, c1, *params)``.
    """

    def __init__(
        self,
        function: Callable[..., None],
        fallback: Callable[[], Callable[..., None]] | None = None,
    ) -> None:
        self.function = function
        self.fallback = fallback
        self.ready = False

    def prepare(self, values: tuple[Any, ...]) -> None:
        """Compile (or load from the disk cache) for these parameter types.

        Called while planning, so that a compilation error surfaces before
        anything is written; numba's warnings are silenced.
        """
        if self.ready:
            return
        table = np.zeros((1, 1), dtype=np.int64)
        chunks = np.zeros((1, 3), dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.function(table, chunks, 0, 0, *values)
            except Exception:
                if self.fallback is None:
                    raise
                # A disk cache that cannot be loaded (written by another numba,
                # damaged): compile in memory instead.
                self.function, self.fallback = self.fallback(), None
                self.function(table, chunks, 0, 0, *values)
        self.ready = True

    def run(
        self,
        table: np.ndarray,
        sizes: np.ndarray,
        values: tuple[Any, ...],
        chunks: np.ndarray | None = None,
    ) -> None:
        """Update the leaves of ``table`` (one row each, ``sizes`` elements).

        ``chunks`` is :func:`chunks_of` ``(sizes)``, when the caller keeps it.

        Large updates are shared between threads (numba's thread count): the
        chunks are cut into about :data:`PIECES` pieces per thread, which the threads take
        in turn, each running the kernel (which releases the GIL) on its piece,
        so that a thread slowed down by another process does not hold the rest up.
        """
        if chunks is None:
            chunks = chunks_of(sizes)
        total = int(sizes.sum())
        threads = min(_threads(), max(1, total // PER_THREAD), len(chunks))
        if threads <= 1:
            self.function(table, chunks, 0, len(chunks), *values)
            return
        pieces = min(len(chunks), PIECES * threads)
        ends = np.cumsum(chunks[:, 2] - chunks[:, 1])
        marks = [total * t // pieces for t in range(1, pieces)]
        cuts = [0, *np.searchsorted(ends, marks, side="left").tolist(), len(chunks)]
        ranges = iter([(a, b) for a, b in itertools.pairwise(cuts) if b > a])
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    piece = next(ranges, None)
                if piece is None:
                    return
                self.function(table, chunks, piece[0], piece[1], *values)

        pool = _pool(threads - 1)
        futures = [pool.submit(work) for _ in range(threads - 1)]
        work()
        for future in futures:
            future.result()


def chunks_of(sizes: np.ndarray) -> np.ndarray:
    """``(row, lo, hi)`` per chunk of at most :data:`CHUNK` elements."""
    counts = (sizes + (CHUNK - 1)) // CHUNK
    rows = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    lo = (np.arange(len(rows), dtype=np.int64) - starts) * CHUNK
    hi = np.minimum(lo + CHUNK, sizes[rows])
    return np.stack([rows, lo, hi], axis=1)


_kernels: dict[Program, Kernel] = {}
_lock = threading.Lock()


def kernel_for(program: Program) -> Kernel:
    """The compiled kernel of ``program`` (compiled on its first call)."""
    found = _kernels.get(program)
    if found is None:
        with _lock:
            found = _kernels.get(program)
            if found is None:
                found = _kernels[program] = Kernel(
                    _load(program), lambda: _in_memory(program)
                )
    return found


def cache_dir() -> pathlib.Path:
    """Where kernel sources (and numba's cache of them) are kept."""
    configured = os.environ.get("AGNOSTICOPT_CACHE_DIR")
    if configured:
        return pathlib.Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return pathlib.Path(base) / "agnosticopt"


def _cached_module(prefix: str, text: str) -> dict[str, Any] | None:
    """The namespace of generated source ``text``, from a file in :func:`cache_dir`.

    numba caches the compiled code next to that file, keyed by its path and
    time stamp: a file is written once and never rewritten. ``None`` when the
    cache cannot be used (not writable, or a damaged, undecodable file).
    """
    name = f"{prefix}_{hashlib.sha256(text.encode()).hexdigest()[:24]}"
    found = sys.modules.get(name)
    if found is not None:
        return vars(found)
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.py"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - not for a .py file
            raise OSError(path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # numba's cache imports it by name when loading
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    except (OSError, ValueError):
        return None
    return vars(module)


def _load(program: Program) -> Callable[..., None]:
    """The kernel of ``program``, cached on disk (or compiled in memory)."""
    namespace = _cached_module("agnosticopt_kernel", source(program, cache=True))
    if namespace is None:
        return _in_memory(program)  # compile in memory, for this session only
    kernel: Callable[..., None] = namespace["kernel"]
    return kernel


def _in_memory(program: Program) -> Callable[..., None]:
    """The kernel of ``program`` compiled without a disk cache."""
    namespace: dict[str, Any] = {"__name__": "agnosticopt.adapters._numba_kernels"}
    code = compile(source(program, cache=False), "<agnosticopt kernel>", "exec")
    exec(code, namespace)  # noqa: S102  (our own generated source)
    return namespace["kernel"]


_pools: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}


#: Threads a kernel may use; ``None``: numba's ``NUMBA_NUM_THREADS`` (the CPU count).
THREADS: int | None = None


def _threads() -> int:
    if THREADS is not None:
        return max(1, THREADS)
    return max(1, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1)))


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``workers`` threads, made anew in a forked child (threads do not
    survive a fork)."""
    key = (os.getpid(), workers)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools.setdefault(
            key,
            concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="agnosticopt"
            ),
        )
    return pool


# -- reductions: the aligned-block tree ---------------------------------------------------------

#: Nodes a piece of a reduction leaves at most (its stack of aligned blocks).
STACK = 128
#: Aligned 256-element blocks a reduction reduces together, level by level.
BATCH = 16

_TERMS = {2: "v * v", 1: "abs(v)", math.inf: "abs(v)"}
_COMBINES = {
    2: "a + b",
    1: "a + b",
    math.inf: "a if a != a else (b if b != b else (a if a >= b else b))",  # terms are >= 0
}

_NORM_SOURCE = """
import numpy as np
from numba import carray, njit
from agnosticopt.adapters._numba import _pointer

OPTIONS = dict(nogil=True, fastmath=False, error_model="numpy", boundscheck=False,
               cache={cache})


@njit(**OPTIONS)
def comb(a, b):
    return {combine}


@njit(**OPTIONS)
def term(v):
    return {term}


@njit(**OPTIONS)
def push(levels, blocks, values, sp, lev, blk, v):
    while sp > 0 and (blk & 1) == 1 and levels[sp - 1] == lev and blocks[sp - 1] == blk - 1:
        v = comb(values[sp - 1], v)
        sp -= 1
        lev += 1
        blk >>= 1
    levels[sp] = lev
    blocks[sp] = blk
    values[sp] = v
    return sp + 1


@njit(**OPTIONS)
def leaves4(g, dst, m):
    for j in range(m):
        dst[j] = comb(comb(term(g[4 * j]), term(g[4 * j + 1])),
                      comb(term(g[4 * j + 2]), term(g[4 * j + 3])))


@njit(**OPTIONS)
def nodes4(src, dst, m):
    for j in range(m):
        dst[j] = comb(comb(src[4 * j], src[4 * j + 1]), comb(src[4 * j + 2], src[4 * j + 3]))


@njit(**OPTIONS)
def block_nodes(g, count, a, b):
    # The level-8 nodes of ``count`` aligned 256-element blocks laid end to end:
    # every level at once over the batch (a pair never straddles two blocks), two
    # levels per pass, so that each pass is a long loop the compiler vectorises.
    leaves4(g, a, count * 64)
    nodes4(a, b, count * 16)
    nodes4(b, a, count * 4)
    nodes4(a, b, count)


@njit(**OPTIONS)
def pieces(addresses, lo, hi, offsets, levels, blocks, values, counts, p0, p1):
    a = np.empty({batch} * 64, np.{dtype})
    b = np.empty({batch} * 16, np.{dtype})
    for k in range(p0, p1):
        n = hi[k] - lo[k]
        g = carray(_pointer(addresses[k] + lo[k] * {size}), (n,), np.{dtype})
        base = k * {stack}
        lv = levels[base:base + {stack}]
        bl = blocks[base:base + {stack}]
        va = values[base:base + {stack}]
        off = offsets[k]
        sp = 0
        i = 0
        while i < n:
            gi = off + i
            if (gi & 255) == 0 and i + 256 <= n:
                count = min((n - i) >> 8, {batch})
                block_nodes(g[i:i + count * 256], count, a, b)
                for j in range(count):
                    sp = push(lv, bl, va, sp, 8, (gi >> 8) + j, b[j])
                i += count * 256
            else:
                sp = push(lv, bl, va, sp, 0, gi, term(g[i]))
                i += 1
        counts[k] = sp


@njit(**OPTIONS)
def join(levels, blocks, values, counts, c0, c1, lv, bl, va):
    # The stacks of the pieces c0..c1 (one array's chunks, in order) as one stack:
    # the maximal aligned blocks of their whole range; returns how many.
    sp = 0
    for k in range(c0, c1):
        for t in range(counts[k]):
            idx = k * {stack} + t
            sp = push(lv, bl, va, sp, levels[idx], blocks[idx], values[idx])
    return sp


@njit(**OPTIONS)
def root(levels, blocks, values, counts):
    total = 0
    for k in range(counts.shape[0]):
        total += counts[k]
    lv = np.empty(total + 1, np.int64)
    bl = np.empty(total + 1, np.int64)
    va = np.empty(total + 1, np.{dtype})
    sp = 0
    for k in range(counts.shape[0]):
        for t in range(counts[k]):
            idx = k * {stack} + t
            sp = push(lv, bl, va, sp, levels[idx], blocks[idx], values[idx])
    v = va[sp - 1]
    for t in range(sp - 2, -1, -1):
        v = comb(va[t], v)
    return v


@njit(**OPTIONS)
def scale(addresses, sizes, lams, out, offsets):
    # Array k times lams[k] (one correctly rounded product per element), written at
    # the address out + offsets[k] elements.
    for k in range(addresses.shape[0]):
        n = sizes[k]
        g = carray(_pointer(addresses[k]), (n,), np.{dtype})
        o = carray(_pointer(out + offsets[k] * {size}), (n,), np.{dtype})
        lam = lams[k]
        for i in range(n):
            o[i] = g[i] * lam


@njit(**OPTIONS)
def roots(levels, blocks, values, counts, firsts, out):
    # The root of each array: its pieces are firsts[r]..firsts[r + 1] (at least one).
    for r in range(out.shape[0]):
        a, b = firsts[r], firsts[r + 1]
        out[r] = root(levels[a * {stack}:b * {stack}], blocks[a * {stack}:b * {stack}],
                      values[a * {stack}:b * {stack}], counts[a:b])
"""

_reducers: dict[tuple[str, float], Any] = {}


def reducer(dtype: str, p: float) -> Any:
    """The compiled aligned-block reduction of the p-norm terms (p = 2, 1, inf)."""
    key = (dtype, p)
    found = _reducers.get(key)
    if found is None:
        fields = {
            "dtype": dtype,
            "size": np.dtype(dtype).itemsize,
            "stack": STACK,
            "batch": BATCH,
            "term": _TERMS[p],
            "combine": _COMBINES[p],
        }
        found = _reducers[key] = _norm_module(fields)
    return found


def _norm_module(fields: dict[str, Any]) -> dict[str, Any]:
    """The reduction functions, from a source file in :func:`cache_dir` (numba's
    disk cache keeps them compiled), or compiled in memory when it cannot be used."""
    namespace = _cached_module(
        "agnosticopt_norm", _NORM_SOURCE.format(cache=True, **fields)
    )
    if namespace is not None:
        return namespace
    namespace = {"__name__": "agnosticopt.adapters._numba_norms"}
    code = compile(
        _NORM_SOURCE.format(cache=False, **fields), "<agnosticopt norm>", "exec"
    )
    exec(code, namespace)  # noqa: S102  (our own generated source)
    return namespace


def tree_roots(
    dtype: str, p: float, addresses: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """The root of each array's own aligned-block tree of p-norm terms, in one call.

    ``addresses[k]``/``sizes[k]`` as in :func:`tree_root`, every size at least 1;
    element ``k`` of the result has the bits of ``tree_root`` of array ``k`` alone.
    """
    fns = reducer(dtype, p)
    rows, stacks = _stacks(fns, dtype, addresses, sizes, np.zeros_like(sizes))
    firsts = np.searchsorted(rows, np.arange(len(sizes) + 1, dtype=np.int64))
    out = np.empty(len(sizes), np.dtype(dtype))
    fns["roots"](*stacks, firsts, out)
    return out


def scale_into(
    dtype: str,
    p: float,
    addresses: np.ndarray,
    sizes: np.ndarray,
    lams: np.ndarray,
    out: int,
    offsets: np.ndarray,
) -> None:
    """Write ``lams[k]`` times array ``k`` (``addresses[k]``, ``sizes[k]`` elements of
    ``dtype``) at the address ``out`` plus ``offsets[k]`` elements: one correctly
    rounded product per element, numpy's ``multiply``. (``p`` names the compiled
    module of :func:`reducer` that holds it: the one the norms used.)"""
    reducer(dtype, p)["scale"](addresses, sizes, lams, out, offsets)


def _stacks(
    fns: dict[str, Any],
    dtype: str,
    addresses: np.ndarray,
    sizes: np.ndarray,
    offsets: np.ndarray,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Reduce every chunk of the arrays to its stack of aligned blocks.

    Array ``k``'s first element has the global index ``offsets[k]`` (the block
    indices count from there): the start of the concatenation for arrays laid end
    to end, 0 for arrays each on its own, the shard's place in the whole array for
    a piece of one. Returns the array (row) of each chunk and ``(levels, blocks,
    values, counts)``, the stacks: chunk ``c``'s ``counts[c]`` nodes at
    ``c * STACK``. The chunks run on up to :func:`_threads` threads.
    """
    chunks = chunks_of(sizes)
    rows = chunks[:, 0]
    lo, hi = chunks[:, 1].copy(), chunks[:, 2].copy()
    addr = addresses[rows].copy()
    starts = np.asarray(offsets, np.int64)[rows] + lo
    count = len(chunks)
    stacks = (
        np.empty(count * STACK, np.int64),
        np.empty(count * STACK, np.int64),
        np.empty(count * STACK, np.dtype(dtype)),
        np.zeros(count, np.int64),
    )
    run = functools.partial(fns["pieces"], addr, lo, hi, starts, *stacks)
    threads = min(_threads(), max(1, int(sizes.sum()) // PER_THREAD), count)
    if threads <= 1:
        run(0, count)
        return rows, stacks
    cuts = np.linspace(0, count, threads + 1).astype(np.int64).tolist()
    pool = _pool(threads - 1)
    futures = [pool.submit(run, a, b) for a, b in itertools.pairwise(cuts[1:])]
    run(cuts[0], cuts[1])
    for future in futures:
        future.result()
    return rows, stacks


def tree_root(dtype: str, p: float, addresses: np.ndarray, sizes: np.ndarray) -> Any:
    """The root of the aligned-block tree of the p-norm terms of arrays laid end to end.

    ``addresses[k]`` is the data address of the ``k``-th array (``sizes[k]``
    elements of ``dtype``); together they are the concatenation in that order.
    The same bits as :func:`agnosticopt._norm.combine_nodes` over
    :func:`~agnosticopt._norm.norm_nodes` of the arrays (the terms, then one
    correctly rounded ``combine`` per tree node): each piece keeps a stack of its
    finished aligned blocks, the stacks are joined in order, and the last ones are
    folded right to left (the nodes whose right half lies past the end).
    """
    fns = reducer(dtype, p)
    _, stacks = _stacks(fns, dtype, addresses, sizes, np.cumsum(sizes) - sizes)
    return np.dtype(dtype).type(fns["root"](*stacks))


def piece_nodes(
    dtype: str, p: float, addresses: np.ndarray, sizes: np.ndarray, offsets: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The aligned-block tree nodes of the p-norm terms of pieces of a larger array.

    ``addresses[k]`` is the data address of piece ``k`` (``sizes[k]`` elements of
    ``dtype``), whose first element has the global index ``offsets[k]``. Returns,
    per piece, ``(levels, blocks, values)``: the maximal aligned blocks of its index
    range, in order, reduced; the nodes and the bits of
    :func:`agnosticopt._norm.reduce_piece` of the piece's terms (none for an empty
    piece), for :func:`agnosticopt._norm.combine_nodes` or :func:`nodes_root`.
    """
    fns = reducer(dtype, p)
    rows, stacks = _stacks(fns, dtype, addresses, sizes, offsets)
    counts = stacks[3]
    ends = np.searchsorted(rows, np.arange(len(sizes)), side="right").tolist()
    join, out, c0 = fns["join"], [], 0
    for c1 in ends:
        room = int(counts[c0:c1].sum())
        lv, bl = np.empty(room, np.int64), np.empty(room, np.int64)
        va = np.empty(room, np.dtype(dtype))
        used = join(*stacks, c0, c1, lv, bl, va) if room else 0
        out.append((lv[:used], bl[:used], va[:used]))
        c0 = c1
    return out


def nodes_root(
    dtype: str, p: float, levels: np.ndarray, blocks: np.ndarray, values: np.ndarray
) -> Any:
    """The root of the tree from nodes that cover ``[0, n)`` once, in index order.

    The bits of :func:`agnosticopt._norm.combine_nodes` over the same nodes (the
    caller checks the cover); ``values`` are of ``dtype``.
    """
    fns = reducer(dtype, p)
    counts = np.array([len(levels)], np.int64)
    return np.dtype(dtype).type(
        fns["root"](
            np.ascontiguousarray(levels, np.int64),
            np.ascontiguousarray(blocks, np.int64),
            np.ascontiguousarray(values, np.dtype(dtype)),
            counts,
        )
    )
