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


def test_updates_panel_layer_steps_target_log_ticks_and_title(tmp_path):
    report = _report({"a.weight": [0.5, 0.4, 0.4], "b.weight": [0.01, 0.02, 0.02]}, empty_out=0.3)
    report.updates += [(10, 0.3, 0.25), (20, 0.15, 0.1)]
    report.explored += [(0, 0.2), (10, 0.25), (10, 0.27), (20, 0.3)]
    fig = report.figure(tmp_path / "f.png", title="rigl, density 0.2, Net", target=0.2, masked=["a.weight", "b.weight"])
    assert (tmp_path / "f.png").stat().st_size > 10_000
    updates, layers, empty = fig.axes
    assert fig._suptitle.get_text() == "rigl, density 0.2, Net"
    # panel 1: the rate given and the fraction pruned at each update, and R_s (the last value of a step)
    lines = {line.get_label(): line for line in updates.get_lines()}
    assert list(lines["prune rate given"].get_xdata()) == [10, 20]
    assert list(lines["prune rate given"].get_ydata()) == [0.3, 0.15]
    assert list(lines["fraction of active weights pruned"].get_ydata()) == [0.25, 0.1]
    assert list(lines["explored (R_s)"].get_xdata()) == [0, 10, 20]
    assert list(lines["explored (R_s)"].get_ydata()) == [0.2, 0.27, 0.3]
    assert updates.get_title() == "mask updates (2)"
    # panel 2: a step line per layer, the overall density weighted by size, the target dashed; log scale
    lines = {line.get_label(): line for line in layers.get_lines()}
    assert lines["target 0.2"].get_linestyle() == "--" and list(lines["target 0.2"].get_ydata()) == [0.2, 0.2]
    overall = lines["all masked weights"]
    assert overall.get_drawstyle() == "steps-post" and list(overall.get_xdata()) == [0, 10, 20]
    assert list(overall.get_ydata()) == pytest.approx([0.255, 0.21, 0.21])
    assert layers.get_yscale() == "log"  # 0.01 to 0.5: more than 10x apart
    fig.canvas.draw()
    ticks = [t.get_text() for t in layers.get_yticklabels() if t.get_text()]
    assert set(ticks) <= {"0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"}
    assert "0.1" in ticks and not any("e" in t for t in ticks)
    # the x ticks are integers and none repeats
    steps = [t.get_text() for t in layers.get_xticklabels() if t.get_text()]
    assert len(steps) == len(set(steps))
    assert [t.get_text() for t in empty.get_yticklabels()] == ["a.weight", "b.weight"]


def test_one_column_per_step_the_last_record_of_it(tmp_path):
    report = _report({"a.weight": [0.5, 0.4]})
    report.history.append((10, {"a.weight": LayerChannelStats(0.0, 0.0, 0.3)}))  # a second record at step 10
    fig = report.figure(tmp_path / "f.png", masked=["a.weight"])
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert list(lines["a.weight"].get_xdata()) == [0, 10] and list(lines["a.weight"].get_ydata()) == [0.5, 0.3]


def test_no_updates_is_said_with_the_explored_fraction(tmp_path):
    report = _report({"a.weight": [0.2, 0.2]})
    report.explored += [(0, 0.2), (10, 0.2)]
    fig = report.figure(tmp_path / "f.png", masked=["a.weight"])
    assert fig.axes[0].texts[0].get_text() == (
        "no mask updates\n(masks fixed, or learned at every step)\nexplored (R_s): 0.2000"
    )


def test_many_layers_become_a_heat_map_with_a_colour_scale_of_ten_around_the_target(tmp_path):
    names = [f"l{i}.weight" for i in range(30)]
    # densities equal up to rounding (0.09998 .. 0.10008) must not span the colour scale
    report = _report({n: [0.09998 + 0.00001 * (i % 10), 0.1] for i, n in enumerate(names)})
    fig = report.figure(tmp_path / "f.png", masked=names, target=0.1)
    _, layers, empty, colorbar = fig.axes
    (image,) = layers.get_images()
    assert image.get_array().shape == (30, 2)
    assert layers.get_title() == "mask density, 30 layers (overall 0.1000, target 0.1)"
    assert image.norm.vmax / image.norm.vmin >= 10 - 1e-9
    assert image.norm.vmin <= 0.1 / 3 and image.norm.vmax >= 0.1 * 3
    assert "no empty input or output channels" in empty.texts[0].get_text()


def test_unmasked_layers_are_left_out_of_the_figure(tmp_path):
    report = _report({"a.weight": [0.2, 0.2], "dense.weight": [1.0, 1.0]})
    fig = report.figure(tmp_path / "f.png", masked=["a.weight"], target=0.2)
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert list(lines["all masked weights"].get_ydata()) == [0.2, 0.2]
    assert sorted(lines) == ["a.weight", "all masked weights", "target 0.2"]


def test_the_table_states_explored_per_layer_and_overall():
    from lightning_sparse.core.sparsifier import Explored

    report = _report({"a.weight": [0.5], "b.weight": [0.1]})
    stats = report.history[-1][1]
    table = report.table(stats, explored=Explored({"a.weight": 0.75}, 0.5)).splitlines()
    assert table[0].split() == ["layer", "shape", "density", "empty", "in", "empty", "out", "FLOPs", "share", "explored"]
    assert table[2].split()[-1] == "0.7500" and table[3].split()[-1] == "-"
    assert table[4] == "explored (R_s): 0.5000 of the masked positions have been active"
    assert "explored" not in report.table(stats)


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
