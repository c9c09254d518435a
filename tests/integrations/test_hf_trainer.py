"""Issue 23, item 8: ``SparseTrainerCallback`` drives the Sparsifier inside Hugging Face's ``Trainer``: a tiny GPT-2
(built from a config, nothing downloaded) trained on random tokens with RigL, then resumed from a checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from lightning_sparse.integrations.transformers import STATE_FILE, SparseTrainerCallback  # noqa: E402

STEPS, INTERVAL, BATCH = 8, 2, 4
DENSITY = 0.25


class RandomTokens(torch.utils.data.Dataset):
    """64 sequences of 16 random tokens (vocabulary 100), labels = inputs (causal language modelling)."""

    def __init__(self) -> None:
        self.tokens = torch.randint(0, 100, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(output_dir, callback: SparseTrainerCallback, **args) -> transformers.Trainer:
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        save_strategy="steps", save_steps=4, logging_steps=100, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **args,
    )  # fmt: skip
    trainer = transformers.Trainer(model=gpt2(), args=arguments, train_dataset=RandomTokens())
    callback.attach(trainer)
    return trainer


def rigl() -> SparseTrainerCallback:
    # an update every 2 steps over the whole run (RigL's default window ends at 75 %, where the cosine rate is 0)
    return SparseTrainerCallback(density=DENSITY, algorithm="rigl", update_interval=INTERVAL, stop_at=1.0, seed=0,
                                 mask_kernel="torch")  # no C++ build in this test


def off_mask_zero(model: torch.nn.Module, masks) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[name][~mask] == 0).all()) for name, mask in masks.items())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run of reference: 8 steps, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("full")
    sparse = rigl()
    trainer = make_trainer(out, sparse)
    trainer.train()
    return out, sparse, trainer


def test_rigl_trains_sparse_under_the_trainer(uninterrupted):
    out, sparse, trainer = uninterrupted
    masks = sparse.masks
    # GPT-2's Conv1D layers: c_attn, c_proj (attention), c_fc, c_proj (MLP) of 2 blocks; the tied lm_head and the
    # embeddings stay dense
    assert len(masks) == 8 and all(name.endswith(".weight") for name in masks)
    assert all(".h." in name for name in masks)
    assert off_mask_zero(trainer.model, masks)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(DENSITY * total, abs=len(masks))
    # RigL every 2 steps: updates at steps 2, 4 and 6 (none after the last step)
    assert sparse.sparsifier.num_updates == 3 and sparse.sparsifier.last_update_step == 6
    rows = [row for row in trainer.state.log_history if "sparse/prune_rate" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]  # logged at the update's own step (log_updates=True)
    assert [row["sparse/num_updates"] for row in rows] == [1.0, 2.0, 3.0]
    for row in rows:
        assert row["sparse/grown"] == row["sparse/pruned"] > 0  # the number of active weights is kept
        assert row["sparse/density"] == pytest.approx(DENSITY, abs=len(masks) / total)
    assert rows[0]["sparse/prune_rate"] > rows[-1]["sparse/prune_rate"]  # cosine decay
    # the checkpoints hold the Sparsifier's state at their step
    for step, updates in ((4, 2), (8, 3)):
        saved = torch.load(out / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert saved["step_count"] == step and saved["num_updates"] == updates
    final = torch.load(out / "checkpoint-8" / STATE_FILE, weights_only=True)
    assert all(torch.equal(final["masks"][name], mask.cpu()) for name, mask in masks.items())


def test_resumed_run_continues_the_masks_and_schedule(uninterrupted, tmp_path):
    out, sparse, trainer = uninterrupted
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")  # a run stopped after step 4
    resumed = rigl()
    second = make_trainer(tmp_path, resumed)
    before = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=True)
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == STEPS
    assert resumed.sparsifier.num_updates == 3 and resumed.sparsifier.last_update_step == 6
    rows = [row["step"] for row in second.state.log_history if "sparse/prune_rate" in row]
    assert rows[-1] == 6 and 4 not in rows[rows.index(6) :]  # only the update after the resume point is new
    assert off_mask_zero(second.model, resumed.masks)
    # the same masks and weights as the uninterrupted run (RigL's random state and the data order are restored)
    assert set(resumed.masks) == set(sparse.masks)
    assert any(not torch.equal(before["masks"][n], resumed.masks[n]) for n in resumed.masks)  # step 6 changed them
    for name, mask in sparse.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for (name, p), q in zip(trainer.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(q, p, msg=name)


def test_resuming_without_the_sparse_state_is_refused(uninterrupted, tmp_path):
    out, _, _ = uninterrupted
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    second = make_trainer(tmp_path, rigl())
    with pytest.raises(FileNotFoundError, match=r"resumes at step 4, but .*sparse_trainer_state\.pt"):
        second.train(resume_from_checkpoint=True)


def test_options_are_checked():
    with pytest.raises(ValueError, match="not 'dst'"):
        SparseTrainerCallback(algorithm="dst")
    with pytest.raises(ValueError, match="density"):
        SparseTrainerCallback(density=1.5)
    with pytest.raises(ValueError, match="`log_updates` must be True or False"):
        SparseTrainerCallback(density=0.1, log_updates="yes")
    with pytest.raises(RuntimeError, match="no masks yet"):
        SparseTrainerCallback(density=0.1).masks
