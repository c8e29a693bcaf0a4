"""Schedules: frozen dataclasses called on the step count, giving a Python float.

Use them with :class:`agnosticopt.Scheduled` (see ``docs/training.md``)::

    import agnosticopt as opt
    rule = opt.Scheduled(opt.AdamW(1e-3, lambda_=1e-2),
                         eta=opt.schedules.warmup_cosine(1e-3, warmup=100, steps=10_000))
"""

from agnosticopt._schedules import (
    Constant,
    Cosine,
    Exponential,
    Join,
    Linear,
    OneCycle,
    Polynomial,
    Schedule,
    Step,
    warmup_cosine,
    warmup_linear,
)

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Join",
    "Linear",
    "OneCycle",
    "Polynomial",
    "Schedule",
    "Step",
    "warmup_cosine",
    "warmup_linear",
]
