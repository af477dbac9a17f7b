"""The training commands' shared progress bar: what it shows, and Ctrl-C ending a command with how to resume it."""

from __future__ import annotations

import pytest

from skiplm.cli import common
from skiplm.cli.common import _training_progress
from skiplm.train.distill import TrainingInterrupted


def test_the_report_shows_the_loss_speed_and_the_chosen_held_out_measures(monkeypatch):
    shown = []

    class Bar:  # the rich progress display, recorded
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, description, total=None):
            shown.append(description)
            return 0

        def update(self, task, completed, total, description):
            shown.append(description)

    monkeypatch.setattr(common, "_progress", Bar)
    info = {"loss": 0.5, "tokens_per_second": 1234.0, "held_out_kl": 0.25, "held_out_acceptance": 0.75}
    with _training_progress("healing", command="heal", out="x") as report:
        report(3, 10, info)
        report(4, 10)
    with _training_progress(lambda done, info: f"step {done}", command="draft-train", out="x",
                            held_out=("acceptance",)) as report:
        report(5, 10, info)
    assert shown == ["healing", "healing  loss 0.5000  1,234 tok/s  held-out KL 0.2500", "healing",
                     "step 0", "step 5  loss 0.5000  1,234 tok/s  held-out acceptance 0.750"]


def test_ctrl_c_ends_the_command_with_how_to_resume(capsys):
    with pytest.raises(SystemExit) as stopped:
        with _training_progress("training", command="lora-drop", out="runs/k2"):
            raise TrainingInterrupted("stopped after the checkpoint at step 12")
    assert stopped.value.code == 130
    printed = " ".join(capsys.readouterr().err.split())
    assert "stopped after the checkpoint at step 12 (skiplm lora-drop ... --out runs/k2 --resume)" in printed
