"""Run-directory artifacts without Spark: the per-epoch metrics and their plots."""

from __future__ import annotations

import pytest

from sparkdl import storage
from sparkdl.artifacts import epoch_metrics, plot_epochs
from sparkdl.train.metrics import MetricsLog

pytestmark = pytest.mark.timeout(60)


def _metrics(tmp_path, rows):
    log = MetricsLog(str(tmp_path / "run"), enabled=True)
    for epoch, name, value in rows:
        log.record(epoch, epoch * 10, "train", name, value)
    log.flush()
    return str(tmp_path / "run" / "metrics")


def test_an_mse_loss_gets_one_plot_not_two(tmp_path):
    rows = [(e, n, 1.0 / (e + 1)) for e in range(3) for n in ("loss", "mse")]
    assert set(epoch_metrics(_metrics(tmp_path, rows))) == {"loss"}
    other = [(e, "loss", 1.0 / (e + 1)) for e in range(3)] + [(e, "mse", 2.0) for e in range(3)]
    assert set(epoch_metrics(_metrics(tmp_path / "b", other))) == {"loss", "mse"}


def test_plots_use_a_log_axis_when_the_loss_spans_decades(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen = {}
    original = Figure.savefig

    def spy(self, *args, **kwargs):
        seen[self.axes[0].get_ylabel()] = (self.axes[0].get_yscale(), self.axes[0].get_xlim())
        return original(self, *args, **kwargs)

    Figure.savefig = spy
    try:
        rows = {
            "loss": {"train": {0: 100.0, 1: 1.0, 2: 0.01}},
            "accuracy": {"train": {0: 0.5, 1: 0.8, 2: 0.9}},
        }
        written = plot_epochs(rows, str(tmp_path / "plots"), best_epoch=2)
    finally:
        Figure.savefig = original
    assert sorted(storage.list_dir(str(tmp_path / "plots"))) == ["accuracy.png", "loss.png"]
    assert len(written) == 2
    assert seen["loss"][0] == "log" and seen["accuracy"][0] == "linear"
    assert seen["loss"][1][0] < 1.5 and seen["loss"][1][1] >= 3  # epochs 1..3 on the axis
