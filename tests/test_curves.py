"""TensorBoard curves: one value per logged step across a kill and a resume, read back with
TensorBoard's own event reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from distill.curves import write_evaluations
from distill.train_config import KDConfig, TrainConfig
from distill.training import newest_checkpoint, train
from tests.test_training import pairs


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar value in every event file of `log_dir`: tag -> [(step, value)], as written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = float(make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, []).append((event.step, number))
    return out


class Killed(BaseException):
    """Ends training between two checkpoints, as a SIGKILL would, once its events are on disk."""


def test_a_training_killed_after_its_checkpoint_and_resumed_logs_every_step_once(tiny_world, tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=10, batch_size=8, save_steps=4, log_steps=1, max_length=64)
    whole = tmp_path / "whole"
    train(tiny_world.student, pairs(), cfg, whole, progress=False)

    calls = iter(range(100))

    def kill_at_step_7() -> bool:
        if next(calls) == 6:
            raise Killed  # steps 5-7 logged, the last checkpoint at step 4
        return False

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train(tiny_world.student, pairs(), cfg, cut, progress=False, should_stop=kill_at_step_7)
    assert [s for s, _ in scalars(cut / "tensorboard")["train/loss"]] == list(range(1, 8))  # ahead of step 4
    resumed = train(tiny_world.student, pairs(), cfg, cut, progress=False)
    assert resumed.resumed_from == 4 and resumed.finished

    got, want = scalars(cut / "tensorboard"), scalars(whole / "tensorboard")
    for tag in ("train/loss", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        steps = Counter(step for step, _ in got[tag])
        assert sorted(steps) == list(range(1, 11)) and set(steps.values()) == {1}, (tag, steps)
    for tag in ("train/loss", "train/ce", "train/lr", "train/grad_norm"):
        assert [v for _, v in sorted(got[tag])] == pytest.approx([v for _, v in sorted(want[tag])], abs=1e-5), tag
    history = json.loads((newest_checkpoint(cut / "checkpoints") / "state.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([v for _, v in sorted(got["train/loss"])], abs=1e-5)


def test_a_teacher_objective_logs_its_term_and_report_to_empty_writes_no_events(tiny_world, tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, log_steps=1, max_length=64, objective="kd",
                      kd=KDConfig(alpha=0.5))
    train(tiny_world.student, pairs(), cfg, tmp_path / "kd", progress=False, teacher_path=tiny_world.teacher)
    got = scalars(tmp_path / "kd" / "tensorboard")
    loss, ce, term = (dict(got[f"train/{k}"]) for k in ("loss", "ce", "teacher_term"))
    assert sorted(term) == [1, 2] and term[2] == pytest.approx(loss[2] - 0.5 * ce[2], abs=1e-4)

    quiet = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, log_steps=1, max_length=64, report_to=[])
    train(tiny_world.student, pairs(), quiet, tmp_path / "quiet", progress=False)
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_evaluation_curves_have_one_point_per_iteration_rewritten_whole(tmp_path):
    rows = [{"model": "student (untrained)", "iteration": None, "accuracy": 0.0},
            {"model": "student (distilled)", "iteration": 0, "accuracy": 0.2, "tokens_mean": 30.0},
            {"model": "student (UNDO)", "iteration": 1, "accuracy": 0.3, "flexible_accuracy": 0.35,
             "tokens_mean": 28.0},
            {"model": "one-shot (same steps)", "iteration": 1, "accuracy": 0.25, "tokens_mean": 29.0}]
    write_evaluations(tmp_path, rows[:2])
    write_evaluations(tmp_path, rows)  # the report rebuilt after iteration 1
    got = scalars(tmp_path)
    assert [s for s, _ in got["eval/accuracy/student"]] == [0, 1]
    assert [v for _, v in got["eval/accuracy/student"]] == pytest.approx([0.2, 0.3])
    assert [(s, round(v, 4)) for s, v in got["eval/accuracy/one-shot"]] == [(1, 0.25)]
    assert [(s, round(v, 4)) for s, v in got["eval/flexible_accuracy/student"]] == [(1, 0.35)]
    assert [s for s, _ in got["eval/tokens_mean/student"]] == [0, 1]
