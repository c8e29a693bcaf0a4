"""Portable checkpoints: state_dict / load_state_dict, save / load, convert.

Identity checks compare bits (``view`` as unsigned integers) on arrays of more
than 100k elements; the cross-backend resume in a fresh process is in
``test_resume_in_a_fresh_process``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _backends import BackendHelper
from agnosticopt.conformance._cases import TABLE

import agnosticopt as opt
from agnosticopt._checkpoint import (
    CheckpointError,
    describe_rule,
    leaf_entries,
    leaf_from_entries,
    rule_from_description,
)

safetensors = pytest.importorskip(
    "safetensors", reason="the checkpoint extra is not installed"
)

BIG = (300, 400)  # 120_000 elements


def _bits(a: Any) -> bytes:
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8).tobytes() + str(a.dtype).encode() + str(a.shape).encode()


def _host(a: Any) -> Any:
    """Any backend's array as numpy (bfloat16 through ml_dtypes)."""
    xp = opt.adapter_for(a)
    return a if xp is None else xp.to_numpy(a)


def _state_bits(tree: Any) -> dict[str, Any]:
    """Every state entry of a tree: arrays as bits, scalars with their type."""
    out = {}
    for key, value in opt.state_dict(tree).items():
        if opt.adapter_for(value) is not None:
            out[key] = _bits(_host(value))
        else:
            out[key] = value
    return out


def _raw_scalars(tree: Any) -> dict[str, Any]:
    """The host scalars of a tree in their own numpy types (dtype and bits)."""
    out = {}
    for key, (_, leaf) in (
        __import__("agnosticopt._checkpoint", fromlist=["x"])
        ._keyed_leaves(tree)
        .items()
    ):
        for name, value in leaf_entries(leaf, raw=True).items():
            if isinstance(value, np.generic):
                out[f"{key}/{name}"] = (
                    type(value).__name__,
                    np.asarray(value).tobytes(),
                )
    return out


def _model(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "dense": {
            "w": rng.standard_normal(BIG).astype(np.float32),
            "b": rng.standard_normal(400).astype(np.float32),
        },
        "layers": [rng.standard_normal(1000), np.arange(3)],
        "z": (rng.standard_normal(500) + 1j * rng.standard_normal(500)).astype(
            np.complex64
        ),
    }


def _grads(rng: np.random.Generator, model: dict[str, Any]) -> dict[str, Any]:
    def like(a: Any) -> Any:
        g = rng.standard_normal(a.shape).astype(a.dtype)
        if np.iscomplexobj(a):
            g = g + 1j * rng.standard_normal(a.shape).astype(g.real.dtype)
        return g.astype(a.dtype)

    return {
        "dense": {"w": like(model["dense"]["w"]), "b": like(model["dense"]["b"])},
        "layers": [like(model["layers"][0]), None],
        "z": like(model["z"]),
    }


RULE = opt.OptimiserChain(opt.ClipNorm(100.0), opt.AccumGrad(2), opt.Adam(1e-3))


def _trained(steps: int = 3, rule: Any = RULE) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    model = _model(rng)
    tree = opt.setup(rule, model)
    for _ in range(steps):
        tree, model = opt.update(tree, model, _grads(rng, model))
    return tree, model


def _on(backend: BackendHelper, model: Any) -> Any:
    return {
        "dense": {k: backend.asarray(v) for k, v in model["dense"].items()},
        "layers": [backend.asarray(model["layers"][0]), model["layers"][1]],
        "z": backend.asarray(model["z"]),
    }


# -- the flat mapping ----------------------------------------------------------------


def test_state_dict_is_flat_key_path_strings_to_arrays_and_numbers() -> None:
    tree, _ = _trained()
    sd = opt.state_dict(tree)
    assert sorted(k for k in sd if k.startswith("dense.w/")) == [
        "dense.w/frozen",
        "dense.w/rule",
        "dense.w/state.1.acc",
        "dense.w/state.1.counter",
        "dense.w/state.2.beta_t.0",
        "dense.w/state.2.beta_t.1",
        "dense.w/state.2.m",
        "dense.w/state.2.v",
    ]
    leaf = tree["dense"]["w"]
    assert sd["dense.w/state.2.m"] is leaf.state[2].m  # the state's own arrays
    bt1 = sd["dense.w/state.2.beta_t.0"]
    assert type(bt1) is float
    assert bt1 == float(leaf.state[2].beta_t[0])
    assert sd["dense.w/state.1.counter"] == 2
    assert type(sd["dense.w/state.1.counter"]) is int
    assert sd["dense.w/frozen"] is False
    assert (
        json.loads(json.dumps(sd["dense.w/rule"], allow_nan=False))
        == sd["dense.w/rule"]
    )
    assert not any(k.startswith("layers.1") for k in sd)  # an integer array: no Leaf


def test_state_dict_refuses_keys_that_are_not_strings_or_ints_and_colliding_paths() -> (
    None
):
    w = np.zeros(3)
    with pytest.raises(TypeError, match=r"key \(1, 2\) at \(\(1, 2\),\)"):
        opt.state_dict(opt.setup(opt.Descent(), {(1, 2): w}))
    with pytest.raises(ValueError, match=r"\('a', 'b'\) and \('a.b',\) have the same"):
        opt.state_dict(opt.setup(opt.Descent(), {"a": {"b": w}, "a.b": np.ones(2)}))


def test_tied_arrays_have_one_entry_set_and_stay_tied() -> None:
    w = np.ones(10, np.float32)
    model = {"a": w, "b": w}
    tree = opt.setup(opt.Momentum(), model)
    tree, model = opt.update(tree, model, {"a": np.ones(10, np.float32), "b": None})
    sd = opt.state_dict(tree)
    assert {k.split("/")[0] for k in sd} == {"a"}
    again = opt.load_state_dict((opt.Momentum(), model), sd)
    assert again["a"] is again["b"]
    assert _bits(again["a"].state) == _bits(tree["a"].state)


def test_round_trip_on_every_backend_is_bit_identical(backend: BackendHelper) -> None:
    tree, model = _trained()
    target = _on(backend, model)
    if backend.name == "array_api_strict":
        del target[
            "z"
        ]  # array-api-strict builds no complex from parts: no complex state
        tree = {k: v for k, v in tree.items() if k != "z"}
    again = opt.load_state_dict((RULE, target), opt.state_dict(tree))
    assert _state_bits(again) == _state_bits(tree)
    assert _raw_scalars(again) == _raw_scalars(tree)
    state = again["dense"]["w"].state
    assert (
        opt.adapter_for(state[2].m).name == opt.adapter_for(target["dense"]["w"]).name
    )
    assert state[2].m is not tree["dense"]["w"].state[2].m  # copies, never the source's


def test_load_state_dict_in_place_restores_rules_and_frozen_flags() -> None:
    tree, model = _trained()
    opt.adjust_(tree, 5e-4)
    opt.freeze_(tree["dense"]["b"])
    sd = opt.state_dict(tree)
    fresh = opt.setup(RULE, model)
    assert opt.load_state_dict(fresh, sd) is fresh
    assert fresh["dense"]["w"].rule.opts[2].eta == 5e-4
    assert fresh["dense"]["b"].frozen
    assert not fresh["dense"]["w"].frozen
    assert _state_bits(fresh) == _state_bits(tree)


def test_every_problem_is_named_and_the_target_is_untouched() -> None:
    tree, _ = _trained()
    target, _ = _trained(1)
    before = {
        k: (v if opt.adapter_for(v) is None else v.copy())
        for k, v in opt.state_dict(target).items()
    }
    objects = [leaf.state for leaf in (target["dense"]["w"], target["dense"]["b"])]
    sd = dict(opt.state_dict(tree))
    sd["dense.w/state.2.m"] = np.zeros((3, 3), np.float32)  # mis-shaped
    sd["dense.b/state.2.v"] = sd["dense.b/state.2.v"].astype(np.float64)  # mis-typed
    sd["dense.w/state.2.beta_t.0"] = 0.1  # not a float32 value
    sd["dense.b/state.1.counter"] = 1.5  # not an int
    del sd["layers.0/state.2.m"]  # missing
    sd["layers.0/state.2.extra"] = np.zeros(1)  # extra entry
    sd["nowhere/state"] = np.zeros(1)  # extra parameter
    sd["no separator"] = 1
    del sd["z/frozen"]
    sd["z/rule"] = describe_rule(
        opt.OptimiserChain(opt.ClipNorm(), opt.AccumGrad(2), opt.NAdam())
    )  # other classes
    with pytest.raises(CheckpointError) as info:
        opt.load_state_dict(target, sd)
    text = str(info.value)
    for expected in (
        "dense.w/state.2.m: mis-shaped, expected shape (300, 400), got (3, 3)",
        "dense.b/state.2.v: mis-typed, expected float32, got float64",
        "dense.w/state.2.beta_t.0: mis-typed, 0.1 is not a float32 value",
        "dense.b/state.1.counter: mis-typed, expected an integer",
        "layers.0/state.2.m: missing",
        "layers.0/state.2.extra: extra entry",
        "nowhere/state: extra entry, the target has no parameter 'nowhere'",
        "'no separator': extra entry",
        "z/rule: the entries are for OptimiserChain(ClipNorm",
    ):
        assert expected in text
    assert len(info.value.problems) == 9  # z/frozen absent: the target's flag is kept
    assert [
        leaf.state for leaf in (target["dense"]["w"], target["dense"]["b"])
    ] == objects
    after = opt.state_dict(target)
    for key, value in before.items():
        if opt.adapter_for(value) is None:
            assert after[key] == value
        else:
            assert _bits(after[key]) == _bits(value)


def test_a_state_for_another_model_is_refused_by_name() -> None:
    tree, _ = _trained()
    other = {
        "dense": {
            "w": np.zeros((400, 300), np.float32),
            "b": np.zeros(400, np.float32),
        },
        "layers": [np.zeros(1000)],
    }
    with pytest.raises(CheckpointError) as info:
        opt.load_state_dict((RULE, other), opt.state_dict(tree))
    text = str(info.value)
    assert (
        "dense.w/state.2.m: mis-shaped, expected shape (400, 300), got (300, 400)"
        in text
    )
    assert "z/state.1.acc: extra entry, the target has no parameter 'z'" in text


def test_scalar_entries_accept_numbers_that_fit_the_dtype_exactly() -> None:
    rule = opt.Adam()
    template = opt.setup(rule, np.zeros(4, np.float16))
    entries = leaf_entries(template)
    entries["state.beta_t.0"] = float(np.float16(0.5))
    leaf = leaf_from_entries(template, entries, "")
    assert type(leaf.state.beta_t[0]) is np.float16
    assert leaf.state.beta_t[0] == 0.5
    entries["state.beta_t.0"] = 0.9  # float16(0.9) != 0.9
    with pytest.raises(CheckpointError, match=r"0\.9 is not a float16 value"):
        leaf_from_entries(template, entries, "")
    entries["state.beta_t.0"] = np.float32(0.5)  # typed: the dtype must match
    with pytest.raises(
        CheckpointError, match="expected a float16 scalar, got a numpy float32"
    ):
        leaf_from_entries(template, entries, "")


# -- rule descriptions -----------------------------------------------------------------

RULES = [
    opt.Descent(0.5),
    opt.Momentum(0.1, 0.8),
    opt.Nesterov(0.1, 0.7),
    opt.Rprop(0.2, (0.4, 1.3), (1e-7, 40.0)),
    opt.RMSProp(0.01, 0.8, 1e-7, centred=True),
    opt.Adam(0.1, (0.8, 0.9), 1e-6),
    opt.RAdam(),
    opt.AdaMax(),
    opt.OAdam(),
    opt.AdaGrad(),
    opt.AdaDelta(),
    opt.AMSGrad(),
    opt.NAdam(),
    opt.AdamW(0.1, (0.8, 0.9), 0.3),
    opt.AdaBelief(),
    opt.Lion(),
    opt.WeightDecay(0.1),
    opt.SignDecay(0.2),
    opt.ClipGrad(3.0),
    opt.ClipNorm(2.0, math.inf, throw=False),
    opt.ClipNorm(1.0, -math.inf),
    opt.OptimiserChain(opt.AccumGrad(3), opt.ClipGrad(1.0), opt.Adam()),
    opt.OptimiserChain(),
    opt.MixedPrecision("float64", opt.OptimiserChain(opt.Lion())),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_rule_descriptions_are_strict_json_and_parse_back(rule: Any) -> None:
    desc = describe_rule(rule)
    text = json.dumps(desc, allow_nan=False)
    again = rule_from_description(json.loads(text))
    assert again == rule
    assert type(again) is type(rule)


@pytest.mark.parametrize("case", [row.case for row in TABLE], ids=str)
def test_every_shared_case_describes_and_parses_back(case: Any) -> None:
    """Every rule case of the shared table (agnosticopt.conformance._cases.TABLE)."""
    again = rule_from_description(
        json.loads(json.dumps(describe_rule(case.rule), allow_nan=False))
    )
    assert again == case.rule
    assert repr(again) == repr(case.rule)


def test_rule_descriptions_build_only_public_rule_classes() -> None:
    with pytest.raises(
        ValueError, match="'os:system' is not one of agnosticopt's rule"
    ):
        rule_from_description({"class": "os:system", "fields": {"command": "true"}})
    with pytest.raises(ValueError, match="Adam has fields"):
        rule_from_description({"class": "Adam", "fields": {"eta": 0.1, "__class__": 1}})
    with pytest.raises(ValueError, match="does not make a valid Adam"):
        rule_from_description(
            {
                "class": "Adam",
                "fields": {"eta": -1.0, "beta": [0.9, 0.9], "epsilon": 0.0},
            }
        )
    with pytest.raises(ValueError, match="a rule description is a dict with 'class'"):
        rule_from_description({"class": "Descent", "fields": {"eta": {"x": 1}}})
    deep: dict[str, Any] = {"class": "Descent", "fields": {"eta": 0.1}}
    for _ in range(sys.getrecursionlimit()):
        deep = {"class": "OptimiserChain", "fields": {"opts": [deep]}}
    with pytest.raises(ValueError, match="nested too deeply"):
        rule_from_description(deep)


def test_a_rule_of_another_class_is_restored_into_a_target_with_the_same_rule() -> None:
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Halve(opt.Rule):
        eta: float = 0.5

        def init(self, x: Any, xp: Any) -> Any:
            return xp.zeros_like(x)

        def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
            return xp.add(state, dx), xp.multiply(dx, 0.5)

    model = {"w": np.ones(5)}
    tree = opt.setup(Halve(), model)
    tree, model = opt.update(tree, model, {"w": np.ones(5)})
    sd = opt.state_dict(tree)
    again = opt.load_state_dict((Halve(), model), sd)
    assert _bits(again["w"].state) == _bits(tree["w"].state)
    with pytest.raises(
        CheckpointError, match="is not one of agnosticopt's rule classes"
    ):
        opt.load_state_dict((Halve(0.25), model), sd)


# -- files -------------------------------------------------------------------------------


def test_save_then_load_on_torch_is_bit_identical(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tree, model = _trained()
    path = tmp_path / "state.safetensors"
    opt.save(path, tree)
    target = {
        "dense": {k: torch.tensor(v) for k, v in model["dense"].items()},
        "layers": [torch.tensor(model["layers"][0]), torch.arange(3)],
        "z": torch.tensor(model["z"]),
    }
    again = opt.load(path, like=target)
    assert isinstance(again["dense"]["w"].state[2].m, torch.Tensor)
    assert _state_bits(again) == _state_bits(tree)
    assert _raw_scalars(again) == _raw_scalars(tree)


def test_files_keep_narrow_host_scalars_bit_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("ml_dtypes", reason="bfloat16 on the host needs ml_dtypes")
    rng = np.random.default_rng(1)
    w16 = torch.tensor(rng.standard_normal(BIG).astype(np.float32)).to(torch.bfloat16)
    h16 = torch.tensor(rng.standard_normal(2000).astype(np.float16))
    model = {"bf": w16, "mp": w16.clone(), "h": h16}
    # bfloat16(0.999) is 1, which Adam refuses in bfloat16: a beta2 that stays below 1
    tree = {
        "bf": opt.setup(opt.Adam(beta=(0.9, 0.99)), w16),
        "mp": opt.setup(opt.MixedPrecision(opt.Adam()), model["mp"]),
        "h": opt.setup(opt.RAdam(), h16),
    }
    for _ in range(3):
        grads = {
            k: torch.tensor(rng.standard_normal(tuple(v.shape)).astype(np.float32)).to(
                v.dtype
            )
            for k, v in model.items()
        }
        tree, model = opt.update(tree, model, grads)
    path = tmp_path / "narrow.safetensors"
    opt.save(path, tree)
    header = json.loads(
        path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]
    )
    assert header["bf/state.beta_t.0"]["dtype"] == "BF16"
    assert header["bf/state.m"]["dtype"] == "BF16"
    assert header["h/state.beta_t.1"]["dtype"] == "F16"
    assert header["h/state.beta_t.1"]["shape"] == []
    again = opt.load(path, like={k: v.clone() for k, v in model.items()})
    assert _state_bits(again) == _state_bits(tree)
    assert _raw_scalars(again) == _raw_scalars(tree)
    assert type(again["bf"].state.beta_t[0]).__name__ == "bfloat16"
    assert again["h"].state.t == tree["h"].state.t == 4


def test_files_are_plain_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    tree, _ = _trained()
    path = tmp_path / "state.safetensors"
    opt.save(path, tree)
    tensors = load_file(str(path))
    assert _bits(tensors["dense.w/state.2.m"]) == _bits(tree["dense"]["w"].state[2].m)
    z = tree["z"].state[2].m
    assert tensors["z/state.2.m"].shape == (500, 2)
    assert _bits(tensors["z/state.2.m"]) == _bits(z.view(np.float32).reshape(500, 2))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["agnosticopt"])
    assert meta["format"] == "agnosticopt.state"
    assert meta["leaves"]["z"]["complex"]
    assert meta["leaves"]["dense.w"]["values"] == {"state.1.counter": 2}
    assert meta["leaves"]["layers.0"]["path"] == ["layers", 0]
    sd = opt.load(path)
    assert (
        sd["dense.w/state.2.beta_t.0"]
        == opt.state_dict(tree)["dense.w/state.2.beta_t.0"]
    )
    assert b"pickle" not in path.read_bytes()
    assert b"\x80\x04" not in path.read_bytes()[:16]


def _corruptions(blob: bytes) -> dict[str, bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + size]
    data = blob[8 + size :]

    def with_header(text: bytes) -> bytes:
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data

    meta = json.loads(header)
    wrong_dtype = dict(meta)
    wrong_dtype["dense.w/state.2.m"] = dict(meta["dense.w/state.2.m"], dtype="I32")
    wrong_size = dict(meta)
    wrong_size["dense.w/state.2.m"] = dict(meta["dense.w/state.2.m"], dtype="F64")
    offsets = dict(meta)
    start, end = meta["dense.w/state.2.m"]["data_offsets"]
    offsets["dense.w/state.2.m"] = dict(
        meta["dense.w/state.2.m"], data_offsets=[start + 4, end + 4]
    )
    inner = json.loads(meta["__metadata__"]["agnosticopt"])
    bad_meta = dict(meta, __metadata__={"agnosticopt": "{not json"})
    no_meta = {k: v for k, v in meta.items() if k != "__metadata__"}
    inner_rule = dict(inner, rules=[{"class": "builtins:eval", "fields": {"x": "1"}}])
    inner_index = json.loads(json.dumps(inner))
    inner_index["leaves"]["dense.w"]["rule"] = 99
    return {
        "empty": b"",
        "truncated header": blob[: 8 + size // 2],
        "truncated data": blob[:-100],
        "huge header length": struct.pack("<Q", 2**63) + blob[8:],
        "header length past the end": struct.pack("<Q", len(blob)) + blob[8:],
        "bad JSON": with_header(header[:-20] + b"}}}"),
        "wrong dtype": with_header(json.dumps(wrong_dtype).encode()),
        "wrong size": with_header(json.dumps(wrong_size).encode()),
        "wrong offsets": with_header(json.dumps(offsets).encode()),
        "bad metadata JSON": with_header(json.dumps(bad_meta).encode()),
        "no metadata": with_header(json.dumps(no_meta).encode()),
        "hostile rule": with_header(
            json.dumps(
                dict(meta, __metadata__={"agnosticopt": json.dumps(inner_rule)})
            ).encode()
        ),
        "bad rule index": with_header(
            json.dumps(
                dict(meta, __metadata__={"agnosticopt": json.dumps(inner_index)})
            ).encode()
        ),
    }


def test_broken_or_hostile_files_give_a_clear_error_and_touch_nothing(
    tmp_path: Path,
) -> None:
    tree, model = _trained()
    path = tmp_path / "good.safetensors"
    opt.save(path, tree)
    target, _ = _trained(1)
    before = _state_bits(target)
    for name, blob in _corruptions(path.read_bytes()).items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(
            CheckpointError, match=r"load: .* (is not a valid|does not fit)"
        ) as info:
            opt.load(bad, like=target)
        assert info.value.problems, name
        with pytest.raises(CheckpointError):
            opt.load(bad, like=model)
    assert _state_bits(target) == before


def test_a_file_for_another_model_names_the_entries(tmp_path: Path) -> None:
    tree, _ = _trained()
    path = tmp_path / "state.safetensors"
    opt.save(path, tree)
    other = {"dense": {"w": np.zeros(BIG, np.float64), "b": np.zeros(400, np.float32)}}
    with pytest.raises(CheckpointError) as info:
        opt.load(path, like=other)
    text = str(info.value)
    assert "dense.w/state.2.m: mis-typed, expected float64, got float32" in text
    assert (
        "layers.0/state.1.acc: extra entry, the target has no parameter 'layers.0'"
        in text
    )


def test_save_writes_nothing_on_error_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(TypeError, match="checkpoints need string or integer keys"):
        opt.save(path, opt.setup(opt.Adam(), {(1,): np.zeros(2)}))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.safetensors"]


# -- across backends in memory --------------------------------------------------------------


def test_convert_moves_a_tree_to_torch_and_back_bit_for_bit() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tree, model = _trained()
    target = {
        "dense": {k: torch.tensor(v) for k, v in model["dense"].items()},
        "layers": [torch.tensor(model["layers"][0]), torch.arange(3)],
        "z": torch.tensor(model["z"]),
    }
    moved = opt.convert(tree, like=target)
    assert isinstance(moved["layers"][0].state[2].v, torch.Tensor)
    assert moved["layers"][1] is None
    assert moved["dense"]["w"].rule is tree["dense"]["w"].rule
    back = opt.convert(moved, like=opt.setup(RULE, model))  # like a tree
    assert _state_bits(moved) == _state_bits(tree) == _state_bits(back)
    assert _raw_scalars(back) == _raw_scalars(tree)
    with pytest.raises(CheckpointError, match="expected float64, got float32"):
        opt.convert(
            tree,
            like={
                **model,
                "dense": {k: v.astype(np.float64) for k, v in model["dense"].items()},
            },
        )


def test_a_numpy_state_with_torch_parameters_points_to_convert() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tree = opt.setup(opt.Adam(), {"w": np.zeros(3, np.float32)})
    model = {"w": torch.zeros(3)}
    try:
        opt.update(tree, model, {"w": torch.ones(3)})
    except (TypeError, ValueError) as exc:
        message = str(exc)
    else:
        pytest.fail("a numpy state with torch parameters was accepted")
    if "opt.convert" not in message:
        pytest.xfail(
            f"the state check of issue 9 (branch i9-core) is not merged: {message}"
        )
    assert "('w',)" in message
    assert "opt.load" in message
    moved = opt.convert(tree, like=model)
    opt.update(moved, model, {"w": torch.ones(3)})


# -- resume in a fresh process -------------------------------------------------------------------

RESUME = """
import sys
import numpy as np
from _resume_case import resume
backend, path, out = sys.argv[1:4]
np.savez(out, **resume(backend, path))
"""


@pytest.fixture(scope="module")
def saved_at_k(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Train K steps on numpy and save (state and parameters); then the bits at N."""
    import _resume_case as rc
    from safetensors.numpy import save_file

    rules, model = rc.case()
    tree = {k: opt.setup(rules[k], v) for k, v in model.items()}
    for i in range(rc.K):
        tree, model = opt.update_(tree, model, rc.grads_at(i))
    path = tmp_path_factory.mktemp("resume") / "k.safetensors"
    opt.save(path, tree)
    save_file(model, str(path) + ".params")  # parameters are the user's to save
    assert tree["acc"].state[0].counter != 1  # AccumGrad mid-cycle at the save
    for i in range(rc.K, rc.N):
        tree, model = opt.update_(tree, model, rc.grads_at(i))
    expected = rc.bits(tree, model)
    assert sum(v.size for v in expected.values()) > 100_000
    assert not [
        k for k, v in expected.items() if rc.has_subnormals(v)
    ]  # JAX would flush them
    return path, expected


def _compare(
    backend: str, where: str, got: dict[str, Any], expected: dict[str, Any]
) -> None:
    import _resume_case as rc

    assert sorted(got) == sorted(expected)
    same = sorted(k for k in expected if _bits(got[k]) == _bits(expected[k]))
    differ = sorted(set(expected) - set(same))
    line = (
        f"resume on {backend} ({where}) after {rc.K} numpy steps, {rc.N - rc.K} more: "
        f"{len(same)}/{len(expected)} arrays bit-identical "
        f"({sum(v.size for v in expected.values())} values); differ: {differ}"
    )
    print(line)
    assert not differ, line


@pytest.mark.parametrize(
    "backend",
    [
        "numpy",
        "torch",
        pytest.param("jax", marks=pytest.mark.slow),  # eager JAX: 16 s
    ],
)
def test_resume_on_another_backend(backend: str, saved_at_k: tuple[Path, Any]) -> None:
    """Trained on numpy and saved at step K, resumed on torch or JAX: the same bits."""
    import _resume_case as rc

    pytest.importorskip(backend, reason=f"{backend} is not installed")
    path, expected = saved_at_k
    _compare(backend, "this process", rc.resume(backend, str(path)), expected)


@pytest.mark.parametrize(
    "backend",
    [
        "numpy",
        "torch",
        pytest.param("jax", marks=pytest.mark.slow),
    ],
)
def test_resume_in_a_fresh_process(backend: str, saved_at_k: tuple[Path, Any]) -> None:
    """The same in a new process (nothing shared but the files); bounded in time."""
    pytest.importorskip(backend, reason=f"{backend} is not installed")
    path, expected = saved_at_k
    script = path.parent / "resume.py"
    script.write_text(RESUME)
    paths = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(paths),
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
    )
    out = path.parent / f"{backend}.npz"
    done = subprocess.run(
        [sys.executable, str(script), backend, str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=path.parent,
    )  # not the repository root: the installed package
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        got = dict(f)
    _compare(backend, "a fresh process", got, expected)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_checkpoint_docs_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="the examples move a state to torch")
    import re

    text = (DOCS / "checkpoints.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "docs"}
    for block in blocks:  # one namespace: the page is one session
        exec(compile(block, str(DOCS / "checkpoints.md"), "exec"), scope)  # noqa: S102
    assert (tmp_path / "optimiser.safetensors").exists()
