"""``agnosticopt info``: the backends found, their devices, the adapters' fixes."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from agnosticopt.conformance._backends import BUILTIN_BACKENDS, Backend
from agnosticopt.conformance._table import format_table

from agnosticopt._backends import backend_entry

__all__ = ["backend_info", "render_info"]


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return "not installed"


def _torch_devices(device: str) -> list[str]:
    import torch

    if device == "cpu":
        return ["cpu"]
    return [
        f"cuda:{k} {torch.cuda.get_device_name(k)}"
        for k in range(torch.cuda.device_count())
    ]


def _strict_devices() -> list[str]:
    import array_api_strict

    names = [
        re.sub(r"^.*\('(.*)'\)$", r"\1", str(d))
        for d in array_api_strict.__array_namespace_info__().devices()
    ]
    return [f"{n} (conformance arrays)" if n == "device1" else n for n in names]


def _jax_devices() -> list[str]:
    import jax

    return [str(d) for d in jax.devices()]


def _cupy_devices() -> list[str]:
    import cupy

    return [f"cuda:{k}" for k in range(cupy.cuda.runtime.getDeviceCount())]


_DEVICES: dict[str, Callable[[], list[str]]] = {
    "numpy": lambda: ["cpu"],
    "numpy_readonly": lambda: ["cpu"],
    "torch": lambda: _torch_devices("cpu"),
    "torch_cuda": lambda: _torch_devices("cuda"),
    "array_api_strict": _strict_devices,
    "jax": _jax_devices,
    "cupy": _cupy_devices,
}


def backend_info(name: str, backend: Backend) -> dict[str, Any]:
    """Version, devices, adapter, fixes and declared deviations of one backend."""
    library = backend_entry(name).library if name in BUILTIN_BACKENDS else name
    from agnosticopt._norm import NUMERICS_VERSION

    info: dict[str, Any] = {
        "backend": backend.name,
        "library": library,
        "version": _version(library),
        "numerics_version": NUMERICS_VERSION,
    }
    why = backend.unavailable()
    if why:
        return {**info, "available": False, "reason": why}
    adapter = backend.adapter()
    deviations = [
        f"flushes subnormals to zero in {', '.join(flushed)}"
        for flushed in [getattr(adapter, "flushes_subnormals", ())]
        if flushed
    ]
    return {
        **info,
        "available": True,
        "devices": _DEVICES.get(name, list)(),
        "adapter": f"{type(adapter).__module__}.{type(adapter).__name__}",
        "fixes": list(getattr(adapter, "fixes", ())),
        "deviations": deviations,
        "unsupported": {
            d: r for d in ("float16", "float64") if (r := backend.unsupported(d))
        },
        "fast_path": _fast_path(adapter),
    }


def _fast_path(adapter: Any) -> str:
    """Whether ``update_`` runs compiled kernels on this adapter's arrays, and why not."""
    if getattr(adapter, "fast_plan", None) is None or adapter.name not in (
        "numpy",
        "torch",
    ):
        return "none (every operation one array-API call)"
    from agnosticopt._speed import fast_path_enabled

    if importlib.util.find_spec("numba") is None:
        return "off: numba is not installed (pip install agnosticopt[fast])"
    if not fast_path_enabled():
        return "off: switched off (AGNOSTICOPT_FAST or set_fast_path)"
    return (
        f"numba {_version('numba')} kernels in update_ for writeable float32/float64 arrays "
        "(no fast-math: the plain path's bits)"
    )


def render_info(infos: list[dict[str, Any]]) -> str:
    """``agnosticopt info`` as text."""
    import agnosticopt

    head = (
        f"agnosticopt {agnosticopt.__version__} (numerics contract version "
        f"{agnosticopt.NUMERICS_VERSION}) - Python {platform.python_version()}, "
        f"numpy {np.__version__}, array-api-compat "
        f"{importlib.metadata.version('array-api-compat')}"
    )
    rows = [
        [
            i["backend"],
            i["library"] + " " + i["version"],
            ", ".join(i["devices"])
            if i["available"]
            else "not available: " + i["reason"],
        ]
        for i in infos
    ]
    out = [head, "", format_table(["backend", "library", "devices"], rows), ""]
    for i in infos:
        if not i["available"]:
            continue
        out.append(f"{i['backend']}: {i['adapter']}")
        fixes = i["fixes"] or ["(none needed: every operation is already exact)"]
        out += [f"  fix: {fix}" for fix in fixes]
        out += [f"  deviation: {d}" for d in i["deviations"]]
        out += [f"  no {d}: {why}" for d, why in i["unsupported"].items()]
        out.append(f"  fast path: {i['fast_path']}")
    return "\n".join(out)


def all_backend_info() -> list[dict[str, Any]]:
    """:func:`backend_info` of every built-in backend."""
    return [backend_info(name, factory()) for name, factory in BUILTIN_BACKENDS.items()]
