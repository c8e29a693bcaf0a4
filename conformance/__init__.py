"""The conformance suite: does a backend give numpy's bits for every rule?

agnosticopt promises the same bits on every backend. This package checks the
promise for any backend, ours or a third party's:

* :class:`Backend` says how to move numpy data to the backend's arrays and
  back; built-ins cover numpy, read-only numpy, torch (CPU, CUDA),
  array-api-strict, JAX and CuPy (:func:`get_backend`).
* :data:`CASES` is every rule and a set of chains; the gradient data sets are
  ``normal`` and ``special`` (zeros, signed zeros, subnormals, overflow).
* The ``check_*`` functions (:data:`ALL_CHECKS`) each test one property and
  raise :class:`ConformanceError` naming the rule, dtype and first differing
  element: trajectory identity against numpy (:func:`check_trajectory`) and
  against the committed golden files (:func:`check_golden`), ``update`` vs
  ``update_``, dtype and device preservation, untouched inputs, stable state
  structure, ``None`` gradients and tied weights.

Your own rule: :func:`check_rule` (or ``agnosticopt conformance --rule
mymodule:MyRule``) runs it on every installed backend and reports, per backend,
identical, the elements that differ and by how many ulps, or the error.

Run the suite from the command line (``agnosticopt conformance --backend
mypkg.arrays:MyBackend``), from pytest (``AGNOSTICOPT_BACKEND=mypkg.arrays:MyBackend
pytest --pyargs agnosticopt.conformance``, or with command-line options after
``-p agnosticopt.conformance.pytest_plugin``; see ``conftest.py``), or call the
checks yourself::

    from agnosticopt import conformance as c
    for case in c.CASES:
        c.check_trajectory(c.get_backend("torch"), case, "float32", steps=100)
"""

from agnosticopt.conformance._backends import (
    BUILTIN_BACKENDS,
    ArrayApiStrictBackend,
    Backend,
    CupyBackend,
    JaxBackend,
    NumpyBackend,
    NumpyReadonlyBackend,
    TorchBackend,
    as_backend,
    get_backend,
)
from agnosticopt.conformance._cases import CASES, Case, case_named, complex_ok
from agnosticopt.conformance._checks import (
    ALL_CHECKS,
    PROPERTY_CHECKS,
    ConformanceError,
    KnownDeviation,
    as_case,
    check_device_preserved,
    check_dtype_preserved,
    check_golden,
    check_inputs_untouched,
    check_none_gradient,
    check_state_structure_stable,
    check_tied_weights,
    check_trajectory,
    check_update_matches_update_,
)
from agnosticopt.conformance._compare import (
    Comparison,
    Difference,
    compare,
    hexfloat,
    ulp_distance,
)
from agnosticopt.conformance._data import (
    DATASETS,
    gradient_pool,
    initial_parameter,
)
from agnosticopt.conformance._golden import GOLDEN_DTYPES, load_golden
from agnosticopt.conformance._rule_check import (
    RuleReport,
    RuleResult,
    check_rule,
    load_rule,
)
from agnosticopt.conformance._trajectory import (
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    reference_trajectory,
    run_trajectory,
    snapshot,
)

__all__ = [
    "ALL_CHECKS",
    "BUILTIN_BACKENDS",
    "CASES",
    "DATASETS",
    "DEFAULT_SIZE",
    "DEFAULT_STEPS",
    "GOLDEN_DTYPES",
    "PROPERTY_CHECKS",
    "ArrayApiStrictBackend",
    "Backend",
    "Case",
    "Comparison",
    "ConformanceError",
    "CupyBackend",
    "Difference",
    "JaxBackend",
    "KnownDeviation",
    "NumpyBackend",
    "NumpyReadonlyBackend",
    "RuleReport",
    "RuleResult",
    "TorchBackend",
    "as_backend",
    "as_case",
    "case_named",
    "check_device_preserved",
    "check_dtype_preserved",
    "check_golden",
    "check_inputs_untouched",
    "check_none_gradient",
    "check_rule",
    "check_state_structure_stable",
    "check_tied_weights",
    "check_trajectory",
    "check_update_matches_update_",
    "compare",
    "complex_ok",
    "get_backend",
    "gradient_pool",
    "hexfloat",
    "initial_parameter",
    "load_golden",
    "load_rule",
    "reference_trajectory",
    "run_trajectory",
    "snapshot",
    "ulp_distance",
]
