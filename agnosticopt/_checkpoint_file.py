"""Checkpoint files: a state tree in safetensors, read back onto any backend.

The tensors are the state's arrays and host scalars, named as the keys of
:func:`~agnosticopt.state_dict` (``"<parameter>/<entry>"``), each in its own
dtype; the rest (rules, frozen flags, counters, key paths) is JSON in the
header's metadata under ``"agnosticopt"``. The file is written here (the
format is a length, a JSON header and the data) and read by safetensors'
own parser, which validates it; then the metadata and every entry are
checked against the target (see :mod:`agnosticopt._checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agnosticopt._checkpoint import (
    SEP,
    CheckpointError,
    _describe_value,
    _group,
    _into,
    _is_float_scalar,
    _is_numpy_generic,
    _keyed_leaves,
    _plain,
    leaf_entries,
)
from agnosticopt._xp import adapter_for

__all__ = ["load", "save"]

#: The metadata key of the JSON that describes the tree.
META_KEY = "agnosticopt"
FORMAT = "agnosticopt.state"
VERSION = 1
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header's size

_WRITE_DTYPES = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
_READ_DTYPES = {v: k for k, v in _WRITE_DTYPES.items()}
_COMPLEX_PARTS = {"complex64": "float32", "complex128": "float64"}


def _host_numpy(value: Any) -> Any:
    """An array or host scalar of any backend as a numpy array (a copy)."""
    import numpy as np

    if _is_numpy_generic(value):
        return np.array(value)
    xp = adapter_for(value)
    out = np.array(xp.to_numpy(value), copy=True)
    if xp.dtype_name(value) == "bfloat16" and out.dtype.name != "bfloat16":
        out = out.astype(
            _ml_dtypes().bfloat16
        )  # float32 holding bfloat16 values: exact
    return out


def _ml_dtypes() -> Any:
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "bfloat16 checkpoints need the ml_dtypes package (pip install ml_dtypes)"
        raise ImportError(msg) from exc
    return ml_dtypes


def _tensor_bytes(a: Any) -> tuple[str, list[int], bytes, bool]:
    """``(dtype code, shape, little-endian bytes, complex?)`` of a numpy array."""
    import numpy as np

    name = a.dtype.name
    is_complex = name in _COMPLEX_PARTS
    if is_complex:
        a = np.ascontiguousarray(a).view(_COMPLEX_PARTS[name]).reshape((*a.shape, 2))
        name = a.dtype.name
    code = _WRITE_DTYPES.get(name)
    if code is None:
        msg = f"save: arrays of dtype {name} cannot be written to a safetensors file"
        raise TypeError(msg)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return (
        code,
        [int(n) for n in a.shape],
        np.ascontiguousarray(a).tobytes(),
        is_complex,
    )


def _metadata_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    msg = f"save: the state entry {where} is {_describe_value(value)}, which has no file form"
    raise TypeError(msg)


def save(path: Any, tree: Any) -> None:
    """Write a state tree to a safetensors file.

    Parameters
    ----------
    path
        The file (``str`` or ``os.PathLike``); written to a temporary file
        next to it first, then renamed, so a failed save leaves no half file.
    tree
        A state tree on any backend and device.

    Notes
    -----
    Each array and host scalar of the state is one tensor named
    ``"<parameter>/<entry>"`` (see :func:`state_dict`), in its own dtype:
    host scalars such as ``beta_t`` as 0-d tensors, bit for bit (bfloat16 as
    ``BF16``); complex arrays as real tensors with a last axis of 2. Rules,
    frozen flags, counters and key paths are JSON in the header's metadata
    under ``"agnosticopt"``. Nothing is pickled: any safetensors reader
    (torch, JAX, numpy, Rust) can read the tensors.

    Raises
    ------
    TypeError, ValueError
        If a key is neither a string nor an integer, two key paths give one
        string, or the state holds something that has no file form.
    """
    import json
    import os

    leaves = _keyed_leaves(tree)
    if not leaves:
        msg = "save: the tree holds no Leaf; pass a state tree made by setup"
        raise TypeError(msg)
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    rules: list[Any] = []
    described: dict[str, Any] = {}
    for key, (keys, leaf) in leaves.items():
        entries = leaf_entries(leaf, raw=True)
        desc = entries.pop("rule")
        if desc not in rules:
            rules.append(desc)
        info: dict[str, Any] = {
            "path": list(keys),
            "rule": rules.index(desc),
            "frozen": entries.pop("frozen"),
            "host": [],
            "complex": [],
            "values": {},
        }
        for name, value in entries.items():
            full = f"{key}{SEP}{name}"
            if adapter_for(value) is not None or _is_numpy_generic(value):
                if _is_numpy_generic(value) and not _is_float_scalar(value):
                    info["values"][name] = _metadata_value(_plain(value), full)
                    continue
                code, shape, data, is_complex = _tensor_bytes(_host_numpy(value))
                tensors[full] = (code, shape, data)
                if _is_numpy_generic(value):
                    info["host"].append(name)
                if is_complex:
                    info["complex"].append(name)
            else:
                info["values"][name] = _metadata_value(value, full)
        described[key] = info
    meta = {"format": FORMAT, "version": VERSION, "rules": rules, "leaves": described}
    blob = _serialize(tensors, {META_KEY: json.dumps(meta, allow_nan=False)})
    target = os.fspath(path)
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(blob)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _serialize(
    tensors: Mapping[str, tuple[str, list[int], bytes]], metadata: Mapping[str, str]
) -> bytes:
    """The safetensors encoding: header length, JSON header, then the data."""
    import json
    import struct

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        code, shape, data = tensors[name]
        header[name] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _import_safetensors() -> Any:
    try:
        import safetensors
    except ImportError as exc:
        msg = (
            "reading checkpoints needs safetensors: pip install 'agnosticopt[checkpoint]' "
            "(or pip install safetensors)"
        )
        raise ImportError(msg) from exc
    return safetensors


def _read(path: Any) -> tuple[dict[str, Any], set[str]]:
    """A checkpoint file as flat entries (numpy arrays, numbers, descriptions).

    Also returns the names of the entries that were host scalars (0-d arrays).
    """
    import json
    import os
    import struct

    import numpy as np

    safetensors = _import_safetensors()
    where = os.fspath(path)
    with open(where, "rb") as f:
        data = f.read()
    bad = f"load: {where!r} is not a valid agnosticopt checkpoint"
    if len(data) < 8:
        raise CheckpointError(
            bad, [f"the file has {len(data)} bytes, less than a header"]
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_HEADER_LIMIT, len(data) - 8):
        why = f"the header length {size} exceeds the file ({len(data)} bytes) or 100 MB"
        raise CheckpointError(bad, [why])
    try:
        tensors = safetensors.deserialize(data)
        header = json.loads(data[8 : 8 + size])
    except Exception as exc:  # SafetensorError, and whatever bad bytes make json raise
        raise CheckpointError(bad, [f"safetensors: {exc}"]) from exc
    meta = _metadata(header, bad)
    problems: list[str] = []
    flat: dict[str, Any] = {}
    leaves: dict[str, Any] = meta["leaves"]
    complex_names = {
        f"{k}{SEP}{n}" for k, info in leaves.items() for n in info["complex"]
    }
    for name, spec in tensors:
        dtype = _READ_DTYPES.get(str(spec.get("dtype")).upper())
        if dtype is None:
            problems.append(
                f"{name}: mis-typed, dtype {spec.get('dtype')!r} is not one a "
                "state can have"
            )
            continue
        npdtype = _ml_dtypes().bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        array = np.frombuffer(
            bytes(spec["data"]), dtype=np.dtype(npdtype).newbyteorder("<")
        )
        array = array.astype(np.dtype(npdtype)).reshape(spec["shape"])
        if name in complex_names:
            if dtype not in ("float32", "float64") or array.shape[-1:] != (2,):
                problems.append(
                    f"{name}: mis-typed, a complex entry must be float32 or "
                    f"float64 with a last axis of 2, got {dtype} {array.shape}"
                )
                continue
            array = np.ascontiguousarray(array).view(
                "complex64" if dtype == "float32" else "complex128"
            )[..., 0]
        flat[name] = array
    for key, info in leaves.items():
        flat[f"{key}{SEP}rule"] = meta["rules"][info["rule"]]
        flat[f"{key}{SEP}frozen"] = info["frozen"]
        for name, value in info["values"].items():
            flat[f"{key}{SEP}{name}"] = value
    if problems:
        raise CheckpointError(bad, problems)
    host = {f"{k}{SEP}{n}" for k, info in leaves.items() for n in info["host"]}
    return flat, host


def _metadata(header: Any, bad: str) -> dict[str, Any]:
    """The checkpoint's own metadata, checked for shape (types, references)."""
    import json

    raw = header.get("__metadata__") if isinstance(header, dict) else None
    text = raw.get(META_KEY) if isinstance(raw, dict) else None
    if not isinstance(text, str):
        why = (
            f"the header has no {META_KEY!r} metadata: not written by agnosticopt.save"
        )
        raise CheckpointError(bad, [why])
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            bad, [f"the {META_KEY!r} metadata is not JSON: {exc}"]
        ) from exc
    problems = []
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        problems.append(f"the metadata's format is not {FORMAT!r}")
    elif meta.get("version") != VERSION:
        problems.append(
            f"format version {meta.get('version')!r}; this agnosticopt reads "
            f"version {VERSION}"
        )
    elif not isinstance(meta.get("rules"), list) or not isinstance(
        meta.get("leaves"), dict
    ):
        problems.append("the metadata needs a list 'rules' and a dict 'leaves'")
    else:
        for key, info in meta["leaves"].items():
            problems.extend(_check_info(key, info, len(meta["rules"])))
    if problems:
        raise CheckpointError(bad, problems)
    checked: dict[str, Any] = meta  # a dict with the fields above
    return checked


def _check_info(key: str, info: Any, n_rules: int) -> list[str]:
    shape = {
        "path": list,
        "rule": int,
        "frozen": bool,
        "host": list,
        "complex": list,
        "values": dict,
    }
    if not isinstance(info, dict) or set(info) != set(shape):
        return [f"{key}: the metadata of a parameter needs the keys {sorted(shape)}"]
    problems = [
        f"{key}: metadata {k!r} must be a {t.__name__}"
        for k, t in shape.items()
        if not isinstance(info[k], t) or (t is int and isinstance(info[k], bool))
    ]
    if not problems and not 0 <= info["rule"] < n_rules:
        problems.append(
            f"{key}: metadata 'rule' {info['rule']} is not an index of 'rules'"
        )
    if not problems and not all(isinstance(n, str) for n in info["complex"]):
        problems.append(f"{key}: metadata 'complex' must list entry names")
    return problems


def load(path: Any, like: Any = None) -> Any:
    """Read a checkpoint written by :func:`save`, onto any backend and device.

    Parameters
    ----------
    path
        The safetensors file.
    like
        The model to make the state tree for (its arrays give the backend,
        device and dtypes), or a state tree there whose structure and rules'
        classes the file must have. ``None`` returns the flat state dict, with
        numpy arrays, for inspection or :func:`load_state_dict`.

    Returns
    -------
    tree
        A new state tree, with the file's rules, frozen flags and state (bit
        for bit; host scalars in their dtype). ``like`` is not modified.

    Raises
    ------
    CheckpointError
        If the file is truncated, corrupted or not made by :func:`save`
        (bad header length, offsets, JSON or dtypes), or was made for another
        model: naming each missing, extra, mis-shaped or mis-typed entry.
    ImportError
        Without safetensors (``pip install 'agnosticopt[checkpoint]'``).
    """
    import os

    flat, host = _read(path)
    where = os.fspath(path)
    if like is None:
        return {
            k: _plain(v[()]) if k in host and _zero_d(v) else v for k, v in flat.items()
        }

    def grouped_of(known: set[str], problems: list[str]) -> dict[str, dict[str, Any]]:
        return _group(flat, known, problems)

    return _into(like, grouped_of, f"load: {where!r} does not fit")


def _zero_d(value: Any) -> bool:
    return getattr(value, "shape", None) == ()
