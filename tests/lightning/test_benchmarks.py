"""The benchmark scripts' own logic, on tiny inputs (their figures come from running them, not from tests)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import paper_parity  # noqa: E402
import structured  # noqa: E402


def test_structured_compares_n_m_with_unstructured_runs_of_the_same_layers():
    configs = list(structured.CONFIGS_B)
    # LeNet-5's first conv (25 inputs per row) cannot hold N:M: kept dense in the N:M runs and in the unstructured
    # runs of the same density, not in the others
    assert structured.run_options("lenet5", "2:4", 0.5, configs)["dense_layers"] == ["0"]
    assert structured.run_options("lenet5", "unstructured", 0.5, configs)["dense_layers"] == ["0"]
    assert structured.run_options("lenet5", "unstructured", 0.25, configs)["dense_layers"] == ["0"]
    assert structured.run_options("lenet5", "unstructured", 0.05, configs)["dense_layers"] == []
    assert structured.run_options("lenet5", "fan_in", 0.05, configs)["dense_layers"] == []
    assert structured.run_options("lenet300", "2:4", 0.5, configs) == {
        "pattern": "2:4", "dense_layers": [], "neuron_ablation": None
    }  # fmt: skip
    pattern, density, ablation = structured.CONFIGS_B["fan_in-ablation-0.05"]
    assert structured.run_options("lenet300", pattern, density, configs, ablation)["neuron_ablation"] == 0.3
    assert set(structured.MODELS_C.values()) <= set(configs)  # part (c)'s models are part (b) configurations
    # without an N:M configuration in the run, the unstructured runs keep every layer sparse
    assert structured.run_options("lenet5", "unstructured", 0.5, ["unstructured-0.5"])["dense_layers"] == []


def test_paper_parity_loop_trains_with_a_pattern_and_reports_the_density():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(300, 1, 28, 28, generator=g), torch.randint(0, 10, (300,), generator=g),
            torch.randn(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g))  # fmt: skip
    model, sparsifier, seconds = paper_parity.train_model(
        "lenet300", "sparse_momentum", 0, 2, 0.05, data, pattern="fan_in"
    )
    assert sparsifier is not None and seconds > 0 and not model.training
    for name, mask in sparsifier.masks.items():
        rows = mask.sum(1)
        assert bool((rows == rows[0]).all()), name  # constant fan-in after the epoch-end update
    result = paper_parity.test_error_and_density(model, sparsifier, data)
    weights = [model.get_parameter(n) for n in sparsifier.names]
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    assert result["density"] == nonzero / sum(w.numel() for w in weights)
    assert sparsifier.num_updates == 1 and 0.0 <= result["test_error"] <= 100.0
