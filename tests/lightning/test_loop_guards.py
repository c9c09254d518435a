"""The callback under AMP's GradScaler, and a refused run that leaves the model as it was (issue 20)."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsMLP, MaskRecorder, digits_loader, trainer


class OverflowAt(DigitsMLP):
    """An inf gradient (a float16 overflow) in the backward pass of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_after_backward(self) -> None:
        if self.trainer.global_step + 1 == self.step:
            self.net[0].weight.grad[0, 0] = float("inf")


def test_a_step_the_grad_scaler_skips_moves_rigls_update_to_the_next_step():
    torch.manual_seed(0)
    sparse = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=4, seed=0)
    recorder = MaskRecorder(sparse)
    scaler = torch.amp.GradScaler("cpu")
    updates = []

    class Updates(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            report = sparse.sparsifier.last_update
            if report is not None and (not updates or updates[-1] != report.step):
                updates.append(report.step)

    fit = trainer(max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                  callbacks=[sparse, recorder, Updates()])  # fmt: skip
    fit.fit(OverflowAt(step=4), digits_loader(n=600, batch_size=50))  # 12 steps per epoch
    assert scaler.get_scale() < 2.0**16  # step 4 was skipped
    assert updates[:2] == [5, 8]  # step 4's update ran at step 5; the next one on schedule
    assert recorder.steps_checked == 24


class UnusedLayer(DigitsMLP):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(10, 10)


def test_rigls_missing_gradient_refusal_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = UnusedLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=4)
    with pytest.raises(ValueError, match=r"\['unused.weight'\] got no gradient in the first step"):
        trainer(max_epochs=1, callbacks=[sparse]).fit(model, digits_loader(n=100))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
