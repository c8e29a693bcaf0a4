"""train_: the same bits as the hand-written loop on numpy, torch and JAX; callbacks, progress."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

import agnosticopt as opt
from agnosticopt import schedules as sch

IN, OUT, BATCH = 360, 300, 16  # W has 108000 elements


def _rule() -> opt.Rule:
    return opt.Scheduled(
        opt.OptimiserChain(opt.ClipGrad(0.01), opt.AdamW(1e-3, lambda_=1e-2)),
        eta=sch.warmup_cosine(1e-2, 2, 6),
    )


def _numpy_data(steps: int = 5) -> tuple[dict[str, np.ndarray], list[tuple[Any, Any]]]:
    rng = np.random.default_rng(7)
    model = {
        "w": rng.standard_normal((IN, OUT)).astype(np.float32) / 20,
        "b": np.zeros(OUT, np.float32),
        "name": "linear",
    }
    data = [
        (
            rng.standard_normal((BATCH, IN)).astype(np.float32),
            rng.standard_normal((BATCH, OUT)).astype(np.float32),
        )
        for _ in range(steps)
    ]
    return model, data


def _numpy_value_and_grad(model: Any, x: Any, y: Any) -> tuple[Any, Any]:
    r = x @ model["w"] + model["b"] - y
    scale = np.float32(2 / r.size)
    return np.mean(r * r), {"w": x.T @ r * scale, "b": r.sum(0) * scale}


def _bits(a: Any) -> np.ndarray:
    return np.asarray(a).view(np.uint32)


def test_numpy_train_is_the_hand_written_loop() -> None:
    model, data = _numpy_data()
    hand = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in model.items()}
    tree = opt.setup(_rule(), hand)
    losses = []
    for x, y in data:
        value, grads = _numpy_value_and_grad(hand, x, y)
        tree, hand = opt.update_(tree, hand, grads)
        losses.append(float(value))
    history = opt.train_(
        None,
        model,
        data,
        opt.setup(_rule(), model),
        value_and_grad=_numpy_value_and_grad,
        progress=False,
    )
    assert history.model is model
    assert np.array_equal(_bits(model["w"]), _bits(hand["w"]))
    assert np.array_equal(_bits(model["b"]), _bits(hand["b"]))
    assert history.loss == losses
    assert history.steps == 5
    assert not history.stopped
    assert history.tree["w"].state.t == 5


def test_torch_train_is_the_hand_written_autograd_loop() -> None:
    torch = pytest.importorskip("torch", reason="torch autograd")
    model_np, data_np = _numpy_data()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data_np]

    def loss(m: Any, x: Any, y: Any) -> Any:
        return torch.mean((x @ m["w"] + m["b"] - y) ** 2)

    hand = {
        "w": torch.tensor(model_np["w"], requires_grad=True),
        "b": torch.tensor(model_np["b"], requires_grad=True),
    }
    tree = opt.setup(_rule(), hand)
    losses = []
    for x, y in data:
        value = loss(hand, x, y)
        value.backward()
        grads = {k: p.grad for k, p in hand.items()}
        tree, hand = opt.update_(tree, hand, grads)
        for p in hand.values():
            p.grad = None
        losses.append(value.item())
    model = {
        "w": torch.tensor(model_np["w"]),
        "b": torch.tensor(model_np["b"]),
    }  # no grad
    history = opt.train_(loss, model, data, opt.setup(_rule(), model), progress=False)
    assert np.array_equal(_bits(model["w"]), _bits(hand["w"].detach()))
    assert np.array_equal(_bits(model["b"]), _bits(hand["b"].detach()))
    assert history.loss == losses
    assert model["w"].grad is None


def test_jax_train_is_the_hand_written_jax_grad_loop() -> None:
    jax = pytest.importorskip("jax", reason="jax.grad")
    jnp = jax.numpy
    model_np, data_np = _numpy_data(3)
    data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data_np]

    def loss(m: Any, x: Any, y: Any) -> Any:
        return jnp.mean((x @ m["w"] + m["b"] - y) ** 2)

    hand = {"w": jnp.asarray(model_np["w"]), "b": jnp.asarray(model_np["b"])}
    tree = opt.setup(_rule(), hand)
    losses = []
    for x, y in data:
        value, grads = jax.value_and_grad(loss)(hand, x, y)
        tree, hand = opt.update_(tree, hand, grads)
        losses.append(float(value))
    model = {"w": jnp.asarray(model_np["w"]), "b": jnp.asarray(model_np["b"])}
    history = opt.train_(loss, model, data, opt.setup(_rule(), model), progress=False)
    assert history.loss == losses
    assert (
        history.model is not model
    )  # JAX arrays are immutable: the new model is returned
    assert np.array_equal(_bits(history.model["w"]), _bits(hand["w"]))
    assert np.array_equal(_bits(history.model["b"]), _bits(hand["b"]))


def test_torch_tied_weights_get_their_gradient_once() -> None:
    torch = pytest.importorskip("torch", reason="torch autograd")
    w = torch.ones(3)
    model = {"a": w, "b": w, "n": torch.arange(2)}

    def loss(m: Any) -> Any:
        return (m["a"] * 2).sum() + (m["b"] * 3).sum()

    tree = opt.setup(opt.Descent(0.1), model)
    history = opt.train_(loss, model, [()], tree, progress=False)
    assert torch.equal(model["a"], torch.full((3,), 1 - 0.1 * 5))
    assert history.model["b"] is model["a"]


def test_callbacks_see_each_step_and_can_stop() -> None:
    model, data = _numpy_data(4)
    seen = []

    def record(info: opt.TrainStep) -> None:
        seen.append((info.step, info.epoch, info.loss, info.tree["w"].state.t))

    history = opt.train_(
        None,
        model,
        data,
        opt.setup(_rule(), model),
        epochs=3,
        value_and_grad=_numpy_value_and_grad,
        callbacks=[record, lambda info: info.step == 6],
        progress=False,
    )
    assert history.stopped
    assert history.steps == 6
    assert [s[:2] for s in seen] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
    assert [s[2] for s in seen] == history.loss
    assert [s[3] for s in seen] == list(range(1, 7))


def test_errors_are_clear() -> None:
    model, data = _numpy_data(1)
    tree = opt.setup(_rule(), model)
    with pytest.raises(
        TypeError, match="numpy arrays have no automatic differentiation"
    ):
        opt.train_(lambda m, x, y: 0.0, model, data, tree, progress=False)
    with pytest.raises(ValueError, match="must be re-iterable"):
        opt.train_(
            None,
            model,
            iter(data),
            tree,
            epochs=2,
            value_and_grad=_numpy_value_and_grad,
        )
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        opt.train_(
            None, model, data, tree, epochs=0, value_and_grad=_numpy_value_and_grad
        )
    with pytest.raises(TypeError, match="needs a loss"):
        opt.train_(None, model, data, tree)


def test_progress_bar_shows_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    model, data = _numpy_data(3)
    opt.train_(
        None,
        model,
        data,
        opt.setup(_rule(), model),
        progress=True,
        value_and_grad=_numpy_value_and_grad,
    )
    err = capsys.readouterr().err
    assert "loss=" in err
    assert "3/3" in err
    opt.train_(
        None,
        model,
        data,
        opt.setup(_rule(), model),
        progress=False,
        value_and_grad=_numpy_value_and_grad,
    )
    assert capsys.readouterr().err == ""


def test_no_tqdm_means_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    model, data = _numpy_data(1)
    with pytest.warns(UserWarning, match="progress=True needs tqdm"):
        history = opt.train_(
            None,
            model,
            data,
            opt.setup(_rule(), model),
            progress=True,
            value_and_grad=_numpy_value_and_grad,
        )
    assert history.steps == 1


def test_torch_module_train_is_the_hand_written_loop() -> None:
    torch = pytest.importorskip("torch", reason="torch autograd")
    _, data_np = _numpy_data()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data_np]

    def make() -> Any:
        torch.manual_seed(3)
        net = torch.nn.Sequential(
            torch.nn.Linear(IN, OUT), torch.nn.Tanh(), torch.nn.Linear(OUT, 4)
        )
        net[2].bias.requires_grad_(False)  # switched on for the call, then back off
        return net

    def loss(m: Any, x: Any, y: Any) -> Any:
        return torch.mean((m(x) - y[:, :4]) ** 2)

    hand = make()
    for p in hand.parameters():
        p.requires_grad_(True)
    tree = opt.setup(_rule(), hand)
    losses = []
    for x, y in data:
        value = loss(hand, x, y)
        value.backward()
        grads = {n: p.grad for n, p in hand.named_parameters()}
        tree, hand = opt.update_(tree, hand, grads)
        hand.zero_grad(set_to_none=True)
        losses.append(value.item())
    model = make()
    history = opt.train_(loss, model, data, opt.setup(_rule(), model), progress=False)
    assert history.model is model
    assert history.loss == losses
    assert model[0].weight.numel() > 100_000
    for (name, p), q in zip(model.named_parameters(), hand.parameters(), strict=True):
        assert np.array_equal(_bits(p.detach()), _bits(q.detach())), name
        assert p.grad is None, name
    assert not model[2].bias.requires_grad
    assert model[0].weight.requires_grad
