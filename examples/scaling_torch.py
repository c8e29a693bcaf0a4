"""Scaling out with torch: DDP, FSDP2 and DTensor on 2 gloo ranks over 127.0.0.1.

Run ``python examples/scaling_torch.py``: it starts two CPU processes (a process
group on the loopback, bounded by a timeout), trains the same model three ways
and, on rank 0, checks every result against one process bit for bit.
"""

from __future__ import annotations

import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import agnosticopt as opt

WORLD, STEPS, TIMEOUT = 2, 3, 120


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)  # 331 rows: uneven shards on 2 ranks; 5 rows, 1 row: tiny ones
    return torch.nn.Sequential(
        torch.nn.Linear(397, 331, dtype=torch.float64),
        torch.nn.Linear(331, 5, dtype=torch.float64),
        torch.nn.Linear(5, 1, dtype=torch.float64),
    )


def gradients(step: int, model: torch.nn.Module) -> list[torch.Tensor]:
    """The same gradients on every rank (the check compares the optimiser only)."""
    g = torch.Generator().manual_seed(step)
    return [
        torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()
    ]


def one_process(rule: opt.Rule) -> list[torch.Tensor]:
    """The reference: the same steps on a plain model in this process."""
    model = make_model()
    tree = opt.setup(rule, model)
    for step in range(STEPS):
        for p, g in zip(model.parameters(), gradients(step, model), strict=True):
            p.grad = g
        opt.update_(tree, model, None)
    return [p.detach() for p in model.parameters()]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    full = [t.full_tensor() if isinstance(t, DTensor) else t for t in a]
    return all(
        torch.equal(x.detach().view(torch.int64), y.view(torch.int64))
        for x, y in zip(full, b, strict=True)
    )


def ddp(rank: int) -> bool:
    """DDP: every rank holds the whole model; update_ as in one process."""
    model = DistributedDataParallel(make_model())
    rule = opt.OptimiserChain(opt.ClipNorm(1.0), opt.Adam(1e-3))
    tree = opt.setup(rule, model.module)
    for _step in range(STEPS):
        x = torch.randn(
            8, 397, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)
        )
        model.zero_grad()
        model(x).square().sum().backward()  # DDP averages the gradients across ranks
        opt.update_(tree, model.module, None)
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    theirs = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(theirs, mine)
    return all(torch.equal(t, mine) for t in theirs)


def fsdp2(mesh: DeviceMesh) -> bool:
    """FSDP2: fully_shard parameters are DTensors; TorchOptimizer steps their shards."""
    model = make_model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rule = opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.AdamW(1e-3))
    optim = opt.TorchOptimizer(model.parameters(), rule)
    for step in range(STEPS):
        for p, g in zip(model.parameters(), gradients(step, model), strict=True):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        optim.step()
    return same_bits(list(model.parameters()), one_process(rule))


def dtensor(mesh: DeviceMesh) -> bool:
    """DTensor directly: distribute_tensor(..., [Shard(0)]) and the functional API."""
    rule = opt.OptimiserChain(opt.ClipNorm(0.5), opt.Adam())
    plain = make_model()
    params = [
        distribute_tensor(p.detach(), mesh, [Shard(0)]) for p in plain.parameters()
    ]
    tree = opt.setup(rule, params)
    for step in range(STEPS):
        grads = [distribute_tensor(g, mesh, [Shard(0)]) for g in gradients(step, plain)]
        tree, params = opt.update_(tree, params, grads)
    return same_bits(params, one_process(rule))


def run(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT),
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {
            "DDP, parameters equal on every rank": ddp(rank),
            "FSDP2 + TorchOptimizer, same bits as one process": fsdp2(mesh),
            "DTensor Shard(0) + ClipNorm, same bits as one process": dtensor(mesh),
        }
        if rank == 0:
            for what, ok in results.items():
                print(f"{what}: {ok}", flush=True)
        dist.barrier()  # no rank tears the group down while another still talks
    finally:
        dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(run, args=(port,), nprocs=WORLD, join=False)
    for _ in range(TIMEOUT):  # bounded: a rank that hangs is ended
        if context.join(timeout=1):
            return 0
    for process in context.processes:
        process.kill()
    print("timed out", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
