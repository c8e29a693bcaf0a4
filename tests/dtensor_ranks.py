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


def main(world: int, rank: int, port: int, out: str) -> None:
    with gloo_group(world, rank, port):
        mesh = init_device_mesh("cpu", (world,))
        results: dict[str, np.ndarray] = {}
        from agnosticopt.adapters import _fast

        before = _fast.counters["fast"]
        counts = count_collectives()
        for name, (rule, dtype) in cases().items():
            model, grads = data(dtype)
            place = {"w": [Shard(0)], "b": [Shard(0)], "one": [Replicate()]}
            per_step = []
            if name.startswith(("global", "paths")):
                place["one"] = [Shard(0)]
            sharded = {
                k: distribute_tensor(v, mesh, place[k]) for k, v in model.items()
            }
            tree = opt.setup(rule, sharded)
            for step in grads:
                dgrads = {
                    k: distribute_tensor(v, mesh, place[k]) for k, v in step.items()
                }
                seen = dict(counts)
                tree, sharded = opt.update_(tree, sharded, dgrads)
                per_step.append([counts[c] - seen[c] for c in COUNTED])
            results[f"collectives/{name}"] = np.array(per_step)
            for k, v in sharded.items():
                assert isinstance(v, DTensor), (name, k, type(v))
                results[f"{name}/{k}"] = v.full_tensor().numpy()
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
