"""The process group of the two-rank test workers (gloo, 127.0.0.1), always torn down."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(
    world: int, rank: int, port: int, timeout_s: float = 60
) -> Iterator[None]:
    """Join a gloo group of ``world`` ranks on 127.0.0.1:``port`` for the body.

    The ranks meet at a barrier when the body ends normally (no rank tears the group
    down while another still talks); the group is destroyed in every case.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
