"""Channel statistics and empty attention heads of masks sharded by rows over 2 CPU processes (gloo), as FSDP2's
``Shard(0)`` places them, equal the statistics of the full masks exactly. One process launch for the file
(``shard_dir``): each process computes every case, the tests compare."""

from __future__ import annotations

import math
import socket
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.cost import (
    AttentionHeads,
    ChainLink,
    CostModel,
    SparsityReport,
    attention_empty_heads,
    channel_stats,
    empty_heads,
)

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` when ``n_rows`` are split like ``torch.chunk`` (the last ranks may get
    fewer rows, or none)."""
    chunk = math.ceil(n_rows / world)
    return min(n_rows, rank * chunk), min(n_rows, (rank + 1) * chunk)


def _cases() -> list[dict[str, Any]]:
    """Full masks of a small conv net; ``whole`` layers are held whole by every process (not sharded)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, density: float = 0.4) -> torch.Tensor:
        return torch.rand(*shape, generator=g) < density

    names = ["conv.weight", "gconv.weight", "head.weight", "fc.weight", "tiny.weight", "dense.weight"]
    links = {
        "gconv.weight": ChainLink("conv.weight"),  # conv (6 out) -> grouped conv (6 in)
        "head.weight": ChainLink("conv.weight", repeat=4),  # conv -> flatten [6, 2, 2] -> linear
        "tiny.weight": ChainLink("fc.weight"),
    }
    groups = {"gconv.weight": 3}
    conv = rand(6, 3, 3, 3)
    conv[1] = False  # empty output channels on both ranks (rows 0-2 | 3-5)
    conv[4] = False
    conv[:, 2] = False  # an empty input channel, spread over both ranks
    gconv = rand(6, 2, 3, 3, density=0.6)  # groups of 2 rows: group 1 (rows 2, 3) straddles the ranks
    gconv[2:4, 0] = False  # real input channel 2 (group 1, index 0) empty: one row on each rank
    gconv[4, 1] = False  # index 1 of group 2 half empty: not an empty channel
    head = rand(4, 24)
    head[:, 0:2] = False
    fc = torch.randn(7, 10) * rand(7, 10, density=0.5)  # a weight: non-zero is active; rows 0-3 | 4-6
    fc[:, 9] = 0.0
    fc[5] = 0.0
    tiny = rand(1, 7, density=0.9)  # 1 row: rank 1 holds none
    tiny[0, 3] = False
    dense = torch.randn(3, 6) * rand(3, 6, density=0.7)  # held whole by both processes
    first = {"names": names, "masks": [conv, gconv, head, fc, tiny, dense], "links": links, "groups": groups}
    # the same net with more emptied: a whole grouped conv empty, a row block empty on one rank only
    conv2, gconv2, fc2 = conv.clone(), torch.zeros_like(gconv), fc.clone()
    conv2[3:] = False
    fc2[:4] = 0.0
    second = dict(first, masks=[conv2, gconv2, head, fc2, tiny, dense])
    third = {"names": ["solo.weight"], "masks": [rand(5, 3, 2)], "links": {}, "groups": {}}  # Conv1d weight
    return [dict(case, whole={"dense.weight"}) for case in (first, second, third)]


def _shard(case: dict[str, Any], rank: int, world: int) -> tuple[list[torch.Tensor], dict[str, ShardSpec]]:
    """This rank's row blocks, and their specs (the layers in ``case["whole"]`` are held whole: no spec)."""
    specs, local = {}, []
    for name, mask in zip(case["names"], case["masks"]):
        if name in case["whole"]:
            local.append(mask)
            continue
        start, stop = _rows(mask.shape[0], rank, world)
        local.append(mask[start:stop])
        specs[name] = ShardSpec(tuple(mask.shape), start, stop - start, dist.group.WORLD)
    return local, specs


def _attention_case() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    in_proj = torch.rand(24, 8, generator=g) < 0.6  # [3E, E], E = 8, 4 heads; rows 0-11 | 12-23
    in_proj[10:12] = False  # K of head 1 (K is rows 8-15, 2 per head), on rank 0
    in_proj[20:22] = False  # V of head 2, on rank 1
    c_attn = torch.rand(8, 24, generator=g) < 0.6  # [E in, 3E out], stored rows (inputs) 0-3 | 4-7
    c_attn[:4, 4:8] = False  # Q columns of head 1: empty on rank 0's rows ...
    c_attn[4:, 4:8] = False  # ... and on rank 1's: empty only in total
    c_attn[:4, 16:20] = False  # V columns of head 0 half emptied: not empty
    c_attn[6] = False  # an empty input channel
    c_fc = torch.rand(8, 12, generator=g) < 0.5  # [in, out] feeding `fed` (12 inputs)
    c_fc[:, 5] = False
    fed = torch.rand(3, 12, generator=g) < 0.9
    whole = torch.rand(12, 4, generator=g) < 0.5  # a weight held whole by every process, [out, in]
    whole[0:2] = False
    names = ["in_proj", "c_attn", "c_fc", "fed", "whole"]
    return {
        "names": names,
        "masks": [in_proj, c_attn, c_fc, fed, whole],
        "transposed": {"c_attn", "c_fc"},
        "links": {"fed": ChainLink("c_fc")},
        "attention": {
            "mha": AttentionHeads(("in_proj",), 4),
            "gpt": AttentionHeads(("c_attn",), 2),
            "held": AttentionHeads(("whole",), 2),
        },
        "whole": {"whole"},
    }


def _attention_shard(case: dict[str, Any], rank: int) -> tuple[list[torch.Tensor], dict[str, ShardSpec]]:
    local, specs = [], {}
    for name, mask in zip(case["names"], case["masks"]):
        if name in case["whole"]:
            local.append(mask)
            continue
        chunk = math.ceil(mask.shape[0] / WORLD)
        start, stop = min(mask.shape[0], rank * chunk), min(mask.shape[0], (rank + 1) * chunk)
        local.append(mask[start:stop])
        specs[name] = ShardSpec(tuple(mask.shape), start, stop - start, dist.group.WORLD)
    return local, specs


def _as_tuples(stats) -> dict[str, tuple[float, float, float]]:
    return {name: astuple(s) for name, s in stats.items()}


def _worker(
    rank: int, world: int, port: int, out_dir: str, cases: list[dict[str, Any]], attention: dict[str, Any]
) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _attention_work(rank, out_dir, attention)
        group = dist.group.WORLD
        results: dict[str, Any] = {"cases": []}
        for case in cases:
            local, specs = _shard(case, rank, world)
            names = case["names"]
            stats = channel_stats(names, local, case["links"], case["groups"], specs=specs, group=group)
            report = SparsityReport(
                cost_model=CostModel(flops={}, times=None, links=case["links"], groups=case["groups"])
            )
            measured = report.measure(3, dict(zip(names, local)), specs=specs, group=group)
            results["cases"].append(
                {
                    "stats": _as_tuples(stats),
                    "report": _as_tuples(measured),
                    "shapes": report.shapes,
                    "local_rows": {n: t.shape[0] for n, t in zip(names, local)},
                }
            )
        # a bad argument seen by every process is refused before the all_reduce: no process waits in it
        case = cases[0]
        local, specs = _shard(case, rank, world)
        bad_links = {"head.weight": ChainLink("conv.weight", 3)}
        try:
            channel_stats(case["names"], local, bad_links, specs=specs, group=group)
        except ValueError as exc:
            results["error"] = str(exc)
        results["after_error"] = _as_tuples(
            channel_stats(case["names"][:1], local[:1], specs={"conv.weight": specs["conv.weight"]}, group=group)
        )  # fmt: skip
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _attention_work(rank: int, out_dir: str, case: dict[str, Any]) -> None:
    local, specs = _attention_shard(case, rank)
    layers = dict(zip(case["names"], local))
    kwargs = dict(specs=specs, group=dist.group.WORLD, transposed=case["transposed"])
    heads = attention_empty_heads(case["attention"], layers, **kwargs)
    stats = channel_stats(case["names"], local, case["links"], **kwargs)
    report = SparsityReport()
    measured = report.measure(0, layers, attention=case["attention"], **kwargs)
    torch.save(
        {"heads": heads, "stats": stats, "report": dict(measured), "report_heads": measured.empty_heads},
        Path(out_dir) / f"attention{rank}.pt",
    )


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """The output folder of one launch of 2 processes that compute every case of this file."""
    out = tmp_path_factory.mktemp("shards")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out), _cases(), _attention_case()), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
def test_sharded_channel_stats_equal_the_full_masks_stats_exactly(shard_dir):
    cases = _cases()
    ranks = [torch.load(shard_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    assert ranks[1]["cases"][0]["local_rows"] == {
        "conv.weight": 3,
        "gconv.weight": 3,
        "head.weight": 2,
        "fc.weight": 3,
        "tiny.weight": 0,  # rank 1 holds no row of it
        "dense.weight": 3,
    }
    for i, case in enumerate(cases):
        expected = channel_stats(case["names"], case["masks"], case["links"], case["groups"])
        report = SparsityReport(cost_model=CostModel(flops={}, times=None, links=case["links"], groups=case["groups"]))
        report.measure(3, dict(zip(case["names"], case["masks"])))
        for rank in ranks:
            got = rank["cases"][i]
            assert got["stats"] == _as_tuples(expected), f"case {i}"
            assert got["report"] == _as_tuples(expected), f"case {i}"
            assert got["shapes"] == report.shapes == {n: tuple(m.shape) for n, m in zip(case["names"], case["masks"])}
    # the cases really exercise idle inputs, empty channels and the grouped conv
    first = channel_stats(cases[0]["names"], cases[0]["masks"], cases[0]["links"], cases[0]["groups"])
    assert first["conv.weight"].empty_out == 2 / 6 and first["conv.weight"].empty_in == 1 / 3
    assert first["head.weight"].empty_in >= 8 / 24  # conv channels 1 and 4 idle features 4-7 and 16-19
    assert first["gconv.weight"].empty_in >= 3 / 6  # channels 1 and 4 (idle) and 2 (own, across the ranks)
    assert first["fc.weight"].empty_out == 1 / 7
    for rank in ranks:
        assert "6 output channels x repeat 3 = 18 inputs, but 'head.weight' has 24" in rank["error"]
        assert rank["after_error"] == _as_tuples(channel_stats(["conv.weight"], cases[0]["masks"][:1]))


@pytest.mark.slow
def test_row_shards_give_the_full_masks_statistics(shard_dir):
    case = _attention_case()
    layers = dict(zip(case["names"], case["masks"]))
    expected_heads = attention_empty_heads(case["attention"], layers, transposed=case["transposed"])
    expected_stats = channel_stats(case["names"], case["masks"], case["links"], transposed=case["transposed"])
    assert expected_heads == {"mha": 0.5, "gpt": 0.5, "held": empty_heads(case["masks"][4], 2)}
    assert expected_stats["c_attn"].empty_in == 1 / 8
    assert expected_stats["fed"].empty_in >= 1 / 12  # idled by c_fc's empty column 5
    for rank in range(WORLD):
        got = torch.load(shard_dir / f"attention{rank}.pt", weights_only=False)
        assert got["heads"] == expected_heads
        assert got["report_heads"] == expected_heads
        assert got["stats"] == expected_stats
        assert got["report"] == channel_stats(case["names"], case["masks"], transposed=case["transposed"])


def test_row_blocks_without_a_process_group_must_be_the_full_masks():
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1] = False
    plain = channel_stats(["a"], [mask])
    whole = ShardSpec((4, 3), 0, 4)
    assert channel_stats(["a"], [mask], specs={"a": whole}) == plain
    with pytest.raises(ValueError, match=r"each mask is the full weight, but its spec gives rows \[2, 4\) of a weight of 4"):
        channel_stats(["a"], [mask[2:]], specs={"a": ShardSpec((4, 3), 2, 2)})
    with pytest.raises(ValueError, match=r"mask 'a' of shape \(4, 3\) is not the block of rows \[2, 4\) of a weight"):
        channel_stats(["a"], [mask], specs={"a": ShardSpec((4, 3), 2, 2)})
    with pytest.raises(ValueError, match="`specs` names layers that are not in `names`"):
        channel_stats(["a"], [mask], specs={"b": whole})
    with pytest.raises(ValueError, match=r"mask 'a' of shape \(4, 3\) is not the block"):
        attention_empty_heads({"m": AttentionHeads(("a",), 1, 1)}, {"a": mask}, specs={"a": ShardSpec((4, 2), 0, 4)})
    report = SparsityReport()
    assert report.measure(0, {"a": mask}, specs={"a": whole}) == plain
    assert report.shapes == {"a": (4, 3)}
