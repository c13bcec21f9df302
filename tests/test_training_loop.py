"""flawscope.training.TrainLoop: resume, early stopping, best weights, checkpoint safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flawscope.errors import FlawscopeError
from flawscope.training import (
    CHECKPOINT_FORMAT,
    Epoch,
    TrainCheckpoint,
    TrainLoop,
    TrainState,
    config_fingerprint,
)

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


class Interrupted(Exception):
    pass


def make_loop(
    path=None, *, fingerprint: str = "fp", epochs: int = 6, patience: int = 0
) -> tuple[TrainLoop, torch.Generator]:
    """A small regression run with dropout (global RNG) and shuffling (its own generator)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    ckpt = TrainCheckpoint(path, fingerprint) if path is not None else None
    loop = TrainLoop(model, opt, epochs=epochs, patience=patience, checkpoint=ckpt,
                     generator=gen, torch_rng=True, meta={"run": "test"})
    return loop, gen


def step_fn(loop: TrainLoop, gen: torch.Generator, stop_at: int | None = None,
            losses: list[float] | None = None):
    def step(epoch: int) -> Epoch:
        if epoch == stop_at:
            raise Interrupted(f"test interrupt at epoch {epoch}")
        model, opt = loop.model, loop.optimizer
        model.train()
        total = 0.0
        for idx in torch.randperm(len(X), generator=gen).split(16):
            loss = ((model(X[idx])[:, 0] - Y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            val = float(((model(X)[:, 0] - Y) ** 2).mean())
        monitor = losses[epoch] if losses is not None else val
        return Epoch({"epoch": epoch, "train_loss": total / len(X), "val": val}, monitor,
                     {"pred": model(X).detach()[:, 0]})

    return step


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path) -> None:
    full, gen = make_loop()
    expected = full.run(step_fn(full, gen))

    path = tmp_path / "run.pt"
    loop, gen = make_loop(path)
    with pytest.raises(Interrupted, match="test interrupt at epoch 3"):
        loop.run(step_fn(loop, gen, stop_at=3))
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 2 and not saved["done"] and saved["format"] == CHECKPOINT_FORMAT

    torch.manual_seed(123)  # the checkpoint restores the global RNG (dropout)
    resumed, gen = make_loop(path)
    assert resumed.resume()
    assert resumed.resumed_from == 3
    state = resumed.run(step_fn(resumed, gen))
    assert [r["epoch"] for r in state.history] == list(range(6))
    assert state.history == expected.history
    assert state.best_epoch == expected.best_epoch and state.meta == {"run": "test"}
    for k, v in expected.best_model.items():
        assert torch.equal(state.best_model[k], v), k
        assert torch.equal(resumed.model.state_dict()[k], v), k  # best weights loaded
    assert torch.equal(state.best_keep["pred"], expected.best_keep["pred"])


def test_finished_run_is_stored_as_done_and_resumes_to_the_same_model(tmp_path) -> None:
    path = tmp_path / "run.pt"
    loop, gen = make_loop(path, epochs=3)
    first = loop.run(step_fn(loop, gen))
    saved = torch.load(path, weights_only=True)
    assert saved["done"] and "model" not in saved and "optimizer" not in saved
    again, gen = make_loop(path, epochs=3)
    assert again.resume()

    def no_training(epoch: int) -> Epoch:
        raise AssertionError("a finished run trains no further epoch")

    state = again.run(no_training)
    assert state.done and state.history == first.history
    for k, v in first.best_model.items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert list(tmp_path.iterdir()) == [path]  # atomic writes leave no temporary files


def test_checkpoint_of_another_configuration_is_refused(tmp_path) -> None:
    path = tmp_path / "run.pt"
    cfg = {"lr": 0.05, "epochs": 3}
    loop, gen = make_loop(path, fingerprint=config_fingerprint(cfg), epochs=3)
    loop.run(step_fn(loop, gen))
    other, _ = make_loop(path, fingerprint=config_fingerprint({**cfg, "lr": 0.1}), epochs=3)
    with pytest.raises(FlawscopeError, match="different training configuration or data; "
                       "delete it or train without --resume"):
        other.resume()
    same, _ = make_loop(path, fingerprint=config_fingerprint(dict(reversed(cfg.items()))))
    assert same.resume()  # key order does not matter


def test_corrupt_or_old_checkpoints_are_refused(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FlawscopeError, match="cannot resume from this checkpoint"):
        TrainCheckpoint(bad, "fp").read()
    old = tmp_path / "old.pt"
    torch.save({"fingerprint": "fp", "epoch": 0}, old)  # layout of flawscope before 2
    with pytest.raises(FlawscopeError, match="another flawscope version"):
        TrainCheckpoint(old, "fp").read()
    assert not make_loop(tmp_path / "missing.pt")[0].resume()  # nothing to resume: fresh run


def test_early_stopping_keeps_the_best_epoch(tmp_path) -> None:
    losses = [5.0, 3.0, 4.0, 4.0, 1.0, 0.5]  # patience 2: stops after epoch 3
    loop, gen = make_loop(patience=2)
    state = loop.run(step_fn(loop, gen, losses=losses))
    assert [r["epoch"] for r in state.history] == [0, 1, 2, 3]
    assert state.best_epoch == 1 and state.best_record["epoch"] == 1


def test_report_runs_before_and_after_runs_after_the_checkpoint(tmp_path) -> None:
    path = tmp_path / "run.pt"
    seen: list[tuple[str, int, int]] = []

    def epoch_on_disk() -> int:
        return int(torch.load(path, weights_only=True)["epoch"]) if path.exists() else -1

    def report(rec: dict, improved: bool) -> None:
        rec["best"] = improved
        seen.append(("report", rec["epoch"], epoch_on_disk()))

    def after(rec: dict) -> None:
        assert "best" in rec
        seen.append(("after", rec["epoch"], epoch_on_disk()))

    loop, gen = make_loop(path, epochs=2)
    state = loop.run(step_fn(loop, gen), report=report, after=after)
    assert seen == [("report", 0, -1), ("after", 0, 0), ("report", 1, 0), ("after", 1, 1)]
    assert state.history[0]["best"] is True


def test_state_round_trip() -> None:
    loop, gen = make_loop(epochs=2)
    state = loop.run(step_fn(loop, gen))
    back = TrainState.from_dict(state.to_dict(), patience=0)
    assert back.history == state.history and back.done and back.next_epoch == 2
    assert back.best_epoch == state.best_epoch
