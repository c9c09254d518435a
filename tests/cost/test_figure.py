"""Issue 13: the figure — steps at the recorded moments, overall density with the target, a log scale or a heat
map when needed, a title naming method/density/model, the empty-channel panel, and every image logger."""

from __future__ import annotations

import pytest

from lightning_sparse.cost import LayerChannelStats, SparsityReport, send_figure

pytest.importorskip("matplotlib")


def _report(densities: dict[str, list[float]], empty_out: float = 0.0) -> SparsityReport:
    report = SparsityReport()
    steps = len(next(iter(densities.values())))
    for t in range(steps):
        stats = {n: LayerChannelStats(empty_in=0.0, empty_out=empty_out if t == steps - 1 else 0.0, density=d[t])
                 for n, d in densities.items()}  # fmt: skip
        report.history.append((10 * t, stats))
    report.shapes.update({n: (10, 10) for n in densities})
    return report


def test_few_layers_steps_target_log_scale_and_title(tmp_path):
    report = _report({"a.weight": [0.5, 0.4, 0.4], "b.weight": [0.01, 0.02, 0.02]}, empty_out=0.3)
    fig = report.figure(tmp_path / "f.png", title="rigl, density 0.2, Net", target=0.2, masked=["a.weight", "b.weight"])
    assert (tmp_path / "f.png").stat().st_size > 10_000
    total, layers, empty = fig.axes
    assert fig._suptitle.get_text() == "rigl, density 0.2, Net"
    # the overall density is a step line at the recorded moments, weighted by size; the target a dashed line
    (target,) = [line for line in total.get_lines() if line.get_linestyle() == "--"]
    assert list(target.get_ydata()) == [0.2, 0.2]
    (overall,) = [line for line in total.get_lines() if line.get_linestyle() != "--"]
    assert overall.get_drawstyle() == "steps-post" and list(overall.get_xdata()) == [0, 10, 20]
    assert list(overall.get_ydata()) == pytest.approx([0.255, 0.21, 0.21])
    assert layers.get_yscale() == "log"  # 0.01 to 0.5: more than 10x apart
    assert [t.get_text() for t in empty.get_yticklabels()] == ["a.weight", "b.weight"]


def test_many_layers_become_a_heat_map_and_no_empty_channels_is_said(tmp_path):
    names = [f"l{i}.weight" for i in range(30)]
    report = _report({n: [0.1 * (1 + i % 3), 0.1] for i, n in enumerate(names)})
    fig = report.figure(tmp_path / "f.png", masked=names)
    _, layers, empty, colorbar = fig.axes
    assert len(layers.get_images()) == 1 and layers.get_images()[0].get_array().shape == (30, 2)
    assert layers.get_title() == "density per layer (30 layers)"
    assert "no empty input or output channels" in empty.texts[0].get_text()


def test_unmasked_layers_are_left_out_of_the_figure(tmp_path):
    report = _report({"a.weight": [0.2, 0.2], "dense.weight": [1.0, 1.0]})
    fig = report.figure(tmp_path / "f.png", masked=["a.weight"], target=0.2)
    total = fig.axes[0]
    (overall,) = [line for line in total.get_lines() if line.get_linestyle() != "--"]
    assert list(overall.get_ydata()) == [0.2, 0.2]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["a.weight"]


class _TensorBoardLike:
    class experiment:  # noqa: N801 - what TensorBoardLogger.experiment offers
        calls: list = []

        @classmethod
        def add_figure(cls, key, figure, global_step):
            cls.calls.append((key, global_step))


class _WandbLike:
    def __init__(self):
        self.calls = []

    def log_image(self, key, images, step):
        self.calls.append((key, images, step))


class MLFlowLoggerLike:
    run_id = "run"

    def __init__(self):
        self.experiment = self

    def log_figure(self, run_id, figure, artifact_file):
        self.call = (run_id, artifact_file)


class _NoImages:
    experiment = object()


def test_the_figure_goes_to_every_logger_that_takes_images(tmp_path):
    wandb, mlflow = _WandbLike(), MLFlowLoggerLike()
    loggers = [_TensorBoardLike(), wandb, mlflow, _NoImages()]
    sent = send_figure(loggers, object(), str(tmp_path / "f.png"), 7, key="sparse/summary")
    assert sent == ["_TensorBoardLike", "_WandbLike", "MLFlowLoggerLike"]
    assert _TensorBoardLike.experiment.calls[-1] == ("sparse/summary", 7)
    assert wandb.calls == [("sparse/summary", [str(tmp_path / "f.png")], 7)]
    assert mlflow.call == ("run", "sparse_summary_7.png")
