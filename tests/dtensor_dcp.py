"""Checkpoints of DTensor states across rank counts (run as a script by test_dtensor).

``python tests/dtensor_dcp.py WORLD RANK PORT DIR PHASE``. Phase ``save`` (on
WORLD ranks): an FSDP2 ``fully_shard`` model and a functional tree take two
steps, are saved with ``torch.distributed.checkpoint`` (the optimizer through
``get_optimizer_state_dict``, the tree through ``opt.state_dict``), take a
third step, and rank 0 writes the parameters after it. Phase ``load`` (on WORLD
ranks, plain ``fully_shard`` or, for WORLD = 1, plain modules): loads the
checkpoint, takes the third step and writes the parameters. The pickled tree is
refused (its message is saved).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from _gloo import gloo_group
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import agnosticopt as opt

STEPS = 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(397, 331, dtype=torch.float64),
        torch.nn.Linear(331, 5, dtype=torch.float64),
    )


def grads(step: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def set_grads(model: torch.nn.Module, step: int, mesh: DeviceMesh) -> None:
    for (_n, p), g in zip(
        model.named_parameters(), grads(step, model).values(), strict=True
    ):
        p.grad = distribute_tensor(g, mesh, [Shard(0)]) if isinstance(p, DTensor) else g


def full(t: torch.Tensor) -> np.ndarray:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().numpy()


def main(world: int, rank: int, port: int, where: str, phase: str) -> None:
    with gloo_group(world, rank, port):
        mesh = init_device_mesh("cpu", (world,))
        model = make_model()
        if world > 1:
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        rule = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-3))
        optim = opt.TorchOptimizer(model.parameters(), rule)
        params = dict(model.named_parameters())
        tree = opt.setup(opt.OptimiserChain(opt.ClipNorm(0.5), opt.Adam()), params)
        fn_model = {
            k: distribute_tensor(
                p.detach().clone().full_tensor()
                if isinstance(p, DTensor)
                else p.detach().clone(),
                mesh,
                [Shard(0)],
            )
            for k, p in params.items()
        }
        tree = opt.setup(opt.OptimiserChain(opt.ClipNorm(0.5), opt.Adam()), fn_model)
        ckpt = str(Path(where) / "ckpt")
        out: dict[str, np.ndarray] = {}
        first = 0 if phase == "save" else 2
        if phase == "load":
            sd = {
                "optim": get_optimizer_state_dict(model, optim),
                "tree": opt.state_dict(tree),
            }
            dcp.load(sd, checkpoint_id=ckpt)
            set_optimizer_state_dict(model, optim, sd["optim"])
            tree = opt.load_state_dict(tree, sd["tree"])
            saved = np.load(Path(where) / "params2.npz")
            with torch.no_grad():  # the parameters after two steps
                for k, p in model.named_parameters():
                    local = torch.from_numpy(saved[f"model/{k}"])
                    src = (
                        distribute_tensor(local, mesh, [Shard(0)])
                        if isinstance(p, DTensor)
                        else local
                    )
                    p.copy_(src)
                for k, p in fn_model.items():
                    p.copy_(
                        distribute_tensor(
                            torch.from_numpy(saved[f"tree/{k}"]), mesh, [Shard(0)]
                        )
                    )
        for step in range(first, STEPS):
            set_grads(model, step, mesh)
            optim.step()
            g = {
                k: distribute_tensor(v, mesh, [Shard(0)])
                for k, v in grads(step, model).items()
            }
            tree, fn_model = opt.update_(tree, fn_model, g)
            if step == 1 and phase == "save":
                sd = {
                    "optim": get_optimizer_state_dict(model, optim),
                    "tree": opt.state_dict(tree),
                }
                dcp.save(sd, checkpoint_id=ckpt)
                two = {f"model/{k}": full(p) for k, p in model.named_parameters()}
                two.update({f"tree/{k}": full(p) for k, p in fn_model.items()})
                if rank == 0:
                    np.savez(Path(where) / "params2.npz", **two)
                try:
                    dcp.save({"optim": tree}, checkpoint_id=str(Path(where) / "bad"))
                except CheckpointException as exc:  # raised on every rank
                    out["refused"] = np.array(f"{type(exc).__name__}: {exc}")
        out.update({f"model/{k}": full(p) for k, p in model.named_parameters()})
        out.update({f"tree/{k}": full(p) for k, p in fn_model.items()})
        if rank == 0:
            np.savez(Path(where) / f"{phase}{world}.npz", **out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
