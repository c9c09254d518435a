"""Issue 12: Transformers masked too — MultiheadAttention projections, timm ViT blocks, Hugging Face GPT-2
(`Conv1D`, tied embeddings), density groups, parametrized layers, several callbacks."""

from __future__ import annotations

import fnmatch

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import SparseOptions, SparseTrainingCallback, Sparsifier
from lightning_sparse.core.layers import find_layers
from lightning_sparse.functional import layer_active_counts
from lightning_sparse.methods import dst
from lightning_sparse.methods.dst_sparsifier import prepare_model
from tests.helpers import trainer

torch.manual_seed(0)
TOKENS = torch.randint(0, 50, (64, 8))
LABELS = torch.randint(0, 4, (64,))


def _loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(TOKENS, LABELS), batch_size=batch_size)


class Encoder(L.LightningModule):
    """Embedding → nn.TransformerEncoder (2 layers, 2 heads) → Linear classifier."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ZeroOutside(Callback):
    """After every optimizer step: every masked weight is zero outside its mask; records per-group totals."""

    def __init__(self, *sparse: SparseTrainingCallback) -> None:
        self.sparse = sparse
        self.steps = 0
        self.totals: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        params = dict(pl_module.named_parameters())
        totals: dict[str, int] = {}
        for cb in self.sparse:
            groups = dict(zip(cb.sparsifier.names, cb.sparsifier.layer_groups))
            for name, mask in cb.masks.items():
                assert int((params[name].detach()[~mask] != 0).sum()) == 0, name
                totals[groups[name]] = totals.get(groups[name], 0) + int(mask.sum())
        self.totals.append(totals)
        self.steps += 1


ENCODER_MASKED = {
    f"encoder.layers.{i}.{p}"
    for i in (0, 1)
    for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
} | {"head.weight"}


def test_transformer_encoder_masks_qkv_and_keeps_them_zero():
    cb = SparseTrainingCallback(density=0.3, algorithm="rigl", update_interval=2, seed=0, figure=False)
    check = ZeroOutside(cb)
    trainer(max_epochs=2, callbacks=[cb, check]).fit(Encoder(), _loader())
    assert set(cb.masks) == ENCODER_MASKED  # Q/K/V projection included; the embedding is not masked
    assert check.steps == 8 and cb.state_dict()["num_updates"] >= 2
    assert cb.sparsifier.layers["encoder.layers.0.self_attn.in_proj_weight"].heads == 2
    assert "embed.weight" not in cb.sparsifier.left_dense  # 800 weights: small, not listed


@pytest.mark.parametrize("algorithm", ["sparse_momentum", "rigl", "set"])
def test_density_groups_keep_exact_totals_after_every_update(algorithm):
    # a Sparsifier-level fact: a plain loop of 2 epochs of 4 batches, the calls the callback makes
    groups = {"*.self_attn.*": 0.5, "*.linear?": 0.1, "*": 0.2}
    model = Encoder()
    optimizer = model.configure_optimizers()
    sparsifier = Sparsifier(model, optimizer, density=groups, algorithm=algorithm, update_interval=2, seed=0,
                            total_steps=8)  # fmt: skip
    params = dict(model.named_parameters())
    totals: list[dict[str, int]] = []
    for step, batch in enumerate([*_loader(), *_loader()], start=1):
        model.training_step(batch, 0).backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step(step)  # with the gradients (RigL reads them): Lightning zeroes them at the next step
        optimizer.zero_grad()
        counts: dict[str, int] = {}
        for name, group in zip(sparsifier.names, sparsifier.layer_groups):
            mask = sparsifier.masks[name]
            assert int((params[name].detach()[~mask] != 0).sum()) == 0, name
            counts[group] = counts.get(group, 0) + int(mask.sum())
        totals.append(counts)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    members: dict[str, list[str]] = {}
    for name, group in zip(sparsifier.names, sparsifier.layer_groups):
        assert group == next(g for g in groups if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rpartition(".")[0], g))
        members.setdefault(group, []).append(name)
    init = sparsifier.options.init  # the initial counts are the init's, within each group
    expected = {g: sum(layer_active_counts([shapes[n] for n in names], groups[g], init)) for g, names in members.items()}
    assert sparsifier.num_updates >= 3
    assert all(t == expected for t in totals), (expected, totals[-1])
    # sparse momentum moves weights between layers, but only within a group
    assert set(expected) == set(groups)


def test_density_mapping_without_star_leaves_the_rest_dense():
    cb = SparseTrainingCallback(density={"*.self_attn.*": 0.5}, seed=0, figure=False)
    model = Encoder()
    trainer(max_epochs=1, callbacks=[cb]).fit(model, _loader())
    assert set(cb.masks) == {f"encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj_weight", "out_proj.weight")}
    assert cb.sparsifier.left_dense == {}  # the linear layers (512 weights) are below the size that is listed
    assert bool((model.encoder.layers[0].linear1.weight != 0).all())


def test_resume_with_other_density_groups_is_refused(tmp_path):
    cb = SparseTrainingCallback(density={"*.self_attn.*": 0.5, "*": 0.2}, seed=0, figure=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(max_epochs=1, callbacks=[cb, ckpt], enable_checkpointing=True).fit(Encoder(), _loader())
    other = SparseTrainingCallback(density={"*.self_attn.*": 0.4, "*": 0.2}, seed=0, figure=False)
    with pytest.raises(ValueError, match=r"trained with density groups \{'\*.self_attn.\*': 0.5, '\*': 0.2\}, this run"):
        trainer(max_epochs=2, callbacks=[other]).fit(Encoder(), _loader(), ckpt_path=tmp_path / "last.ckpt")


def test_separate_q_k_v_projections_are_masked():
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, batch_first=True)
    found = find_layers(nn.ModuleDict({"attn": mha}))
    assert list(found.masked) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"]
    assert all(found.masked[f"attn.{p}_proj_weight"].heads == 4 for p in "qkv")


def test_timm_vit_blocks():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2
    )
    found = find_layers(vit)
    blocks = {f"blocks.{i}.{p}.weight" for i in (0, 1) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(found.masked) == blocks | {"patch_embed.proj.weight", "head.weight"}
    optimizer = torch.optim.SGD(vit.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(vit, optimizer, density={"*.attn.*": 0.3, "*.mlp.*": 0.1}, seed=0, total_steps=4,
                            update_interval=2)  # fmt: skip
    assert set(sparsifier.names) == blocks  # patch embedding and head: no group, left dense
    for _ in range(4):
        vit(torch.randn(4, 1, 16, 16)).sum().backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    params = dict(vit.named_parameters())
    for name, mask in sparsifier.masks.items():
        assert int((params[name].detach()[~mask] != 0).sum()) == 0
    attn = sum(int(sparsifier.masks[n].sum()) for n in blocks if ".attn." in n)
    assert attn == sum(round(0.3 * params[n].numel()) for n in blocks if ".attn." in n)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=300, n_positions=8)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_layers_and_tied_embedding():
    model = _gpt2()
    found = find_layers(model)
    expected = {f"transformer.h.{i}.{p}.weight" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(found.masked) == expected
    assert all(found.masked[n].transposed for n in expected)  # Conv1D: [in, out]
    assert found.masked["transformer.h.0.mlp.c_fc.weight"].out_dim == 1
    # lm_head shares the embedding table: not masked by default, listed under the name named_parameters() gives
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert found.dense["transformer.wte.weight"].startswith("embedding tied to lm_head.weight")
    with_embeddings = find_layers(model, mask_embeddings=True)
    assert "transformer.wte.weight" in with_embeddings.masked and "lm_head.weight" not in with_embeddings.masked
    assert with_embeddings.masked["transformer.wte.weight"].kind == "embedding"


def test_gpt2_trains_sparse_with_tied_embedding_masked_once():
    model = _gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.2, mask_embeddings=True, seed=0, total_steps=4,
                            update_interval=2)  # fmt: skip
    assert "transformer.wte.weight" in sparsifier.masks and "transformer.wpe.weight" in sparsifier.masks
    tokens = torch.randint(0, 300, (2, 8))
    for _ in range(4):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    wte = sparsifier.masks["transformer.wte.weight"]
    assert torch.equal(model.lm_head.weight != 0, (model.transformer.wte.weight != 0))  # still one tensor
    assert int((model.lm_head.weight.detach()[~wte] != 0).sum()) == 0


def test_parametrized_layers_are_refused_or_kept_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(8, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"cannot mask 2.weight \(parametrized: _WeightNorm\).*`dense_layers`"):
        Sparsifier(model, optimizer, total_steps=100, density=0.5)
    assert list(Sparsifier(model, optimizer, total_steps=100, density=0.5, dense_layers=["2"]).masks) == ["0.weight"]
    spectral = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Linear(8, 2))  # the old hook-based one
    with pytest.raises(ValueError, match=r"cannot mask 0.weight \(computed by a forward hook"):
        Sparsifier(spectral, torch.optim.SGD(spectral.parameters(), lr=0.1, momentum=0.9), total_steps=100, density=0.5)


def test_dst_setup_keeps_a_parametrized_layer_dense_when_listed():
    """DST attaches its thresholds in `setup` (`prepare_model`) with the run's options: a weight_norm layer in
    `dense_layers` is left alone there too, and refused by name when not listed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(8, 4)))
    prepare_model(model, SparseOptions.resolve(algorithm="dst", dense_layers=("2",)))
    assert dst.thresholded(model[0]) and not dst.thresholded(model[2])
    with pytest.raises(ValueError, match=r"cannot mask 0.weight \(parametrized: _WeightNorm\)"):
        prepare_model(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 4))),
                      SparseOptions.resolve(algorithm="dst"))  # fmt: skip
    later = nn.Module()  # layers built in `configure_model`: nothing to do yet
    prepare_model(later, SparseOptions.resolve(algorithm="dst", dense_layers=("fc",)))
    assert not any(dst.thresholded(m) for m in later.modules())


def test_two_callbacks_on_disjoint_groups_checkpoint_and_resume(tmp_path):
    def callbacks(seed=0):
        attention = SparseTrainingCallback(density={"*.self_attn.*": 0.5}, algorithm="rigl", update_interval=2,
                                           seed=seed, figure=False)  # fmt: skip
        rest = SparseTrainingCallback(density=0.2, dense_layers=["*.self_attn.*"], seed=seed, figure=False)
        return attention, rest

    def fit(root, epochs, ckpt_path=None):
        attention, rest = callbacks()
        check = ZeroOutside(attention, rest)
        ckpt = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        model = Encoder()
        L.seed_everything(0)
        t = trainer(max_epochs=epochs, callbacks=[attention, rest, check, ckpt], enable_checkpointing=True)
        t.fit(model, _loader(), ckpt_path=ckpt_path)
        trainer_metrics.update(t.callback_metrics)
        return attention, rest, model

    trainer_metrics: dict = {}
    attention, rest, model = fit(tmp_path / "full", 3)
    assert attention.state_key != rest.state_key
    metrics = set(trainer_metrics)  # each callback logs under its own prefix
    assert {"sparse/0/density", "sparse/1/density"} <= metrics and "sparse/density" not in metrics
    assert not set(attention.masks) & set(rest.masks) and set(attention.masks) | set(rest.masks) == ENCODER_MASKED
    states = torch.load(tmp_path / "full" / "epoch=0.ckpt", weights_only=True)["callbacks"]
    assert {attention.state_key, rest.state_key} <= set(states)
    attention2, rest2, resumed = fit(tmp_path / "resumed", 3, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    for a, b in ((attention, attention2), (rest, rest2)):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_overlapping_callbacks_are_refused_before_any_weight_changes():
    model = Encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = SparseTrainingCallback(density={"*.self_attn.*": 0.5}, seed=0, figure=False)
    second = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    with pytest.raises(ValueError, match=r"two SparseTrainingCallbacks mask the same weights \['encoder.layers.0.self_attn.in_proj_weight'"):
        trainer(max_epochs=1, callbacks=[first, second]).fit(model, _loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dst_on_attention_and_conv1d_weights():
    model = Encoder()
    cb = SparseTrainingCallback(algorithm="dst", seed=0, figure=False)
    trainer(max_epochs=2, callbacks=[cb]).fit(model, _loader())
    assert set(cb.masks) == ENCODER_MASKED
    assert not any("parametrizations" in n for n, _ in model.named_parameters())  # plain again after fit
    weights = dict(model.named_parameters())
    assert all(int((weights[n].detach()[~m] != 0).sum()) == 0 for n, m in cb.masks.items())

    gpt2 = _gpt2()
    optimizer = torch.optim.Adam(gpt2.parameters(), lr=1e-2)
    sparsifier = Sparsifier(gpt2, optimizer, algorithm="dst")
    c_fc = sparsifier.thresholds["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.dim == 1 and c_fc.threshold.shape == (64,)  # one threshold per output channel: columns of [in, out]
    tokens = torch.randint(0, 300, (2, 8))
    gpt2(tokens, labels=tokens).loss.backward()
    sparsifier.before_optimizer_step()
    optimizer.step()
    sparsifier.step()
    sparsifier.finish()
    assert set(gpt2.state_dict()) >= {"transformer.h.0.mlp.c_fc.weight"}
