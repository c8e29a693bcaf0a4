"""Golden trajectories: committed reference snapshots, compared bit for bit.

For every case of :data:`~agnosticopt.conformance.CASES`, in float32 and
float64, the parameter and state after :data:`GOLDEN_STEPS` updates of a
:data:`GOLDEN_SIZE`-element parameter on the ``normal`` data set (which has no
subnormals, so every backend is held to it), computed by the numpy adapter
from the rules' definitions. The files are ``golden_<dtype>.npz`` next to this
module: plain arrays and one JSON string (no pickle), made and checked by
``python -m agnosticopt.conformance.generate``.

Inputs come from :mod:`~agnosticopt.conformance._data`, which builds them from
bits, so they do not depend on numpy's random generators.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from agnosticopt.conformance._backends import Backend, NumpyBackend
from agnosticopt.conformance._cases import CASES, Case
from agnosticopt.conformance._trajectory import run_trajectory

from agnosticopt._norm import NUMERICS_VERSION

__all__ = [
    "GOLDEN_DTYPES",
    "GOLDEN_PERIOD",
    "GOLDEN_SIZE",
    "GOLDEN_STEPS",
    "golden_path",
    "golden_snapshot",
    "golden_trajectory",
    "load_golden",
    "make_golden",
    "write_golden",
]

#: Elements of the golden parameter: enough for every vector code path
#: (SIMD loops, torch's vectorised kernels), not a power of two (the norm's tree
#: then has partial nodes at the end).
GOLDEN_SIZE = 4099
#: The inputs repeat with this period, which halves the files (zip finds the
#: repeats in the results); every one of the GOLDEN_SIZE elements is computed.
GOLDEN_PERIOD = 2048
#: Updates per golden trajectory (AccumGrad(3) completes 33 rounds).
GOLDEN_STEPS = 100
#: The dtypes with golden files.
GOLDEN_DTYPES = ("float32", "float64")
GOLDEN_DATASET = "normal"
FORMAT = 1

_REGENERATE = "python -m agnosticopt.conformance.generate"


def golden_path(dtype: str, directory: Path | None = None) -> Path:
    """Where the golden file of ``dtype`` lives (next to this module by default)."""
    # resolve(): in an editable install this module is a link into the source tree
    base = Path(__file__).resolve().parent if directory is None else directory
    return base / f"golden_{dtype}.npz"


def _kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, np.ndarray):
        return "array"
    if isinstance(value, np.generic):
        return "numpy"
    return type(value).__name__  # bool, int, float, complex


def _encode(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    return np.asarray(value)


def _decode(kind: str, stored: np.ndarray | None) -> Any:
    if kind == "none":
        return None
    assert stored is not None
    if kind == "array":
        return stored
    if kind == "numpy":
        return stored[()]
    return {"bool": bool, "int": int, "float": float, "complex": complex}[kind](
        stored[()]
    )


def make_golden(dtype: str, cases: tuple[Case, ...] = CASES) -> bytes:
    """The golden file of ``dtype`` (npz bytes), computed on numpy now."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "numerics_version": NUMERICS_VERSION,
        "dtype": dtype,
        "dataset": GOLDEN_DATASET,
        "steps": GOLDEN_STEPS,
        "size": GOLDEN_SIZE,
        "period": GOLDEN_PERIOD,
        "numpy": np.__version__,
        "made_by": _REGENERATE,
        "cases": {},
    }
    for case in cases:
        snap = run_trajectory(
            NumpyBackend(),
            case.rule,
            dtype,
            GOLDEN_DATASET,
            steps=GOLDEN_STEPS,
            size=GOLDEN_SIZE,
            period=GOLDEN_PERIOD,
            in_place=False,  # the plain path: never the compiled fast path of update_
        )
        kinds = {}
        for path, value in snap.items():
            kinds[path] = _kind(value)
            stored = _encode(value)
            if stored is not None:
                arrays[f"{case.name}|{path}"] = stored
        meta["cases"][case.name] = {"rule": repr(case.rule), "entries": kinds}
    buffer = io.BytesIO()
    entries: dict[str, Any] = {
        "__meta__": np.array(json.dumps(meta, indent=1)),
        **arrays,
    }
    np.savez_compressed(buffer, **entries)
    return buffer.getvalue()


def write_golden(dtype: str, directory: Path | None = None) -> Path:
    """Compute and write the golden file of ``dtype``; returns its path."""
    path = golden_path(dtype, directory)
    path.write_bytes(make_golden(dtype))
    load_golden.cache_clear()
    return path


@functools.cache
def load_golden(dtype: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(meta, {case name: snapshot})`` from the committed golden file.

    Raises
    ------
    FileNotFoundError
        If there is no golden file for ``dtype``.
    """
    path = golden_path(dtype)
    if not path.exists():
        msg = f"no golden file for {dtype} at {path}; make it with {_REGENERATE}"
        raise FileNotFoundError(msg)
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"][()]))
        snaps = {
            name: {
                p: _decode(kind, data[f"{name}|{p}"] if kind != "none" else None)
                for p, kind in info["entries"].items()
            }
            for name, info in meta["cases"].items()
        }
    return meta, snaps


def golden_snapshot(case: Case, dtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, snapshot)`` of ``case`` in the golden file of ``dtype``.

    Raises
    ------
    LookupError
        If the file has no such case, holds it for a different rule (the
        rule's definition changed), or was made under another numerics contract
        version (:data:`agnosticopt.NUMERICS_VERSION`): regenerate the files.
    """
    meta, snaps = load_golden(dtype)
    version = meta.get("numerics_version", 1)  # files before version 2 did not say
    if version != NUMERICS_VERSION:
        msg = (
            f"the {dtype} golden file was made under numerics contract version {version}, "
            f"this is version {NUMERICS_VERSION}; regenerate with {_REGENERATE}"
        )
        raise LookupError(msg)
    info = meta["cases"].get(case.name)
    if info is None:
        msg = f"the {dtype} golden file has no case {case.name!r}; regenerate with {_REGENERATE}"
        raise LookupError(msg)
    if info["rule"] != repr(case.rule):
        msg = (
            f"the {dtype} golden file holds {case.name!r} for {info['rule']}, not "
            f"{case.rule!r}; regenerate with {_REGENERATE}"
        )
        raise LookupError(msg)
    return meta, snaps[case.name]


def golden_trajectory(
    backend: Backend, case: Case, dtype: str, *, in_place: bool | None = None
) -> dict[str, Any]:
    """The snapshot of ``case`` on ``backend`` under the golden file's settings.

    ``in_place=False`` takes :func:`agnosticopt.update` (the plain path that
    made the files) instead of ``update_``; by default ``update_`` unless the
    backend is functional-only.
    """
    meta, _ = load_golden(dtype)
    return run_trajectory(
        backend,
        case.rule,
        dtype,
        meta["dataset"],
        steps=meta["steps"],
        size=meta["size"],
        period=meta["period"],
        in_place=in_place,
    )
