"""Per-path rules (by_path): matching, ties, errors, and the tree operations on the result."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from _backends import BackendHelper, BackendKind

import agnosticopt as opt

NO_DECAY = opt.AdamW(1e-2, lambda_=0.0)
DECAY = opt.AdamW(1e-2, lambda_=0.1)
EMBED = opt.Adam(1e-1)


def _model(b: BackendHelper | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    conv = (lambda a: a) if b is None else b.asarray
    tied = conv(rng.standard_normal((4, 3)))
    return {
        "embed": {"weight": tied},
        "layers": [
            {
                "weight": conv(rng.standard_normal((3, 3))),
                "bias": conv(np.zeros(3)),
                "norm": {"scale": conv(np.ones(3))},
            }
        ],
        "head": {"weight": tied, "bias": conv(np.zeros(4))},
        "steps": 3,
    }


def _rules() -> opt.ByPath:
    return opt.by_path(
        {
            "*.bias": NO_DECAY,
            "*norm*": NO_DECAY,
            "embed.*": EMBED,
            "head.weight": EMBED,
            "*": DECAY,
        }
    )


def test_first_matching_pattern_wins() -> None:
    tree = opt.setup(_rules(), _model())
    assert tree["layers"][0]["bias"].rule is NO_DECAY
    assert tree["layers"][0]["norm"]["scale"].rule is NO_DECAY
    assert tree["layers"][0]["weight"].rule is DECAY
    assert tree["head"]["bias"].rule is NO_DECAY
    assert (
        tree["embed"]["weight"] is tree["head"]["weight"]
    )  # the tie is kept: one Leaf
    assert tree["embed"]["weight"].rule is EMBED
    assert tree["steps"] is None


def test_slash_patterns_and_functions() -> None:
    model = {"a": {"b": np.ones(2)}, "c": np.ones(3)}
    tree = opt.setup(opt.by_path({"a/*": EMBED}, default=DECAY), model)
    assert tree["a"]["b"].rule is EMBED
    assert tree["c"].rule is DECAY
    seen = []

    def choose(path: tuple[Any, ...], x: np.ndarray) -> Any:
        seen.append((path, x.shape))
        return NO_DECAY if x.ndim == 1 and x.size == 2 else None

    tree = opt.setup(opt.by_path(choose, default=DECAY), model)
    assert seen == [(("a", "b"), (2,)), (("c",), (3,))]
    assert tree["a"]["b"].rule is NO_DECAY
    assert tree["c"].rule is DECAY


def test_a_path_without_a_rule_raises_naming_it() -> None:
    with pytest.raises(
        ValueError, match=r"no pattern matches the array at \('layers', 0, 'weight'\)"
    ):
        opt.setup(
            opt.by_path(
                {
                    "*.bias": NO_DECAY,
                    "*norm*": NO_DECAY,
                    "*embed*": EMBED,
                    "head.*": EMBED,
                }
            ),
            _model(),
        )
    with pytest.raises(
        ValueError, match=r"gave no rule \(None\) for the array at \('c',\)"
    ):
        opt.setup(opt.by_path(lambda p, x: None), {"c": np.ones(2)})
    with pytest.raises(
        TypeError, match=r"must return a rule for the array at \('c',\)"
    ):
        opt.setup(opt.by_path(lambda p, x: "Adam"), {"c": np.ones(2)})


def test_a_tie_choosing_two_rules_raises_naming_both_paths() -> None:
    rules = opt.by_path({"embed.*": EMBED, "*": DECAY})
    with pytest.raises(
        ValueError,
        match=r"at \('head', 'weight'\) is tied to the one at "
        r"\('embed', 'weight'\)",
    ):
        opt.setup(rules, _model())
    shared = {
        "w": np.ones(2)
    }  # a shared container: its arrays are checked at both places
    with pytest.raises(
        ValueError, match=r"\('b', 'w'\) is tied to the one at \('a', 'w'\)"
    ):
        opt.setup(opt.by_path({"a.*": EMBED, "b.*": DECAY}), {"a": shared, "b": shared})
    tree = opt.setup(
        opt.by_path({"a.*": EMBED, "b.*": opt.Adam(1e-1)}), {"a": shared, "b": shared}
    )
    assert tree["a"]["w"] is tree["b"]["w"]  # equal rules agree


@pytest.mark.parametrize(
    ("rules", "error", "words"),
    [
        ({"*": "Adam"}, TypeError, "value of pattern '\\*' must be a rule"),
        ({1: DECAY}, TypeError, "patterns must be strings"),
        (42, TypeError, "expects a mapping of glob patterns"),
    ],
)
def test_bad_by_path_arguments_raise(rules: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        opt.by_path(rules)


def test_unused_pattern_warns() -> None:
    with pytest.warns(
        UserWarning, match=r"patterns \['\*\.bais'\] matched no trainable array"
    ):
        opt.setup(
            opt.by_path({"*.bais": NO_DECAY, "*": DECAY}), {"b": {"bias": np.ones(2)}}
        )


def test_a_by_path_is_not_a_rule_in_a_chain() -> None:
    with pytest.raises(TypeError, match="OptimiserChain expects rules"):
        opt.OptimiserChain(_rules())


def _run(b: BackendHelper, tree: Any, model: Any, steps: int) -> Any:
    rng = np.random.default_rng(5)
    for _ in range(steps):
        grads = dict.fromkeys(model)
        grads["layers"] = [
            {
                "weight": b.asarray(rng.standard_normal((3, 3))),
                "bias": b.asarray(rng.standard_normal(3)),
                "norm": {"scale": b.asarray(rng.standard_normal(3))},
            }
        ]
        grads["embed"] = {"weight": b.asarray(rng.standard_normal((4, 3)))}
        grads["head"] = {
            "weight": b.asarray(rng.standard_normal((4, 3))),
            "bias": b.asarray(rng.standard_normal(4)),
        }
        tree, model = opt.update_(tree, model, grads)
    return tree, model


def test_per_path_equals_separate_setups(backend: BackendHelper) -> None:
    """Each array moves as with its own rule alone; the tie sums its two gradients."""
    _tree, model = _run(
        backend, opt.setup(_rules(), _model(backend)), _model(backend), 3
    )
    assert model["embed"]["weight"] is model["head"]["weight"] or not backend.writeable
    for path, rule in (
        (("layers", 0, "weight"), DECAY),
        (("layers", 0, "bias"), NO_DECAY),
        (("head", "bias"), NO_DECAY),
        (("embed", "weight"), EMBED),
    ):
        _, ref_model = _run(
            backend, opt.setup(rule, _model(backend)), _model(backend), 3
        )
        got, want = model, ref_model
        for key in path:
            got, want = got[key], want[key]
        assert np.array_equal(
            backend.to_numpy(got).view(np.uint64),
            backend.to_numpy(want).view(np.uint64),
        )


def test_freeze_adjust_and_pickle_work_on_the_result() -> None:
    model = _model()
    tree = opt.setup(_rules(), model)
    opt.freeze_(tree["layers"])
    opt.adjust_(tree["head"], lambda_=0.5)
    assert tree["head"]["bias"].rule.lambda_ == 0.5
    assert tree["embed"]["weight"].rule is EMBED  # Adam has no lambda_: unchanged
    before = model["layers"][0]["weight"].copy()
    tree, model = _run(BackendHelper(BackendKind.NUMPY), tree, model, 1)
    assert np.array_equal(model["layers"][0]["weight"], before)
    again = pickle.loads(pickle.dumps(tree))
    assert again["layers"][0]["bias"].rule == NO_DECAY
    assert again["layers"][0]["bias"].frozen


def test_checkpoints_keep_each_paths_rule() -> None:
    model = _model()
    tree = opt.setup(_rules(), model)
    tree, model = _run(BackendHelper(BackendKind.NUMPY), tree, model, 2)
    sd = opt.state_dict(tree)
    fresh = opt.setup(_rules(), model)  # a tree made the same way, loaded in place
    opt.load_state_dict(fresh, sd)
    assert fresh["layers"][0]["bias"].rule == NO_DECAY
    assert fresh["embed"]["weight"] is fresh["head"]["weight"]
    assert np.array_equal(
        fresh["layers"][0]["weight"].state.m, tree["layers"][0]["weight"].state.m
    )
    other = opt.setup(opt.by_path({"*": DECAY}), model)
    with pytest.raises(
        ValueError, match=r"embed\.weight/rule"
    ):  # another rule class: refused
        opt.load_state_dict(other, sd)
