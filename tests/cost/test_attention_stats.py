"""Attention statistics (empty heads) and the channel axes of transposed (``transformers`` ``Conv1D``) weights:
the pure functions on hand-made masks, their layout in real modules, the cost model of attention projections
and Conv1D layers, and the callback's logged metrics (row shards over 2 CPU processes: test_sharded_stats.py)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import SparseTrainingCallback, Sparsifier
from lightning_sparse.core.layers import find_attention
from lightning_sparse.cost import (
    AttentionHeads,
    ChainLink,
    CostModel,
    InputCapture,
    LayerCall,
    SparsityReport,
    attention_empty_heads,
    call_flops,
    channel_stats,
    empty_heads,
)
from tests.helpers import trainer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2(**config: Any) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8, **config)
    return transformers.GPT2LMHeadModel(cfg)


# ----------------------------------------------------------------------------- the pure function


def test_empty_heads_of_a_packed_in_proj_weight():
    e, heads = 8, 4  # head_dim 2: head h is rows 2h, 2h+1 of Q (0-7), K (8-15) and V (16-23)
    mask = torch.ones(3 * e, e, dtype=torch.bool)
    assert empty_heads(mask, heads) == 0.0
    mask[2:4] = False  # Q of head 1
    assert empty_heads(mask, heads) == 0.25
    mask[8 + 2 : 8 + 4] = False  # K of head 1 too: still one head
    assert empty_heads(mask, heads) == 0.25
    mask[16 + 6] = False  # one of V's two rows of head 3: not empty
    assert empty_heads(mask, heads) == 0.25
    mask[16 + 7, :-1] = False  # the other row keeps one active weight
    assert empty_heads(mask, heads) == 0.25
    mask[16 + 7, -1] = False
    assert empty_heads(mask, heads) == 0.5
    assert empty_heads(torch.zeros(3 * e, e, dtype=torch.bool), heads) == 1.0
    # a weight: non-zero is active
    assert empty_heads(torch.randn(3 * e, e) * mask, heads) == 0.5


def test_empty_heads_of_separate_q_k_v_projections_of_other_widths():
    e, heads = 8, 4
    q, k, v = torch.ones(e, e, dtype=torch.bool), torch.ones(e, 5, dtype=torch.bool), torch.ones(e, 3, dtype=torch.bool)
    k[0:2] = False  # K of head 0
    v[4:6] = False  # V of head 2
    assert empty_heads([q, k, v], heads) == 0.5
    assert empty_heads([q, k, v], heads, parts=3) == empty_heads([q, k, v], heads)
    assert empty_heads(k, heads, parts=1) == 0.25  # one projection alone


def test_empty_heads_of_a_timm_style_qkv_linear():
    dim, heads = 12, 3  # timm: qkv(x).reshape(B, N, 3, heads, head_dim): out = part * dim + head * 4 + d
    weight = torch.randn(3 * dim, dim)
    assert empty_heads(weight, heads) == 0.0
    weight[2 * dim + 8 : 2 * dim + 12] = 0.0  # V of head 2
    weight[dim + 0 : dim + 3] = 0.0  # 3 of the 4 K rows of head 0: not empty
    assert empty_heads(weight, heads) == pytest.approx(1 / 3)
    timm = pytest.importorskip("timm")
    attention = timm.models.vision_transformer.Attention(dim, num_heads=heads)
    assert find_attention(attention) == {"": AttentionHeads(("qkv.weight",), heads, 3)}


def test_empty_heads_of_a_gpt2_style_transposed_c_attn():
    e, heads = 8, 2  # c_attn.weight is [E, 3E]: columns Q | K | V, head h = columns h*4 .. h*4+3 of each
    mask = torch.ones(e, 3 * e, dtype=torch.bool)
    mask[:, e + 4 : e + 8] = False  # K columns of head 1
    assert empty_heads(mask, heads, out_dim=1) == 0.5
    assert empty_heads(mask.t(), heads) == 0.5
    mask2 = torch.ones(e, 3 * e, dtype=torch.bool)
    mask2[4:8] = False  # rows = input channels: no head loses a projection
    assert empty_heads(mask2, heads, out_dim=1) == 0.0


def test_empty_heads_refuses_bad_layouts():
    with pytest.raises(ValueError, match="not 3 part"):
        empty_heads(torch.ones(10, 4, dtype=torch.bool), heads=2)
    with pytest.raises(ValueError, match="positive integers"):
        empty_heads(torch.ones(12, 4, dtype=torch.bool), heads=0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        empty_heads(torch.ones(12, dtype=torch.bool), heads=2)
    with pytest.raises(ValueError, match="non-empty"):
        empty_heads([], heads=2)


# ----------------------------------------------------------------------------- the layouts are the modules' own


def test_row_layout_matches_nn_multihead_attention():
    """Zeroing the K rows (and bias) of head 1 makes its attention uniform: the rows are that head's keys."""
    torch.manual_seed(0)
    e, heads, hd = 8, 4, 2
    mha = nn.MultiheadAttention(e, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight[e + hd : e + 2 * hd] = 0.0
        mha.in_proj_bias[e + hd : e + 2 * hd] = 0.0
    x = torch.randn(2, 5, e)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)  # [N, heads, L, S]
    assert torch.allclose(weights[:, 1], torch.full_like(weights[:, 1], 1 / 5))
    assert not torch.allclose(weights[:, 0], torch.full_like(weights[:, 0], 1 / 5))
    assert empty_heads(mha.in_proj_weight.detach(), heads) == 0.25


def test_column_layout_matches_gpt2_attention():
    """Zeroing the K columns (and bias) of head 1 of GPT-2's c_attn makes its causal attention uniform."""
    model = _gpt2(attn_implementation="eager")
    attn = model.transformer.h[0].attn
    e, hd = 16, 8
    with torch.no_grad():
        attn.c_attn.weight[:, e + hd : e + 2 * hd] = 0.0
        attn.c_attn.bias[e + hd : e + 2 * hd] = 0.0
    model.eval()
    out = model(torch.randint(0, 50, (1, 6)), output_attentions=True)
    weights = out.attentions[0][0]  # [heads, L, L], causal
    uniform = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7).unsqueeze(1)
    assert torch.allclose(weights[1], uniform, atol=1e-6)
    assert not torch.allclose(weights[0], uniform, atol=1e-3)
    assert empty_heads(attn.c_attn.weight.detach(), 2, out_dim=1) == 0.5


def test_find_attention_in_torch_and_transformers_models():
    layer = nn.TransformerEncoderLayer(16, 2, 32)
    assert find_attention(layer) == {"self_attn": AttentionHeads(("self_attn.in_proj_weight",), 2, 3)}
    separate = nn.Sequential(nn.MultiheadAttention(8, 4, kdim=5, vdim=3))
    assert find_attention(separate) == {
        "0": AttentionHeads(("0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight"), 4, 3)
    }
    assert find_attention(_gpt2()) == {
        "transformer.h.0.attn": AttentionHeads(("transformer.h.0.attn.c_attn.weight",), 2, 3)
    }
    cross = find_attention(_gpt2(add_cross_attention=True))
    assert cross["transformer.h.0.crossattention"] == AttentionHeads(
        ("transformer.h.0.crossattention.q_attn.weight", "transformer.h.0.crossattention.c_attn.weight"), 2, 3
    )
    assert find_attention(nn.Linear(4, 4)) == {}


# ----------------------------------------------------------------------------- several layers, transposed axes


def test_attention_empty_heads_and_channel_stats_of_transposed_layers():
    g = torch.Generator().manual_seed(1)
    packed = torch.rand(24, 8, generator=g) < 0.5
    packed[0:2] = False
    c_attn = torch.rand(8, 24, generator=g) < 0.5  # [in, out]
    c_attn[:, 20:24] = False  # V of head 1
    c_attn[3] = False  # an empty input row
    layers = {"mha.in_proj_weight": packed, "gpt.c_attn.weight": c_attn}
    attention = {
        "mha": AttentionHeads(("mha.in_proj_weight",), 4),
        "gpt": AttentionHeads(("gpt.c_attn.weight",), 2),
    }
    got = attention_empty_heads(attention, layers, transposed={"gpt.c_attn.weight"})
    assert got == {"mha": empty_heads(packed, 4), "gpt": empty_heads(c_attn, 2, out_dim=1)}
    assert got["gpt"] == 0.5 and got["mha"] >= 0.25
    stats = channel_stats(list(layers), list(layers.values()), transposed={"gpt.c_attn.weight"})
    assert stats["gpt.c_attn.weight"] == channel_stats(["x"], [c_attn.t()])["x"]
    assert stats["gpt.c_attn.weight"].empty_out == pytest.approx(4 / 24)
    assert stats["gpt.c_attn.weight"].empty_in == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="not in `layers`"):
        attention_empty_heads({"m": AttentionHeads(("nope",), 2)}, layers)
    with pytest.raises(ValueError, match="2-D \\[in, out\\] mask"):
        channel_stats(["a"], [torch.ones(2, 3, 3, dtype=torch.bool)], transposed={"a"})
    # a transposed layer feeding a linear one through a chain link: its columns are the outputs that idle
    fed = torch.ones(5, 24, dtype=torch.bool)
    linked = channel_stats(
        ["gpt.c_attn.weight", "fed"], [c_attn, fed], {"fed": ChainLink("gpt.c_attn.weight")},
        transposed={"gpt.c_attn.weight"},
    )  # fmt: skip
    assert linked["fed"].empty_in == pytest.approx(4 / 24)


def test_conv1d_channel_axes_through_the_sparsifier_report():
    """A hand-made mask on GPT-2's c_fc ([16 in, 64 out]) with column 3 all False: 1 empty output channel of
    64, no empty input channel (a row would be 1/16 of the inputs)."""
    model = _gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="static")
    assert sparsifier.layers["transformer.h.0.mlp.c_fc.weight"].transposed
    state = sparsifier.state_dict()
    mask = torch.ones(16, 64, dtype=torch.bool)
    mask[:, 3] = False
    state["masks"]["transformer.h.0.mlp.c_fc.weight"] = mask
    sparsifier.load_state_dict(state)
    x = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace GPT-2: no chain links
        report = SparsityReport(cost_model=CostModel.build(model, "", x))
    layers, layout = sparsifier.report_layers(report.cost_model.flops)
    assert "transformer.h.0.mlp.c_fc.weight" in layout["transposed"]
    stats = report.measure(0, layers, **layout)
    c_fc = stats["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.empty_out == 1 / 64 and c_fc.empty_in == 0.0 and c_fc.density == 63 / 64
    metrics = report.metrics(stats)
    assert metrics["sparse/empty_out/transformer.h.0.mlp.c_fc.weight"] == 1 / 64
    assert metrics["sparse/empty_in/transformer.h.0.mlp.c_fc.weight"] == 0.0
    heads = empty_heads(sparsifier.masks["transformer.h.0.attn.c_attn.weight"], 2, out_dim=1)
    assert metrics["sparse/empty_heads/transformer.h.0.attn"] == heads
    assert "empty attention heads" in report.table(stats)
    # Conv1D layers are costed: 2 * tokens * in * out
    assert report.cost_model.flops["transformer.h.0.mlp.c_fc.weight"] == 2 * 16 * 16 * 64
    assert report.cost_model.flops["transformer.h.0.attn.c_attn.weight"] == 2 * 16 * 16 * 48
    # the empty column is an empty output channel of c_fc: it removes 1/64 of c_fc's cost from the dense-conv
    # estimate (at least: the random masks of the other layers may have empty channels too)
    costs = {n: c for n, c in report.cost_model.costs.items() if n in stats}
    expected = sum(costs.values()) / (sum(costs.values()) - costs["transformer.h.0.mlp.c_fc.weight"] / 64)
    assert report.speedups(stats)["speedup_dense_conv"] >= expected * (1 - 1e-12)


# ----------------------------------------------------------------------------- cost model


def test_cost_model_counts_attention_projections_and_conv1d():
    torch.manual_seed(0)
    e, tokens = 16, 4 * 5
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(e, 2, 32, batch_first=True, dropout=0.0), 1, enable_nested_tensor=False
    )
    x = torch.randn(4, 5, e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no chain links through a TransformerEncoder
        built = CostModel.build(encoder, "enc", x)
    assert built.flops == {
        "enc.layers.0.self_attn.in_proj_weight": 2 * tokens * 3 * e * e,  # 3E x E per token
        "enc.layers.0.self_attn.out_proj.weight": 2 * tokens * e * e,
        "enc.layers.0.linear1.weight": 2 * tokens * e * 32,  # seen although eval mode has a fused fast path
        "enc.layers.0.linear2.weight": 2 * tokens * 32 * e,
    }
    assert built.groups["enc.layers.0.self_attn.in_proj_weight"] == 1
    # the same from the shapes of a training step (FSDP2's path)
    capture = InputCapture(encoder, ["layers.0.self_attn", "layers.0.linear1"])
    encoder(x)
    assert capture.cost_model(measure_time=False, sharded=True).flops == {
        n.removeprefix("enc."): f for n, f in built.flops.items()
    }
    # separate projections with other key/value widths: Q on the queries, K and V on the keys/values
    mha = nn.MultiheadAttention(e, 2, kdim=8, vdim=4)
    call = LayerCall((5, 3, e), (5, 3, e), ((7, 3, 8), (7, 3, 4)))
    assert call_flops(mha, call, "q_proj_weight") == 2 * 15 * e * e
    assert call_flops(mha, call, "k_proj_weight") == 2 * 21 * 8 * e
    assert call_flops(mha, call, "v_proj_weight") == 2 * 21 * 4 * e
    assert call_flops(mha.out_proj, call) == 2 * 15 * e * e
    with pytest.raises(ValueError, match="one of its projections"):
        call_flops(mha, call)
    wrapper = nn.ModuleDict({"attn": mha})
    capture = InputCapture(wrapper, ["attn"])
    mha(torch.randn(5, 3, e), torch.randn(7, 3, 8), torch.randn(7, 3, 4))
    assert capture.cost_model(measure_time=False, sharded=True).flops == {
        "attn.q_proj_weight": 2 * 15 * e * e,
        "attn.k_proj_weight": 2 * 21 * 8 * e,
        "attn.v_proj_weight": 2 * 21 * 4 * e,
        "attn.out_proj.weight": 2 * 15 * e * e,
    }
    gpt2 = _gpt2()
    assert call_flops(gpt2.transformer.h[0].mlp.c_fc, LayerCall((2, 8, 16), (2, 8, 64))) == 2 * 16 * 16 * 64


def test_measured_times_split_the_attention_module_time():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1, enable_nested_tensor=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = CostModel.build(encoder, "", torch.randn(5, 3, 16), measure_time=True)
    assert built.times is not None and list(built.times) == list(built.flops)
    in_proj = built.times["layers.0.self_attn.in_proj_weight"]
    out_proj = built.times["layers.0.self_attn.out_proj.weight"]
    assert in_proj > 0 and out_proj > 0
    assert in_proj / out_proj == pytest.approx(3.0)  # in proportion of their FLOPs


def test_empty_rows_of_an_attention_projection_reduce_its_cost():
    torch.manual_seed(0)
    e, tokens = 16, 20
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(e, 2, 32, batch_first=True, dropout=0.0), 1, enable_nested_tensor=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = SparsityReport(cost_model=CostModel.build(encoder, "", torch.randn(4, 5, e)))
    names = list(report.cost_model.flops)
    layers = {n: torch.ones_like(p, dtype=torch.bool) for n, p in encoder.named_parameters() if n in names}
    layers["layers.0.self_attn.in_proj_weight"][2 * e : 2 * e + 8] = False  # V of head 0: 8 of 48 rows
    stats = report.measure(0, layers, attention=find_attention(encoder))
    assert stats["layers.0.self_attn.in_proj_weight"].empty_out == 8 / 48
    assert stats.empty_heads == {"layers.0.self_attn": 0.5}
    flops = report.cost_model.flops
    total = sum(flops.values())
    expected = total / (total - flops["layers.0.self_attn.in_proj_weight"] * 8 / 48)
    assert report.speedups(stats)["speedup_dense_conv"] == pytest.approx(expected)
    assert flops["layers.0.self_attn.in_proj_weight"] == 2 * tokens * 3 * e * e


# ----------------------------------------------------------------------------- the callback


class _Encoder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 8, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _random_loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 5, 16, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=16)  # fmt: skip


def test_callback_logs_empty_heads_of_the_final_masks():
    callback = SparseTrainingCallback(density=0.05, init="uniform", figure=False)
    t = trainer(max_epochs=2, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(_Encoder(), _random_loader())
    key = "sparse/empty_heads/enc.layers.0.self_attn"
    value = t.callback_metrics[key].item()
    assert 0.0 <= value <= 1.0
    mask = callback.masks["enc.layers.0.self_attn.in_proj_weight"]
    assert value == pytest.approx(empty_heads(mask, 8))
    assert value > 0  # at density 0.05 some of the 8 heads lose a projection
    flops = callback._report.cost_model.flops
    assert flops["enc.layers.0.self_attn.in_proj_weight"] == 2 * 16 * 5 * 3 * 16 * 16
    assert "sparse/empty_out/enc.layers.0.self_attn.in_proj_weight" in t.callback_metrics
    assert t.callback_metrics["sparse/speedup_dense_conv"].item() >= 1.0
    assert "empty attention heads" in callback.summary()


class _GPT2Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _gpt2()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_callback_logs_conv1d_channels_on_their_right_axes():
    module = _GPT2Module()
    state = Sparsifier(module, module.configure_optimizers(), density=0.5, algorithm="static").state_dict()
    mask = torch.ones(16, 64, dtype=torch.bool)
    mask[:, 3] = False
    state["masks"]["model.transformer.h.0.mlp.c_fc.weight"] = mask
    state["train_flops"] = {"sparse": 0.0, "dense": 0.0, "step": 0}  # as the callback's checkpoints hold
    callback = SparseTrainingCallback(density=0.5, algorithm="static", figure=False)
    callback.load_state_dict(state)
    ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    t = trainer(max_epochs=1, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, DataLoader(TensorDataset(ids), batch_size=8))
    m = t.callback_metrics
    assert m["sparse/empty_out/model.transformer.h.0.mlp.c_fc.weight"].item() == pytest.approx(1 / 64)
    assert m["sparse/empty_in/model.transformer.h.0.mlp.c_fc.weight"].item() == 0.0
    heads = empty_heads(callback.masks["model.transformer.h.0.attn.c_attn.weight"], 2, out_dim=1)
    assert m["sparse/empty_heads/model.transformer.h.0.attn"].item() == pytest.approx(heads)
    flops = callback._report.cost_model.flops
    assert flops["model.transformer.h.0.mlp.c_fc.weight"] == 2 * 8 * 8 * 16 * 64
