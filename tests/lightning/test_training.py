"""Long-run concerns: mixed precision, gradient accumulation, clipping, max_steps, LightningCLI (crash and resume:
tests/distributed/test_crash.py)."""

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_sparse import SparseTrainingCallback
from lightning_sparse.functional import cosine_decay
from tests.helpers import DigitsMLP, MaskRecorder, digits_loader, trainer


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_masked_weights_zero(precision):
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=3, seed=0, figure=False)
    rec = MaskRecorder(cb)
    model = DigitsMLP()
    trainer(callbacks=[cb, rec], max_epochs=2, precision=precision).fit(model, digits_loader())
    assert rec.steps_checked == 24
    assert cb.state_dict()["num_updates"] >= 4
    for name, mask in cb.masks.items():
        param = dict(model.named_parameters())[name]
        assert param.dtype == torch.float32  # the full-precision weights are the ones masked
        assert torch.all(param[~mask] == 0)


def test_accumulation_counts_optimizer_steps():
    applied, updates = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            applied.append(trainer.global_step)
            updates.append(cb.state_dict()["last_update_step"])

    cb = SparseTrainingCallback(density=0.2, update_interval=2, prune_rate_schedule="linear", seed=0, figure=False)
    t = trainer(callbacks=[cb, MaskRecorder(cb), Spy()], max_epochs=2, accumulate_grad_batches=4)
    t.fit(DigitsMLP(), digits_loader())  # 12 batches an epoch: 3 optimizer steps an epoch, 6 in all
    assert t.global_step == 6 and t.estimated_stepping_batches == 6
    assert applied == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3] + [3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6]
    # updates every 2 optimizer steps (2 and 4), never on the last (6), at the batch that made the step
    assert sorted(set(updates) - {-1}) == [2, 4]
    assert updates.index(2) == 7 and updates.index(4) == 15
    assert cb.current_prune_rate == pytest.approx(0.5 * (1 - 4 / 6))


def test_gradient_clipping_and_max_steps():
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=5, seed=0, figure=False)
    rec = MaskRecorder(cb)
    t = trainer(callbacks=[cb, rec], max_epochs=-1, max_steps=30, gradient_clip_val=0.5)
    t.fit(DigitsMLP(), digits_loader())
    assert t.global_step == 30 and rec.steps_checked == 30
    state = cb.state_dict()
    # window: 0.75 * 30 = 22.5 steps; updates at 5, 10, 15, 20 and 25 (the first at or past the end)
    assert state["last_update_step"] == 25 and state["num_updates"] == 5
    assert cb.current_prune_rate == cosine_decay(1.0, 0.3)


def test_epoch_updates_with_max_steps_follow_estimated_stepping_batches():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    t = trainer(callbacks=[cb], max_epochs=10, max_steps=30)  # 12 steps an epoch: stops in epoch 2
    t.fit(DigitsMLP(), digits_loader())
    assert t.estimated_stepping_batches == 30
    state = cb.state_dict()
    assert state["num_updates"] == 2 and state["last_update_step"] == 24
    assert cb.current_prune_rate == pytest.approx(cosine_decay(24 / 30, 0.5))


# ----------------------------------------------------------------------------- LightningCLI


class CLIModel(DigitsMLP):
    def train_dataloader(self):
        return digits_loader()


def _cli(args):
    return LightningCLI(CLIModel, run=False, args=args, save_config_kwargs={"overwrite": True})


def test_cli_command_line_adds_the_callback(tmp_path):
    cli = _cli([
        "--trainer.callbacks+=lightning_sparse.SparseTrainingCallback",
        "--trainer.callbacks.density=0.1",
        "--trainer.callbacks.algorithm=set",
        "--trainer.callbacks.figure=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
    ])
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, SparseTrainingCallback)]
    assert len(callbacks) == 1
    cb = callbacks[0]
    assert cb.density == 0.1 and cb.algorithm_name == "set" and cb.init == "er"
    cli.trainer.fit(cli.model)
    assert cb.state_dict()["num_updates"] == 1


def test_cli_yaml_config(tmp_path):
    config = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning_sparse.SparseTrainingCallback",
                    "init_args": {
                        "density": 0.2,
                        "algorithm": "rigl",
                        "dense_layers": ["net.0"],
                        "update_interval": 3,
                        "seed": 5,
                        "figure": False,
                    },
                }
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = _cli([f"--config={path}"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, SparseTrainingCallback))
    assert (cb.density, cb.algorithm_name, cb.dense_layers, cb.update_interval, cb.seed) == (0.2, "rigl", ["net.0"], 3, 5)
    cli.trainer.fit(cli.model)
    assert list(cb.masks) == ["net.2.weight", "net.4.weight"]


def test_cli_help_documents_the_arguments(capsys):
    with pytest.raises(SystemExit):
        _cli(["--trainer.callbacks.help", "lightning_sparse.SparseTrainingCallback"])
    out = capsys.readouterr().out
    for argument in ("--trainer.callbacks.density", "--trainer.callbacks.algorithm", "--trainer.callbacks.update_interval"):
        assert argument in out
    assert "fraction of the masked weights that are active" in out
