"""The examples run (in a subprocess, bounded) and say what they promise."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # about 15 s of CPU (imports of torch and JAX, eager jax.grad): .ci/run runs it
def test_digits_example_runs_and_is_bit_identical_where_gradients_are(
    tmp_path: Path,
) -> None:
    pytest.importorskip("sklearn", reason="the digits example loads sklearn's digits")
    png = tmp_path / "loss.png"
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "digits.py"),
            "--epochs",
            "1",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "numpy (hand-written gradients): 15 steps" in out
    for name, spec in (("torch", "torch"), ("JAX", "jax")):
        if importlib.util.find_spec(spec) is None:
            assert f"{name} is not installed: skipped" in out
            continue
        assert (
            f"{name}, fed the numpy gradients: parameters bit-identical to numpy" in out
        )
        assert f"{name}, its own gradients: close to numpy" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two spawned ranks importing torch: about a minute on a loaded 2-core machine
def test_scaling_torch_example_is_bit_identical_on_two_ranks(tmp_path: Path) -> None:
    pytest.importorskip(
        "torch.distributed", reason="the example needs torch.distributed"
    )
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "scaling_torch.py")],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "DDP, parameters equal on every rank: True",
        "FSDP2 + TorchOptimizer, same bits as one process: True",
        "DTensor Shard(0) + ClipNorm, same bits as one process: True",
    ]
