"""The switch of the compiled fast path of :func:`agnosticopt.update_`.

With numba installed (the ``fast`` extra), ``update_`` runs the rules of float32
and float64 numpy arrays and CPU torch tensors as compiled loops that write the
state and the parameters in place (see :mod:`agnosticopt.adapters._fast`). The
fast path gives the same bits as the plain path; this switch exists to compare
the two, to measure, or to rule the fast path out when looking for a bug.

The environment variable ``AGNOSTICOPT_FAST=0`` turns it off at import time;
:func:`set_fast_path` turns it on and off at run time.
"""

from __future__ import annotations

import os

__all__ = ["fast_path_enabled", "set_fast_path"]

_OFF = frozenset({"0", "false", "no", "off"})

_enabled = os.environ.get("AGNOSTICOPT_FAST", "1").strip().lower() not in _OFF


def set_fast_path(enabled: bool) -> bool:
    """Turn the compiled fast path of :func:`~agnosticopt.update_` on or off.

    Parameters
    ----------
    enabled
        ``False`` makes every ``update_`` take the plain path (array-API calls
        of the adapter, one operation at a time).

    Returns
    -------
    bool
        The previous setting, so that it can be restored.

    Notes
    -----
    The fast path needs numba; without it this switch changes nothing. Both
    paths give the same bits. The default is on, unless the environment
    variable ``AGNOSTICOPT_FAST`` is ``0``, ``false``, ``no`` or ``off``.

    Examples
    --------
    >>> import agnosticopt as opt
    >>> previous = opt.set_fast_path(False)
    >>> opt.set_fast_path(previous)
    False
    """
    global _enabled
    if not isinstance(enabled, bool):
        msg = f"set_fast_path expects True or False, got {enabled!r}"
        raise TypeError(msg)
    previous, _enabled = _enabled, enabled
    return previous


def fast_path_enabled() -> bool:
    """Whether :func:`~agnosticopt.update_` may use the compiled fast path."""
    return _enabled
