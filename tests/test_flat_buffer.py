"""The flat-buffer mode: a model's arrays as views of one buffer, one leaf per step.

``flat, restructure = destructure(model)`` then ``restructure(flat)`` gives the
model back with arrays that are views of ``flat`` (numpy, torch), and
``restructure(gflat)`` gradients that are views of a gradient buffer. One
``update_(tree, flat, gflat)`` then steps every array at the cost of one leaf.
For an elementwise rule this is the per-array step, bit for bit; ClipNorm is the
exception (one norm over the buffer instead of one per array).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _backends import BackendHelper, BackendKind, backend_params

import agnosticopt as opt
from agnosticopt import conformance as c

SHAPES = [(300, 200), (40_000,), (7, 11, 13), (1,)]  # > 100k values in all
STEPS = 25  #: of the full tier (``pytest -m slow``); the default run takes 5
QUICK_STEPS = 5
DTYPES = ("float32", "float64")
WRITEABLE = backend_params((BackendKind.NUMPY, BackendKind.TORCH))


def _params() -> list[Any]:
    """The full tier: every elementwise case in each dtype on each writeable
    backend; the quick tier: each case in one (dtype, backend), rotating with the
    case, so that every (dtype, backend) runs in the default run."""
    cases = [case for case in c.CASES if "ClipNorm(" not in repr(case.rule)]
    combos = [(dtype, kind) for dtype in DTYPES for kind in WRITEABLE]
    params = []
    for i, case in enumerate(cases):
        for j, (dtype, kind) in enumerate(combos):
            tiers = [(STEPS, "full", [*kind.marks, pytest.mark.slow])]
            if j == i % len(combos):
                tiers.insert(0, (QUICK_STEPS, "quick", list(kind.marks)))
            params += [
                pytest.param(
                    case.rule,
                    dtype,
                    kind.values[0],
                    steps,
                    marks=marks,
                    id=f"{case.name}-{dtype}-{kind.id}-{tier}",
                )
                for steps, tier, marks in tiers
            ]
    return params


def _model(helper: BackendHelper, dtype: str, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [helper.asarray(rng.normal(size=s).astype(dtype)) for s in SHAPES]


def _bits(helper: BackendHelper, arrays: list[Any]) -> list[bytes]:
    return [helper.to_numpy(a).tobytes() for a in arrays]


@pytest.mark.parametrize(("rule", "dtype", "kind", "steps"), _params())
def test_one_buffer_steps_like_the_arrays(
    rule: opt.Rule, dtype: str, kind: BackendKind, steps: int
) -> None:
    helper = BackendHelper(kind)
    model, grads = _model(helper, dtype, 0), _model(helper, dtype, 1)
    per_array = [helper.asarray(helper.to_numpy(a)) for a in model]
    tree = opt.setup(rule, per_array)

    flat, restructure = opt.destructure(model)
    gflat, _ = opt.destructure(grads)
    views, gviews = restructure(flat), restructure(gflat)
    flat_tree = opt.setup(rule, flat)
    for k in range(steps):
        for g, gv in zip(grads, gviews, strict=True):  # the loop writes new gradients
            scale = helper.asarray(np.asarray(1.0 + k / steps, dtype=dtype))
            gv[...] = g * scale
        tree, per_array = opt.update_(tree, per_array, [g * scale for g in grads])
        flat_tree, new_flat = opt.update_(flat_tree, flat, gflat)
        assert new_flat is flat
    assert _bits(helper, views) == _bits(helper, per_array)


@pytest.mark.parametrize("kind", WRITEABLE)
def test_views_see_the_update_and_the_gradient_writes(kind: BackendKind) -> None:
    helper = BackendHelper(kind)
    model = _model(helper, "float32", 0)
    flat, restructure = opt.destructure(model)
    gflat = flat * 0
    views, gviews = restructure(flat), restructure(gflat)
    gviews[1][...] = helper.asarray(np.ones(SHAPES[1], dtype="float32"))
    before = helper.to_numpy(flat)
    opt.update_(opt.setup(opt.Descent(0.5), flat), flat, gflat)
    np.testing.assert_array_equal(helper.to_numpy(gflat)[60_000:100_000], 1.0)
    np.testing.assert_array_equal(
        helper.to_numpy(views[1]), before[60_000:100_000] - 0.5
    )
    np.testing.assert_array_equal(helper.to_numpy(views[0]).ravel(), before[:60_000])


def test_torch_autograd_fills_the_gradient_buffer() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    net = torch.nn.Sequential(
        torch.nn.Linear(50, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1)
    )
    params = list(net.parameters())
    flat, restructure = opt.destructure([p.detach() for p in params])
    gflat = torch.zeros_like(flat)
    for p, view, gview in zip(
        params, restructure(flat), restructure(gflat), strict=True
    ):
        p.data = view  # the module's parameters now live in the buffer
        p.grad = gview  # and autograd accumulates into the gradient buffer
    tree = opt.setup(opt.Adam(1e-2), flat)
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    y = x[:, :1].sin()
    losses = []
    for _ in range(30):
        gflat.zero_()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        tree, _ = opt.update_(tree, flat, gflat)
    assert all(
        p.grad.data_ptr() == g.data_ptr()
        for p, g in zip(params, restructure(gflat), strict=True)
    )
    assert gflat.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0]
