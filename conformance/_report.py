"""The conformance matrix of ``agnosticopt conformance``: run, tabulate, serialise.

Each cell of the main table is one rule (case) on one backend in one dtype; it
is ``identical`` when the trajectories on every data set and the golden
trajectory have numpy's bits, else the largest distance in ulps. A second
table gives the property checks (update vs update_, dtype and device,
untouched inputs, state structure, None gradients, tied weights) per backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import unittest
from collections.abc import Callable, Sequence
from typing import Any

from agnosticopt.conformance._backends import Backend
from agnosticopt.conformance._cases import Case
from agnosticopt.conformance._checks import (
    PROPERTY_CHECKS,
    ConformanceError,
    KnownDeviation,
    check_golden,
    check_trajectory,
)
from agnosticopt.conformance._compare import format_ulp
from agnosticopt.conformance._golden import GOLDEN_SIZE, GOLDEN_STEPS
from agnosticopt.conformance._progress import Progress
from agnosticopt.conformance._table import format_table
from agnosticopt.conformance._trajectory import DEFAULT_STEPS

__all__ = ["Result", "render_json", "render_text", "run_matrix"]

FAILED = ("differs", "error")


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one check on one backend.

    ``status`` is ``identical`` (or ``passed`` for a property check),
    ``differs``, ``deviation`` (a difference the adapter declares),
    ``skipped`` or ``error``; ``detail`` says why (the first difference, the
    skip reason, the exception).
    """

    check: str
    backend: str
    case: str
    dtype: str
    dataset: str | None
    status: str
    max_ulp: float | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        """Whether this result makes the run fail."""
        return self.status in FAILED

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (an infinite ulp distance becomes ``null``)."""
        out = dataclasses.asdict(self)
        if self.max_ulp is not None and math.isinf(self.max_ulp):
            out["max_ulp"] = None
        return out


def _outcome(run: Callable[[], Any], ok: str) -> tuple[str, float | None, str]:
    try:
        run()
    except unittest.SkipTest as exc:
        return "skipped", None, str(exc)
    except KnownDeviation as exc:
        ulp = exc.comparison.max_ulp if exc.comparison else None
        first = exc.comparison.first if exc.comparison else None
        return (
            "deviation",
            ulp,
            exc.deviation + (f"; {first.describe()}" if first else ""),
        )
    except ConformanceError as exc:
        ulp = exc.comparison.max_ulp if exc.comparison else None
        return "differs", ulp, str(exc)
    except Exception as exc:  # noqa: BLE001  (a crash is a result: report it, go on)
        return "error", None, f"{type(exc).__name__}: {exc}"
    except SystemExit as exc:  # a backend that exits mid-check has failed that check
        return "error", None, f"SystemExit({exc.code!r}) raised during the check"
    return ok, 0.0 if ok == "identical" else None, ""


def run_matrix(
    backends: Sequence[Backend],
    cases: Sequence[Case],
    dtypes: Sequence[str],
    datasets: Sequence[str],
    *,
    steps: int | None = None,
    size: int,
    properties: bool = True,
    progress: Progress | None = None,
) -> list[Result]:
    """Run every check of the matrix; never raises for a failing backend.

    The numpy reference of each (case, dtype, data set) is computed once and
    shared by the backends that follow it.
    """
    results: list[Result] = []
    bar = progress or Progress(1, enabled=False)

    def record(
        check: Callable[..., Any],
        b: Backend,
        case: Case,
        dtype: str,
        dataset: str | None = None,
        **options: Any,
    ) -> None:
        name = check.__name__.removeprefix("check_")
        where = f"{case.name} {dtype}{' ' + dataset if dataset else ''} on {b.name}"
        bar.show(f"{name}: {where}")
        if dataset is not None:
            options["dataset"] = dataset
        ok = "passed" if check in PROPERTY_CHECKS else "identical"
        status, ulp, detail = _outcome(lambda: check(b, case, dtype, **options), ok)
        results.append(
            Result(name, b.name, case.name, dtype, dataset, status, ulp, detail)
        )
        bar.advance()

    for dtype in dtypes:
        for case in cases:
            for dataset in datasets:
                for b in backends:
                    record(
                        check_trajectory,
                        b,
                        case,
                        dtype,
                        dataset,
                        steps=steps,
                        size=size,
                    )
            for b in backends:
                record(check_golden, b, case, dtype)
            for check in PROPERTY_CHECKS if properties else ():
                for b in backends:
                    record(check, b, case, dtype)
    return results


def matrix_size(
    n_backends: int, n_cases: int, n_dtypes: int, n_datasets: int, *, properties: bool
) -> int:
    """The number of results :func:`run_matrix` produces (for the progress bar)."""
    per_case = n_datasets + 1 + (len(PROPERTY_CHECKS) if properties else 0)
    return n_backends * n_cases * n_dtypes * per_case


class _Notes:
    """Numbered footnotes, each text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[{k}] {text}" for k, text in enumerate(self.texts, 1)]


def _first_line(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    short = " / ".join(lines[:2])
    return short if len(short) <= limit else short[: limit - 3] + "..."


def _cell(results: list[Result], notes: _Notes) -> str:
    """One table cell from the results that fall into it."""
    failed = [r for r in results if r.failed]
    if any(r.status == "error" for r in failed):
        bad = next(r for r in failed if r.status == "error")
        return "error " + notes.mark(
            f"{bad.backend} {bad.case} {bad.dtype}: {_first_line(bad.detail)}"
        )
    if failed:
        worst = max(failed, key=lambda r: r.max_ulp or 0.0)
        ulp = format_ulp(worst.max_ulp if worst.max_ulp is not None else math.inf)
        return f"{ulp} " + notes.mark(_first_line(worst.detail))
    ran = [r for r in results if r.status != "skipped"]
    if not ran:
        return "skipped " + notes.mark(results[0].detail) if results else ""
    deviations = [r for r in ran if r.status == "deviation"]
    if deviations:
        where = sorted({r.dataset or "golden" for r in deviations})
        text = f"{deviations[0].detail.split(';')[0]}: differs on the {', '.join(where)} data"
        if len(deviations) < len(ran):
            text += ", identical elsewhere"
        return "deviation " + notes.mark(text)
    return ran[0].status


def render_text(
    results: list[Result],
    *,
    backends: Sequence[Backend],
    dtypes: Sequence[str],
    steps: int | None,
    size: int,
    unavailable: dict[str, str],
) -> str:
    """The tables: rule x backend per dtype, then the property checks."""
    notes = _Notes()
    names = [b.name for b in backends if b.name not in unavailable]
    cases = list(dict.fromkeys(r.case for r in results))
    out: list[str] = []
    for dtype in dtypes:
        length = steps if steps is not None else DEFAULT_STEPS.get(dtype, 0)
        datasets = sorted(
            {r.dataset for r in results if r.check == "trajectory" and r.dataset}
        )
        out.append(
            f"{dtype}: {length} steps x {size} elements ({' and '.join(datasets)} data), "
            f"and the golden trajectory ({GOLDEN_STEPS} steps x {GOLDEN_SIZE})"
        )
        rows = []
        for case in cases:
            row = [case]
            for name in names:
                found = [
                    r
                    for r in results
                    if r.case == case
                    and r.dtype == dtype
                    and r.backend == name
                    and r.check in ("trajectory", "golden")
                ]
                row.append(_cell(found, notes))
            rows.append(row)
        out += [format_table(["rule", *names], rows), ""]
    checks = list(
        dict.fromkeys(
            r.check for r in results if r.check not in ("trajectory", "golden")
        )
    )
    if checks:
        out.append(f"property checks (every rule, {', '.join(dtypes)})")
        rows = []
        for check in checks:
            row = [check]
            for name in names:
                found = [r for r in results if r.check == check and r.backend == name]
                failed = [r for r in found if r.failed]
                if failed:
                    row.append(
                        f"{len(failed)} failed "
                        + notes.mark(_first_line(failed[0].detail))
                    )
                else:
                    row.append(_cell(found, notes))
            rows.append(row)
        out += [format_table(["check", *names], rows), ""]
    if unavailable:
        out.append(
            "not available: "
            + "; ".join(f"{n} ({why})" for n, why in unavailable.items())
        )
    out += notes.render()
    failures = sum(r.failed for r in results)
    ran = sum(r.status != "skipped" for r in results)
    if not ran:
        out.append(
            "FAILED: no check ran (every one was skipped), so nothing was verified"
        )
        return "\n".join(out)
    out.append(
        f"FAILED: {failures} of {ran} checks differ or fail"
        if failures
        else f"OK: {ran} checks, every backend gives numpy's bits"
        + (
            " (apart from the declared deviations)"
            if any(r.status == "deviation" for r in results)
            else ""
        )
    )
    return "\n".join(out)


def render_json(
    results: list[Result], *, settings: dict[str, Any], unavailable: dict[str, str]
) -> str:
    """The results as one JSON document."""
    doc = {
        "settings": settings,
        "unavailable": unavailable,
        "failures": sum(r.failed for r in results),
        "checked": sum(r.status != "skipped" for r in results),
        "results": [r.to_json() for r in results],
    }
    return json.dumps(doc, indent=1)
