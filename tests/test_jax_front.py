"""The JAX front end: state trees as pytrees, setup under eval_shape, update under jit.

Bits under ``jax.jit`` are the compiler's (XLA contracts ``a*b + c`` into fused
multiply-adds); :func:`test_jitted_adam_is_close_to_eager_and_the_difference_is_measured`
measures the difference on more than 100k values and prints it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt

jax = pytest.importorskip("jax", reason="jax is not installed")
jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")

SHAPE = (300, 400)  # 120_000 values


def _params(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal(400).astype(np.float32)),
        "n": 3,
    }


def _grads(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(100 + step)
    return {
        "w": jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal(400).astype(np.float32)),
        "n": None,
    }


def _u32(a: Any) -> np.ndarray:
    return np.asarray(a).view(np.uint32)


def test_a_state_tree_is_a_pytree_with_static_rules_and_counters() -> None:
    rule = opt.OptimiserChain(opt.AccumGrad(2), opt.Adam())
    tree = opt.setup(rule, _params())
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in pairs]
    assert names == [
        "['b'].state.0.acc",
        "['b'].state.1.m",
        "['b'].state.1.v",
        "['b'].state.1.beta_t.0",
        "['b'].state.1.beta_t.1",
        "['w'].state.0.acc",
        "['w'].state.1.m",
        "['w'].state.1.v",
        "['w'].state.1.beta_t.0",
        "['w'].state.1.beta_t.1",
    ]
    assert isinstance(
        pairs[3][1], np.float32
    )  # host scalars are children: jit traces them
    again = jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in pairs])
    assert again["w"].rule is rule
    assert again["n"] is None
    assert again["w"].state[0].counter == 1
    assert type(again["w"].state[0].counter) is int
    stepped, _ = opt.update(tree, _params(), _grads(0))
    # the counter is static (aux data): a new value is a new tree structure
    assert jax.tree_util.tree_structure(stepped) != treedef
    opt.freeze_(stepped)
    assert "True" in str(jax.tree_util.tree_structure(stepped))


def test_setup_works_under_eval_shape() -> None:
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.AccumGrad(3), opt.AdamW())
    params = _params()
    shapes = jax.eval_shape(lambda p: opt.setup(rule, p), params)
    real = opt.setup(rule, params)
    state = shapes["w"].state
    assert isinstance(state[2].m, jax.ShapeDtypeStruct)
    assert (state[2].m.shape, state[2].m.dtype) == (SHAPE, jnp.float32)
    assert (state[2].beta_t[0].shape, state[2].beta_t[0].dtype) == ((), jnp.float32)
    assert state[1].counter == 1
    assert state[0] is None
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)


def _step(rule: Any) -> Any:
    def step(tree: Any, params: Any, grads: Any) -> Any:
        return opt.update(tree, params, grads)

    return jax.jit(step)


def test_jitted_adam_is_close_to_eager_and_the_difference_is_measured() -> None:
    rule = opt.Adam(1e-3)
    jitted = _step(rule)
    t1 = t2 = opt.setup(rule, _params())
    p1 = p2 = _params()
    for i in range(10):
        t1, p1 = jitted(t1, p1, _grads(i))
        t2, p2 = opt.update(t2, p2, _grads(i))
    assert (
        jitted._cache_size() <= 2
    )  # numpy host scalars first, then 0-d arrays: no more
    assert p1["n"] == 3
    differ = float(np.mean(_u32(p1["w"]) != _u32(p2["w"])))
    worst = float(np.max(np.abs(np.asarray(p1["w"]) - np.asarray(p2["w"]))))
    m_differ = float(np.mean(_u32(t1["w"].state.m) != _u32(t2["w"].state.m)))
    print(
        f"jit vs eager, Adam, 10 steps, {np.prod(SHAPE)} float32 values: parameters "
        f"differ in {differ:.2%} (largest {worst:.2e}), m in {m_differ:.2%}; "
        f"beta_t identical: {np.asarray(t1['w'].state.beta_t[1]) == t2['w'].state.beta_t[1]}"
    )
    assert float(np.asarray(t1["w"].state.beta_t[1])) == float(t2["w"].state.beta_t[1])
    # the compiler's bits: FMA contraction changes last bits of some values, nothing more
    np.testing.assert_allclose(
        np.asarray(p1["w"]), np.asarray(p2["w"]), rtol=0, atol=1e-6
    )
    assert differ < 0.5


def test_accumgrad_under_jit_compiles_one_variant_per_counter_value() -> None:
    rule = opt.OptimiserChain(opt.AccumGrad(3), opt.Momentum(0.01))
    jitted = _step(rule)
    tree, params = opt.setup(rule, _params()), _params()
    eager_tree, eager = tree, params
    for i in range(7):
        tree, params = jitted(tree, params, _grads(i))
        eager_tree, eager = opt.update(eager_tree, eager, _grads(i))
        assert tree["w"].state[0].counter == eager_tree["w"].state[0].counter
    # one variant per counter value, and the first call's numpy host scalars one more
    assert jitted._cache_size() == 4
    np.testing.assert_allclose(
        np.asarray(params["w"]), np.asarray(eager["w"]), atol=1e-6
    )


def test_rules_that_decide_on_the_host_say_so_under_jit() -> None:
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam())
    tree, params = opt.setup(rule, _params()), _params()
    with pytest.raises(
        TypeError, match=r"ClipNorm\(throw=True\) raises .* jax\.jit cannot"
    ):
        _step(rule)(
            tree, params, _grads(0)
        )  # throw=False traces (test_jax_sharding.py)
    tree, params = opt.update(tree, params, _grads(0))  # eager: fine
    assert params["w"].shape == SHAPE


def test_a_jitted_state_saves_and_resumes_eagerly(tmp_path: Any) -> None:
    pytest.importorskip("safetensors", reason="the checkpoint extra is not installed")
    rule = opt.Adam(1e-3)
    tree, params = opt.setup(rule, _params()), _params()
    tree, params = _step(rule)(tree, params, _grads(0))
    assert isinstance(tree["w"].state.beta_t[0], jax.Array)  # a 0-d array after jit
    path = tmp_path / "jit.safetensors"
    opt.save(path, tree)
    numpy_params = {k: np.asarray(v) if k != "n" else v for k, v in params.items()}
    back = opt.load(path, like=numpy_params)
    assert type(back["w"].state.beta_t[0]) is np.float32
    assert back["w"].state.beta_t[0] == np.asarray(tree["w"].state.beta_t[0])
    assert (_u32(back["w"].state.v) == _u32(tree["w"].state.v)).all()
    tree, params = opt.update(tree, params, _grads(1))  # eager after jit
    back, numpy_params = opt.update(
        back,
        numpy_params,
        {k: np.asarray(v) if v is not None else None for k, v in _grads(1).items()},
    )
    assert (_u32(back["w"].state.m) == _u32(tree["w"].state.m)).all()


REGISTRATION = textwrap.dedent("""
    import sys
    order = sys.argv[1]
    if order == "jax first":
        import jax, numpy as np
        import agnosticopt as opt
        assert "agnosticopt.adapters.jax" in sys.modules  # registered at import
        leaf = opt.Leaf(opt.Adam(), (np.zeros(2, np.float32), np.float32(0.5)))
        count = 2
    else:
        import numpy as np
        import agnosticopt as opt
        assert "jax" not in sys.modules and "agnosticopt.adapters.jax" not in sys.modules
        import jax
        # the first Leaf a user can make of JAX arrays passes through adapter_for
        leaf = jax.eval_shape(lambda p: opt.setup(opt.Adam(), p), jax.numpy.zeros(2))
        count = 4  # m, v and the two beta_t
    leaves = jax.tree_util.tree_leaves(leaf)
    assert len(leaves) == count and not any(isinstance(v, opt.Leaf) for v in leaves), leaves
    print(order, "ok")
""")


@pytest.mark.parametrize("order", ["jax first", "agnosticopt first"])
def test_leaves_are_registered_whichever_is_imported_first(
    order: str, tmp_path: Any
) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", REGISTRATION, order],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=tmp_path,
    )  # not the repository root: the installed package
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"{order} ok"


def test_the_jax_docs_run_as_written() -> None:
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "jax.md"
    blocks = re.findall(
        r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL
    )
    assert blocks
    for block in blocks:
        exec(compile(block, str(page), "exec"), {"__name__": "docs"})  # noqa: S102
