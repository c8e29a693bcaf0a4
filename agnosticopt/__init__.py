"""agnosticopt: Optimisers.jl's rules over the Python array API.

One definition of every rule, run unchanged on numpy, torch, array-api-strict
(and CuPy, JAX) arrays, giving the same bits on all of them.

>>> import numpy as np, agnosticopt as opt
>>> model = {"w": np.array([1.0, 2.0])}
>>> tree = opt.setup(opt.Descent(0.1), model)
>>> tree, model = opt.update(tree, model, {"w": np.array([10.0, 20.0])})
>>> model["w"]
array([0., 0.])
"""

from typing import Any as _Any

from agnosticopt import schedules
from agnosticopt._adam import (
    AdaBelief,
    Adam,
    AdaMax,
    AdamW,
    AMSGrad,
    NAdam,
    OAdam,
    RAdam,
)
from agnosticopt._adaptive import AdaDelta, AdaGrad, Lion, RMSProp, Rprop
from agnosticopt._adjust import adjust, adjust_, freeze_, thaw_
from agnosticopt._checkpoint import convert, load_state_dict, state_dict
from agnosticopt._checkpoint_file import load, save
from agnosticopt._clip import ClipGrad, ClipNorm
from agnosticopt._containers import register_container
from agnosticopt._decay import SignDecay, WeightDecay
from agnosticopt._flat import Restructure, destructure, trainables
from agnosticopt._global import ClipGlobalNorm, SkipNonFinite
from agnosticopt._leaf import Leaf
from agnosticopt._norm import NUMERICS_VERSION, norm
from agnosticopt._ops import OperatorWarning
from agnosticopt._paths import ByPath, by_path
from agnosticopt._protocols import RuleNamespace
from agnosticopt._rule import (
    DECAY,
    NONNEGATIVE,
    NONNEGATIVE_OR_INF,
    Range,
    Replace,
    Rule,
    check_precision,
    eps,
    hyper,
    hyperparameter,
)
from agnosticopt._schedules import Scheduled, ScheduledState
from agnosticopt._setup import setup
from agnosticopt._sgd import Descent, Momentum, Nesterov
from agnosticopt._speed import set_fast_path
from agnosticopt._trace import RuleOps, ops_used
from agnosticopt._train import History, TrainStep, train_
from agnosticopt._update import update, update_
from agnosticopt._wrappers import AccumGrad, MixedPrecision, OptimiserChain
from agnosticopt._xp import adapter_for, register_adapter

#: Public names whose module imports a backend: loaded on first access only.
_LAZY = {"TorchOptimizer": "agnosticopt.adapters.torch_optim"}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'agnosticopt' has no attribute {name!r}"
        raise AttributeError(msg)
    import importlib

    return getattr(importlib.import_module(module), name)


__version__ = "0.1.0"

if (
    "jax" in __import__("sys").modules
):  # JAX already imported: state trees are pytrees now
    import agnosticopt.adapters.jax  # noqa: F401  (registers Leaf; else done at the first JAX array)

__all__ = [
    "DECAY",
    "NONNEGATIVE",
    "NONNEGATIVE_OR_INF",
    "NUMERICS_VERSION",
    "AMSGrad",
    "AccumGrad",
    "AdaBelief",
    "AdaDelta",
    "AdaGrad",
    "AdaMax",
    "Adam",
    "AdamW",
    "ByPath",
    "ClipGlobalNorm",
    "ClipGrad",
    "ClipNorm",
    "Descent",
    "History",
    "Leaf",
    "Lion",
    "MixedPrecision",
    "Momentum",
    "NAdam",
    "Nesterov",
    "OAdam",
    "OperatorWarning",
    "OptimiserChain",
    "RAdam",
    "RMSProp",
    "Range",
    "Replace",
    "Restructure",
    "Rprop",
    "Rule",
    "RuleNamespace",
    "RuleOps",
    "Scheduled",
    "ScheduledState",
    "SignDecay",
    "SkipNonFinite",
    "TrainStep",
    "WeightDecay",
    "adapter_for",
    "adjust",
    "adjust_",
    "by_path",
    "check_precision",
    "convert",
    "destructure",
    "eps",
    "freeze_",
    "hyper",
    "hyperparameter",
    "load",
    "load_state_dict",
    "norm",
    "ops_used",
    "register_adapter",
    "register_container",
    "save",
    "schedules",
    "set_fast_path",
    "setup",
    "state_dict",
    "thaw_",
    "train_",
    "trainables",
    "update",
    "update_",
]
