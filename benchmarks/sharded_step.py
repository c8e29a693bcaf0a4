"""Step time of an FSDP2 model on 2 gloo CPU ranks: agnosticopt against torch.optim.

``python benchmarks/sharded_step.py [--steps N]`` starts two ranks on 127.0.0.1;
each holds a ``fully_shard`` model (4 float32 ``Linear(1024, 1024)`` layers,
about 4.2M parameters, half per rank) and times ``optimizer.step()`` alone (the
gradients are set once), the optimisers interleaved step by step so that both
see the same machine load. Rank 0 prints the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import agnosticopt as opt

WORLD, TIMEOUT = 2, 300


def sharded_model(mesh: DeviceMesh) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for p in model.parameters():
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)])
    return model


def run(rank: int, port: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT),
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        optimizers = {
            "agnosticopt TorchOptimizer(Adam)": opt.TorchOptimizer(
                sharded_model(mesh).parameters(), opt.Adam(1e-3)
            ),
            "torch.optim.Adam (foreach)": torch.optim.Adam(
                sharded_model(mesh).parameters(), lr=1e-3
            ),
            "agnosticopt ClipGlobalNorm+Adam": opt.TorchOptimizer(
                sharded_model(mesh).parameters(),
                opt.OptimiserChain(opt.ClipGlobalNorm(1.0), opt.Adam(1e-3)),
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in optimizers}
        for step in range(steps + 2):  # two warm-up steps (numba compiles once)
            for name, optim in optimizers.items():
                dist.barrier()
                start = time.perf_counter()
                optim.step()
                if step >= 2:
                    times[name].append(time.perf_counter() - start)
        if rank == 0:
            for name, ts in times.items():
                print(
                    f"{name}: {1e3 * statistics.median(ts):.1f} ms/step "
                    f"(median of {len(ts)}, 2 ranks)",
                    flush=True,
                )
        dist.barrier()  # no rank tears the group down while another still talks
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(run, args=(port, args.steps), nprocs=WORLD, join=False)
    for _ in range(TIMEOUT):
        if context.join(timeout=1):
            return 0
    for process in context.processes:
        process.kill()
    return 1


if __name__ == "__main__":
    sys.exit(main())
