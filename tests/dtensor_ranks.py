"""One rank of the DTensor checks of ``tests/test_dtensor.py`` (run as a script).

``python tests/dtensor_ranks.py WORLD RANK PORT OUT``: joins a gloo process group
on 127.0.0.1, runs every case on DTensors laid out over ``WORLD`` ranks and, on
rank 0, saves the whole parameters after the steps to ``OUT`` (``.npz``), with
the error messages of the refusals. The parent compares them with one process.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _gloo import gloo_group
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import agnosticopt as opt

#: (name, shape) of the model's arrays: uneven rows (5 and 331 on 2 ranks), one
#: row (an empty shard on rank 1) and > 100k elements in the weight.
SHAPES = (("w", (331, 397)), ("b", (5, 3)), ("one", (1, 7)))
STEPS = 3


def cases() -> dict[str, Any]:
    """The rules of the cases, by name (also used by the single-process run)."""
    return {
        "adam64": (opt.Adam(), "float64"),
        "clipnorm64": (opt.OptimiserChain(opt.ClipNorm(0.5), opt.Adam()), "float64"),
        "clipnorm1": (
            opt.OptimiserChain(opt.ClipNorm(2.0, 1), opt.Momentum()),
            "float32",
        ),
        "global32": (
            opt.OptimiserChain(opt.ClipGlobalNorm(0.5), opt.AdamW()),
            "float32",
        ),
        "globalinf": (
            opt.OptimiserChain(opt.ClipGlobalNorm(0.01, float("inf")), opt.Adam()),
            "float64",
        ),
        "globalclipnorm": (
            opt.OptimiserChain(
                opt.ClipNorm(1.0),
                opt.ClipGlobalNorm(0.5),
                opt.ClipNorm(0.3, float("inf")),
                opt.Adam(),
            ),
            "float32",
        ),
        # norm clips on the fast path: the exchange, then compiled AdamW
        "clipw32": (opt.OptimiserChain(opt.ClipNorm(0.5), opt.AdamW()), "float32"),
        "clipw64e": (opt.OptimiserChain(opt.ClipNorm(0.5), opt.AdamW()), "float64"),
        "globalw64": (
            opt.OptimiserChain(opt.ClipGlobalNorm(0.5), opt.AdamW()),
            "float64",
        ),
        "globalalone32": (opt.ClipGlobalNorm(0.5), "float32"),
        # a norm clip in the middle of a chain: the head's gradient exchanged, then
        # the whole chain compiled (the head again, λ, the rest)
        "wdclip32": (
            opt.OptimiserChain(opt.WeightDecay(1e-2), opt.ClipNorm(1.0), opt.Adam()),
            "float32",
        ),
        "momclip64": (  # a head with a state: written by the kernels
            opt.OptimiserChain(opt.Momentum(0.1), opt.ClipNorm(0.5, 1), opt.Descent()),
            "float64",
        ),
        "signglobal64": (
            opt.OptimiserChain(
                opt.SignDecay(1e-3), opt.ClipGlobalNorm(0.5), opt.AdamW()
            ),
            "float64",
        ),
        # a rule per path: ClipNorms of other ω and p share the exchange ("one" is
        # Shard(0) here: an empty shard on rank 1)
        "pathsclip": (
            opt.by_path(
                {
                    "b": opt.OptimiserChain(opt.ClipNorm(2.0, 1), opt.Momentum()),
                    "*": opt.OptimiserChain(opt.ClipNorm(0.5), opt.Adam()),
                }
            ),
            "float64",
        ),
    }


#: Cases where "one" (a single row) is Shard(0): an empty shard on rank 1 (else
#: Replicate(), which rank 1 does not reduce).
EMPTY_SHARD = ("global", "paths", "clipw64e")
#: Cases run again with rank 1's gradient of "w" not contiguous (its leaf takes the
#: plain path there, the fast path on rank 0), with the fast path off on rank 1, and
#: with no ClipNorm gradient scaled ahead (``SCALE_AT_MOST`` 0 on rank 0: each of
#: its ClipNorm leaves a kernel group of its own λ, rank 1's shards scaled).
VARIANTS = ("noncontig/", "fastoff/", "unscaled/")
MIXED = ("clipw32", "clipnorm64", "global32", "globalw64", "wdclip32", "signglobal64")
#: Cases that first try a step with an infinite gradient element on rank 1 only
#: (ClipNorm and ClipGlobalNorm with throw=True): every rank raises, nothing changes.
THROWS = {
    "clipw32": "gradient has 2.0-norm inf",
    "globalthrow32": "the gradients have a global 2.0-norm of inf",
    "wdclip32": "gradient has 2.0-norm inf",  # the clip after WeightDecay
}


def throwing_cases() -> dict[str, Any]:
    """The throw=True cases that are not in :func:`cases` (their steps are checked too)."""
    return {
        "globalthrow32": (
            opt.OptimiserChain(opt.ClipGlobalNorm(0.5, throw=True), opt.AdamW()),
            "float32",
        )
    }


#: The collectives counted per step (``update_`` of one step of a case).
COUNTED = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast")


def count_collectives() -> dict[str, int]:
    """Wrap the collectives of ``torch.distributed`` with call counters (this process)."""
    counts = dict.fromkeys(COUNTED, 0)
    for name in COUNTED:
        setattr(dist, name, _counted(name, getattr(dist, name), counts))
    return counts


def _counted(name: str, fn: Any, counts: dict[str, int]) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return fn(*args, **kwargs)

    return counted


def data(dtype: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The model and the gradients of each step (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    t = getattr(torch, dtype)
    model = {k: torch.randn(s, generator=g, dtype=t) for k, s in SHAPES}
    grads = [
        {k: torch.randn(s, generator=g, dtype=t) for k, s in SHAPES}
        for _ in range(STEPS)
    ]
    return model, grads


def run_case(
    name: str,
    rule: Any,
    dtype: str,
    mesh: Any,
    counts: dict[str, int],
    results: dict[str, np.ndarray],
    variant: str = "",
) -> None:
    """The steps of one case on DTensors; results under ``variant + name``.

    ``variant`` ``"noncontig/"``: rank 1's local gradient of "w" is a transposed
    copy (not contiguous); ``"fastoff/"``: rank 1 has the fast path off;
    ``"unscaled/"``: rank 0 scales no ClipNorm gradient ahead.
    """
    from agnosticopt.adapters import _fast

    rank = dist.get_rank()
    model, grads = data(dtype)
    place = {"w": [Shard(0)], "b": [Shard(0)], "one": [Replicate()]}
    per_step = []
    if name.startswith(EMPTY_SHARD):
        place["one"] = [Shard(0)]
    sharded = {k: distribute_tensor(v, mesh, place[k]) for k, v in model.items()}
    tree = opt.setup(rule, sharded)
    if name in THROWS and not variant:
        _refused(name, tree, sharded, grads[0], mesh, place, counts, results)
    before = _fast.counters["fast"]
    previous = opt.set_fast_path(not (variant == "fastoff/" and rank == 1))
    scale_at_most = _fast.SCALE_AT_MOST
    if variant == "unscaled/" and rank == 0:
        _fast.SCALE_AT_MOST = 0
    try:
        for step in grads:
            dgrads = {k: distribute_tensor(v, mesh, place[k]) for k, v in step.items()}
            if variant == "noncontig/" and rank == 1:
                g = dgrads["w"]
                local = g._local_tensor.t().contiguous().t()
                assert not local.is_contiguous()
                dgrads["w"] = DTensor.from_local(
                    local, mesh, g.placements, shape=g.shape, stride=g.stride()
                )
                assert not dgrads["w"]._local_tensor.is_contiguous()
            seen = dict(counts)
            tree, sharded = opt.update_(tree, sharded, dgrads)
            per_step.append([counts[c] - seen[c] for c in COUNTED])
    finally:
        opt.set_fast_path(previous)
        _fast.SCALE_AT_MOST = scale_at_most
    fast = _fast.counters["fast"] - before
    if (
        variant in ("noncontig/", "fastoff/") and rank == 1
    ):  # its "w" leaf, or all, took the plain path
        assert fast == (2 if variant == "noncontig/" else 0) * STEPS, (name, fast)
    results[f"{variant}collectives/{name}"] = np.array(per_step)
    results[f"{variant}fast/{name}"] = np.array(fast)
    for k, v in sharded.items():
        assert isinstance(v, DTensor), (name, k, type(v))
        results[f"{variant}{name}/{k}"] = v.full_tensor().numpy()


def _refused(
    name: str,
    tree: Any,
    sharded: dict[str, Any],
    step: dict[str, torch.Tensor],
    mesh: Any,
    place: dict[str, Any],
    counts: dict[str, int],
    results: dict[str, np.ndarray],
) -> None:
    """A step whose gradient of "w" has an infinite element on rank 1 only: every
    rank raises the plain path's error, named by the key path, and nothing changes."""
    dgrads = {k: distribute_tensor(v, mesh, place[k]) for k, v in step.items()}
    if dist.get_rank() == 1:
        dgrads["w"]._local_tensor[-1, -1] = float("inf")
    kept = {k: v._local_tensor.clone() for k, v in sharded.items()}
    leaf = tree["w"]
    state = leaf.state
    seen = dict(counts)
    try:
        opt.update_(tree, sharded, dgrads)
    except FloatingPointError as exc:
        message = str(exc) + "".join(getattr(exc, "__notes__", []))
    else:
        raise AssertionError(f"{name}: update_ with an infinite gradient did not raise")
    assert THROWS[name] in message, message
    if name.startswith(("clip", "wdclip")):  # ClipNorm's error names the leaf
        assert "while updating the parameter at ('w',)" in message, message
    assert leaf.state is state
    for k, v in sharded.items():
        assert v._local_tensor.equal(kept[k]), (name, k)
    results[f"refused/{name}"] = np.array(message)
    results[f"refused/collectives/{name}"] = np.array(
        [counts[c] - seen[c] for c in COUNTED]
    )


def main(world: int, rank: int, port: int, out: str) -> None:
    with gloo_group(world, rank, port):
        mesh = init_device_mesh("cpu", (world,))
        results: dict[str, np.ndarray] = {}
        from agnosticopt.adapters import _fast

        before = _fast.counters["fast"]
        counts = count_collectives()
        every = {**cases(), **throwing_cases()}
        for name, (rule, dtype) in every.items():
            run_case(name, rule, dtype, mesh, counts, results)
        for variant in VARIANTS:
            for name in MIXED:
                rule, dtype = every[name]
                run_case(name, rule, dtype, mesh, counts, results, variant)
        results["fast_leaves"] = np.array(_fast.counters["fast"] - before)
        results["w_size"] = np.array(331 * 397)
        # update (not in place) returns DTensors
        model, grads = data("float64")
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in model.items()}
        tree = opt.setup(opt.Adam(), sharded)
        dgrads = {
            k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in grads[0].items()
        }
        tree2, new = opt.update(tree, sharded, dgrads)
        results["update/w"] = new["w"].full_tensor().numpy()
        results["update/state_is_dtensor"] = np.array(
            isinstance(tree2["w"].state[0], DTensor)
        )
        # refusals
        messages = []
        plain = dict(grads[0].items())
        try:
            opt.update_(tree, sharded, plain)
        except TypeError as exc:
            messages.append(str(exc))
        view = torch.nn.Parameter(sharded["w"]).to_local()  # the to_local() trap
        try:
            opt.setup(opt.Adam(), {"w": view})
        except TypeError as exc:
            messages.append(str(exc))
        try:
            opt.update_(tree, {**sharded, "w": view}, plain)
        except TypeError as exc:
            messages.append(str(exc))
        try:  # a plain parameter with a DTensor gradient
            opt.update_(opt.setup(opt.Adam(), model), model, dgrads)
        except TypeError as exc:
            messages.append(str(exc))
        cols = {"w": distribute_tensor(model["w"], mesh, [Shard(1)])}  # not one range
        try:
            opt.update_(
                opt.setup(opt.ClipNorm(), cols),
                cols,
                {"w": distribute_tensor(grads[0]["w"], mesh, [Shard(1)])},
            )
        except ValueError as exc:
            messages.append(str(exc))
        mixed = {"w": sharded["w"], "b": model["b"]}
        try:
            opt.update_(
                opt.setup(opt.ClipGlobalNorm(), mixed),
                mixed,
                {"w": dgrads["w"], "b": grads[0]["b"]},
            )
        except TypeError as exc:
            messages.append(str(exc))
        results["messages"] = np.array(messages)
        if rank == 0:
            np.savez(out, **results)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
