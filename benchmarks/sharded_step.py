"""Step time of an FSDP2 model on 2 gloo CPU ranks: agnosticopt against torch.optim.

``python benchmarks/sharded_step.py [--steps N]`` starts two ranks on 127.0.0.1;
each holds a ``fully_shard`` model (4 float32 ``Linear(1024, 1024)`` layers,
about 4.2M parameters, half per rank) and times ``optimizer.step()`` alone (the
gradients are set once), the optimisers interleaved step by step so that all
see the same machine load. The norm-clip chains run twice, on the fast path and
with it off (:func:`agnosticopt.set_fast_path`, the plain path), against
torch.optim's ``AdamW`` after ``clip_grad_norm_`` (over all parameters, the
global clip; or per parameter, as ``ClipNorm``). Rank 0 prints the median
milliseconds per step.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Callable
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


def _step_functions(mesh: DeviceMesh) -> dict[str, tuple[bool, Callable[[], None]]]:
    """Per optimiser, whether agnosticopt's fast path is on and one step."""

    def ours(rule: opt.Rule) -> Callable[[], None]:
        return opt.TorchOptimizer(sharded_model(mesh).parameters(), rule).step

    def torch_clipped(per_parameter: bool) -> Callable[[], None]:
        params = list(sharded_model(mesh).parameters())
        optim = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

        def step() -> None:
            if per_parameter:
                for p in params:
                    torch.nn.utils.clip_grad_norm_([p], 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()

        return step

    def clip_norm() -> opt.Rule:
        return opt.OptimiserChain(opt.ClipNorm(1.0), opt.AdamW(1e-3, lambda_=0.01))

    def clip_global() -> opt.Rule:
        return opt.OptimiserChain(
            opt.ClipGlobalNorm(1.0), opt.AdamW(1e-3, lambda_=0.01)
        )

    adam = torch.optim.Adam(sharded_model(mesh).parameters(), lr=1e-3)
    adamw = torch.optim.AdamW(
        sharded_model(mesh).parameters(), lr=1e-3, weight_decay=0.01
    )
    return {
        "agnosticopt TorchOptimizer(Adam)": (True, ours(opt.Adam(1e-3))),
        "torch.optim.Adam (foreach)": (True, adam.step),
        "agnosticopt ClipNorm+AdamW, fast path": (True, ours(clip_norm())),
        "agnosticopt ClipNorm+AdamW, plain path": (False, ours(clip_norm())),
        "torch clip_grad_norm_ per parameter + AdamW (foreach)": (
            True,
            torch_clipped(per_parameter=True),
        ),
        "agnosticopt ClipGlobalNorm+AdamW, fast path": (True, ours(clip_global())),
        "agnosticopt ClipGlobalNorm+AdamW, plain path": (False, ours(clip_global())),
        "torch clip_grad_norm_ + AdamW (foreach)": (
            True,
            torch_clipped(per_parameter=False),
        ),
        "torch.optim.AdamW (foreach)": (True, adamw.step),
    }


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
        steps_of = _step_functions(mesh)
        times: dict[str, list[float]] = {k: [] for k in steps_of}
        for step in range(steps + 2):  # two warm-up steps (numba compiles once)
            for name, (fast, optim_step) in steps_of.items():
                previous = opt.set_fast_path(fast)
                try:
                    dist.barrier()
                    start = time.perf_counter()
                    optim_step()
                    if step >= 2:
                        times[name].append(time.perf_counter() - start)
                finally:
                    opt.set_fast_path(previous)
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
