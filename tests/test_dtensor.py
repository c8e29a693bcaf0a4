"""DTensor parameters (FSDP2 / distribute_tensor): the same bits as one process.

Each test starts ``tests/dtensor_ranks.py`` on gloo ranks over 127.0.0.1 (a free
port, a timeout on every process) and compares what rank 0 saved with the same
steps on plain tensors in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dtensor_ranks

import agnosticopt as opt

WORKER = Path(__file__).parent / "dtensor_ranks.py"
DCP = Path(__file__).parent / "dtensor_dcp.py"
CONFORMANCE = Path(__file__).parent / "dtensor_conformance.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: Path, world: int, *args: str, timeout: float = 180) -> None:
    """Run ``script WORLD RANK PORT *args`` on ``world`` ranks; every process is ended."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(world), str(r), str(port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]


def run_ranks(world: int, tmp_path: Path) -> dict[str, np.ndarray]:
    """The checks of ``dtensor_ranks.py`` on ``world`` ranks: rank 0's results."""
    out = tmp_path / f"ranks{world}.npz"
    launch(WORKER, world, str(out))
    with np.load(out) as found:
        return dict(found)


def single_process() -> dict[str, np.ndarray]:
    """The same cases on plain tensors in one process."""
    results = {}
    every = {**dtensor_ranks.cases(), **dtensor_ranks.throwing_cases()}
    for name, (rule, dtype) in every.items():
        model, grads = dtensor_ranks.data(dtype)
        tree = opt.setup(rule, model)
        for step in grads:
            tree, model = opt.update_(tree, model, step)
        for k, v in model.items():
            results[f"{name}/{k}"] = v.numpy()
    model, grads = dtensor_ranks.data("float64")
    _, new = opt.update(opt.setup(opt.Adam(), model), model, grads[0])
    results["update/w"] = new["w"].numpy()
    return results


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return single_process()


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_steps_identical_to_one_process(
    world: int, tmp_path: Path, reference: dict[str, np.ndarray]
) -> None:
    found = run_ranks(world, tmp_path)
    assert found["w_size"] > 100_000
    for key, want in reference.items():
        assert same_bits(found[key], want), key
    # rank 1's "w" gradient not contiguous (its leaf on the plain path there), the
    # fast path off on rank 1, no ClipNorm gradient scaled ahead on rank 0: the same
    # bits, the same collectives
    for variant in dtensor_ranks.VARIANTS:
        for name in dtensor_ranks.MIXED:
            for k, _ in dtensor_ranks.SHAPES:
                want = reference[f"{name}/{k}"]
                assert same_bits(found[f"{variant}{name}/{k}"], want), (variant, name)
    # per step, (all_gather, all_gather_into_tensor, all_reduce, broadcast): the
    # ClipNorm leaves of a tree (three here) share ONE all-gather of tree nodes,
    # as the global clip does, on the fast path as on the plain path; ClipNorm +
    # ClipGlobalNorm + ClipNorm(inf): three stages, one all-gather each;
    # elementwise rules: none
    steps = dtensor_ranks.STEPS
    one_gather = [[1, 0, 0, 0]] * steps
    clip_first = [
        *("clipnorm64", "clipnorm1", "global32", "globalinf", "pathsclip"),
        *("clipw32", "clipw64e", "globalw64", "globalalone32", "globalthrow32"),
        *("wdclip32", "momclip64", "signglobal64"),  # a clip in the middle
    ]
    runs = [("", name) for name in clip_first] + [
        (v, n) for v in dtensor_ranks.VARIANTS for n in dtensor_ranks.MIXED
    ]
    for v, name in runs:
        assert found[f"{v}collectives/{name}"].tolist() == one_gather, (v, name)
    assert found["collectives/globalclipnorm"].tolist() == [[3, 0, 0, 0]] * steps
    assert found["collectives/adam64"].tolist() == [[0, 0, 0, 0]] * steps
    # chains of one norm clip, first or in the middle, take the fast path: every
    # leaf (3) at every step, on rank 0 (whose gradients are contiguous in the mixed
    # runs too); a chain of three clips does not
    for v, name in [*runs, ("", "adam64")]:
        assert found[f"{v}fast/{name}"] == 3 * steps, (v, name)
    assert found["fast/globalclipnorm"] == 0
    # throw=True and an infinite gradient element on rank 1: both ranks raise the
    # plain path's error after the one exchange, and change nothing (the steps
    # that follow are the reference's)
    for name, text in dtensor_ranks.THROWS.items():
        assert text in str(found[f"refused/{name}"]), name
        assert found[f"refused/collectives/{name}"].tolist() == [1, 0, 0, 0], name
    assert found["update/state_is_dtensor"]
    messages = list(found["messages"])
    assert any(
        "('w',) is a DTensor but its gradient is a Tensor" in m for m in messages
    )
    views = [m for m in messages if "('w',) is DTensor.to_local(), a view" in m]
    assert len(views) == 2, messages  # setup and update_ on p.to_local() raise
    assert any(
        "the gradient at ('w',) is a torch-dtensor array, but the parameter is a "
        "torch array" in m
        for m in messages
    )
    assert any(
        "a 2.0-norm of a DTensor with placements (Shard(dim=1),)" in m for m in messages
    )
    assert any(
        "ClipGlobalNorm: the gradient at ('w',) is a torch-dtensor array and the one "
        "at ('b',) a torch array" in m
        for m in messages
    )  # a global norm: all or none
    assert len(messages) == 6, messages


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as found:
        return dict(found)


@pytest.mark.slow  # two gloo ranks started twice (~20 s)
def test_checkpoint_across_rank_counts(tmp_path: Path) -> None:
    """FSDP2 + TorchOptimizer (get/set_optimizer_state_dict) and a functional tree
    (opt.state_dict) saved with dcp on 2 ranks resume in 1 process, and back: the
    third step is the same bits as the run that did not stop."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    launch(DCP, 2, str(two), "save")
    launch(DCP, 1, str(two), "load")
    launch(DCP, 1, str(one), "save")
    launch(DCP, 2, str(one), "load")
    ran2, ran1 = _load(two / "save2.npz"), _load(one / "save1.npz")
    resumed1, resumed2 = _load(two / "load1.npz"), _load(one / "load2.npz")
    keys = [k for k in ran2 if k.startswith(("model/", "tree/"))]
    assert len(keys) == 8
    for key in keys:
        assert same_bits(ran2[key], ran1[key]), key  # FSDP2 on 2 ranks = one process
        assert same_bits(resumed1[key], ran2[key]), key  # saved on 2, resumed on 1
        assert same_bits(resumed2[key], ran1[key]), key  # saved on 1, resumed on 2
    refused = str(ran2["refused"])  # dcp.save of a tree of Leaves: refused, not corrupt
    assert "cannot be pickled" in refused
    assert "opt.state_dict(tree)" in refused


def _conformance(tmp_path: Path, steps: int, names: list[str]) -> dict[str, np.ndarray]:
    out = tmp_path / "conformance.npz"
    launch(CONFORMANCE, 2, str(out), str(steps), *names, timeout=900)
    return _load(out)


@pytest.mark.slow  # a subset of the next test's cases, on two gloo ranks
def test_conformance_on_two_ranks_norm_clips(tmp_path: Path) -> None:
    """The conformance suite's trajectory and update/update_ checks on DTensor
    (Shard(0), uneven shards of 131,089 elements) for the cases with reductions."""
    names = [
        "ClipNorm",
        "ClipNorm(inf)+Momentum",
        "WeightDecay+ClipGlobalNorm+Adam",
        "SkipNonFinite(ClipGlobalNorm(1)+AdamW)",
    ]
    found = _conformance(tmp_path, 3, names)
    assert len(found["ran"]) == len(names) * 2 * 2
    assert list(found["failures"]) == []
    # a norm clip first or in the middle of a chain: the fast path (the SkipNonFinite
    # wrapper holding a global clip takes the plain path)
    assert list(found["fast"]) == names[:3]


@pytest.mark.slow
def test_conformance_on_two_ranks_every_case(tmp_path: Path) -> None:
    found = _conformance(tmp_path, 20, [])
    from agnosticopt import conformance

    assert len(found["ran"]) == len(conformance.CASES) * 2 * 2
    assert list(found["failures"]) == []
