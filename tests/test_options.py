"""SparseOptions: every argument problem is refused early, with an error that names the argument and what is allowed.
Argument errors are ``ValueError`` throughout, also for wrong types."""

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sparse import ALGORITHMS, DST, DSTSparsifier, SparseOptions, SparseTrainingCallback, Sparsifier

REAL = r"a real number \(int, float, numpy scalar or one-element tensor; not a bool\)"
INTEGER = r"an integer \(int, numpy integer or one-element integer tensor; not a bool or float\)"


def _tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# ----------------------------------------------------------------------------- 1. numbers of any numeric type


@pytest.mark.parametrize("value", [0.1, np.float32(0.1), np.float64(0.1), torch.tensor(0.1), torch.tensor([0.1])])
@pytest.mark.parametrize("name", ["density", "prune_rate", "stop_at"])
def test_real_arguments_accept_any_real_number(name, value):
    kwargs = {"density": 0.5, name: value}
    cb = SparseTrainingCallback(**kwargs)
    assert getattr(cb, name) == pytest.approx(0.1)
    assert type(getattr(cb, name)) is float


def test_an_int_is_converted():
    cb = SparseTrainingCallback(density=np.float32(0.5), prune_rate=np.int64(0), stop_at=torch.tensor(1))
    assert (cb.density, cb.prune_rate, cb.stop_at) == (0.5, 0.0, 1.0)
    assert all(type(v) is float for v in (cb.density, cb.prune_rate, cb.stop_at))


@pytest.mark.parametrize("value", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor([4])])
def test_integer_arguments_accept_numpy_and_tensor_integers(value):
    cb = SparseTrainingCallback(density=0.1, update_interval=value, seed=value)
    assert cb.update_interval == 4 and type(cb.update_interval) is int
    assert cb.seed == 4 and type(cb.seed) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 4.0, np.float32(4.0), torch.tensor(4.0)])
def test_integer_arguments_refuse_floats_and_bools(value):
    with pytest.raises(ValueError, match=rf"`update_interval` must be 'epoch', an int >= 1, or None, got .*; {INTEGER}"):
        SparseTrainingCallback(density=0.1, update_interval=value)
    with pytest.raises(ValueError, match=rf"`seed` must be an int in \[0, 2\*\*63\) or None, got .*; {INTEGER}"):
        SparseTrainingCallback(density=0.1, seed=value)


@pytest.mark.parametrize("value", [True, np.bool_(False), torch.tensor(True)])
def test_bools_are_not_densities(value):
    with pytest.raises(ValueError, match=rf"`density` must be a number in \(0, 1\], got .*; {REAL}"):
        SparseTrainingCallback(density=value)


def test_sparsifier_converts_numbers_too():
    model, optimizer = _tiny()
    sparsifier = Sparsifier(model, optimizer, density=torch.tensor(0.5), seed=np.int64(1), total_steps=np.int64(10))
    assert type(sparsifier.options.density) is float and type(sparsifier.options.seed) is int
    assert sparsifier.total_steps == 10.0 and type(sparsifier.total_steps) is float


# ----------------------------------------------------------------------------- 2. wrong types name the argument


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(density="0.1"), rf"`density` must be a number in \(0, 1\], got '0.1' \(str\); {REAL}"),
        (dict(density=torch.tensor([0.1, 0.2])), r"`density` must be a number in \(0, 1\], got tensor\(\[0.1000, 0.2000\]\) \(Tensor\)"),
        (dict(prune_rate="0.3"), rf"`prune_rate` must be in \[0, 1\], got '0.3' \(str\); {REAL}, or None for the algorithm's default"),
        (dict(stop_at=[0.5]), rf"`stop_at` must be in \(0, 1\], got \[0.5\] \(list\); {REAL}, or None for the algorithm's default"),
        (dict(update_interval="step"), rf"`update_interval` must be 'epoch', an int >= 1, or None, got 'step' \(str\); {INTEGER}"),
        (dict(seed="1"), rf"`seed` must be an int in \[0, 2\*\*63\) or None, got '1' \(str\); {INTEGER}"),
        (dict(seed=2**70), r"`seed` must be an int in \[0, 2\*\*63\) or None, got 1180591620717411303424 \(int\)"),
        (dict(seed=2**63), r"`seed` must be an int in \[0, 2\*\*63\) or None, got 9223372036854775808 \(int\)"),
        (dict(seed=-1), r"`seed` must be an int in \[0, 2\*\*63\) or None, got -1 \(int\)"),
        (dict(dense_layers=5), r"`dense_layers` must be a name or glob pattern \(str\) or a sequence of them, got 5 \(int\)"),
        (dict(dense_layers=["fc", 3]), r"`dense_layers` must be a name or glob pattern \(str\) or a sequence of them, got \('fc', 3\) \(tuple\)"),
        (dict(algorithm=["rigl"]), r"`algorithm` can be sparse_momentum, rigl, set, dsr, static, snip, gmp, granet, mest, topkast, dst, a SparseAlgorithm or a DST, got \['rigl'\]"),
        (dict(prune_rate_schedule=["cosine"]), r"`prune_rate_schedule` can be cosine, linear, constant or a function of progress, got \['cosine'\]"),
        (dict(init=3), r"`init` can be uniform, erk, er, got 3"),
        (dict(mask_kernel=None), r"`mask_kernel` can be 'auto', 'cpp', 'torch', got None"),
        (dict(speedup_timing=["flops"]), r"`speedup_timing` can be flops, measure, got \['flops'\]"),
        (dict(figure="yes"), r"`figure` must be True or False, got 'yes' \(str\)"),
    ],
)
def test_wrong_types_name_the_argument_and_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseTrainingCallback(**{"density": 0.1, **kwargs})


def test_dense_layers_accepts_a_string_or_any_iterable_of_strings():
    assert SparseTrainingCallback(density=0.1, dense_layers="fc").dense_layers == ["fc"]
    assert SparseTrainingCallback(density=0.1, dense_layers=(n for n in ["a", "b"])).dense_layers == ["a", "b"]


def test_sparsifier_refuses_wrong_types_before_touching_the_model():
    model, optimizer = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"`total_steps` must be a number of optimizer steps or None \(unknown\), got '10' \(str\); {REAL}"):
        Sparsifier(model, optimizer, density=0.5, total_steps="10")
    with pytest.raises(ValueError, match=r"`prune_rate` must be in \[0, 1\], got '0.3' \(str\)"):
        Sparsifier(model, optimizer, density=0.5, prune_rate="0.3")
    with pytest.raises(ValueError, match=r"`model` must be a torch.nn.Module, got dict"):
        Sparsifier(dict(model.named_parameters()), optimizer, density=0.5)
    with pytest.raises(ValueError, match=r"`optimizer` must be a torch.optim.Optimizer, got list"):
        Sparsifier(model, list(model.parameters()), density=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- 3. callable schedules checked early


@pytest.mark.parametrize(
    "schedule, message",
    [
        (lambda progress: None, r"`prune_rate_schedule` returned None at progress 0.0; rates must be in \[0, 1\]"),
        (lambda progress: "0.1", r"`prune_rate_schedule` returned '0.1' at progress 0.0; rates must be in \[0, 1\]"),
        (lambda progress: 2 * progress, r"`prune_rate_schedule` returned 2.0 at progress 1.0; rates must be in \[0, 1\]"),
        (lambda progress: 0.1 - progress, r"`prune_rate_schedule` returned -0.4 at progress 0.5; rates must be in \[0, 1\]"),
        (lambda progress: float("nan") if progress == 1.0 else 0.1, r"`prune_rate_schedule` returned nan at progress 1.0"),
    ],
)
def test_callable_schedule_is_checked_when_made(schedule, message):
    with pytest.raises(ValueError, match=message):
        SparseTrainingCallback(density=0.1, prune_rate_schedule=schedule)
    model, optimizer = _tiny()
    with pytest.raises(ValueError, match=message):
        Sparsifier(model, optimizer, density=0.5, prune_rate_schedule=schedule)


def test_callable_schedule_may_return_numpy_or_tensor_rates():
    cb = SparseTrainingCallback(density=0.1, prune_rate_schedule=lambda progress: np.float32(0.5 * (1 - progress)))
    assert cb.prune_rate_at(0.0) == pytest.approx(0.5) and type(cb.prune_rate_at(0.0)) is float
    cb = SparseTrainingCallback(density=0.1, prune_rate_schedule=lambda progress: torch.tensor(0.25))
    assert cb.prune_rate_at(0.5) == 0.25


# ----------------------------------------------------------------------------- 4. DST refuses the options it ignores


@pytest.mark.parametrize("algorithm", ["dst", DST(alpha=1e-4)])
@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(density=0.1), r"`density`: leave it unset"),
        (dict(prune_rate=0.3), r"`prune_rate`: leave it unset"),
        (dict(prune_rate_schedule="constant"), r"`prune_rate_schedule`: leave it unset"),
        (dict(update_interval=10), r"`update_interval`: leave it unset"),
        (dict(stop_at=0.5), r"`stop_at`: leave it unset"),
        (dict(init="erk"), r"`init`: leave it unset"),
        (dict(density=0.1, init="erk", stop_at=0.5), r"`density`, `stop_at`, `init`: leave them unset"),
    ],
)
def test_dst_refuses_the_options_it_ignores(algorithm, kwargs, named):
    message = (
        rf"algorithm {re.escape(repr(algorithm))} learns its density and masks at every step; it does not use"
        rf" {named} \(DST's options are `DST\(alpha=\.\.\., collapse_density=\.\.\.\)`\)"
    )
    with pytest.raises(ValueError, match=message):
        SparseTrainingCallback(algorithm=algorithm, **kwargs)
    model, optimizer = _tiny()
    with pytest.raises(ValueError, match=message):
        Sparsifier(model, optimizer, algorithm=algorithm, **kwargs)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # refused before any threshold


def test_dst_without_ignored_options_still_works():
    cb = SparseTrainingCallback(algorithm="dst", dense_layers=["2"], seed=3)
    assert cb.density is None and cb.algorithm_name == "dst"
    model, _ = _tiny()
    sparsifier = Sparsifier(model, torch.optim.Adam(model.parameters()), algorithm="dst")
    assert isinstance(sparsifier, DSTSparsifier) and sparsifier.names == ["0.weight", "2.weight"]


# ----------------------------------------------------------------------------- 5. lazy layers


def test_lazy_layers_are_refused_with_their_names():
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(
        ValueError,
        match=r"the layer\(s\) '0' \(LazyLinear\) have uninitialized \(lazy\) weights, so they cannot be masked: run"
        r" one forward pass through the model before binding the masks",
    ):
        Sparsifier(model, optimizer, total_steps=100, density=0.5)
    model(torch.zeros(2, 8))  # initialized: now it is a plain Linear
    assert list(Sparsifier(model, optimizer, total_steps=100, density=0.5).masks) == ["0.weight", "2.weight"]


def test_lazy_layers_kept_dense_are_fine():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.LazyLinear(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert list(Sparsifier(model, optimizer, total_steps=100, density=0.5, dense_layers=["2"]).masks) == ["0.weight"]


# ----------------------------------------------------------------------------- 6. empty layers at the start


def test_layers_left_without_active_weights_are_named_in_one_warning():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning) as record:
        sparsifier = Sparsifier(model, optimizer, total_steps=100, density=0.02, seed=0)
    empty = [str(w.message) for w in record if "0 active weights" in str(w.message)]
    assert empty == [
        (
            "density 0.02 with init='uniform' leaves 0 active weights in 2.weight, 4.weight: they will output only"
            " their bias. Raise `density`, use init='erk' or 'er', or keep them dense with `dense_layers`"
        )
    ]
    assert sparsifier.masking.active == [1, 0, 0]


def test_no_warning_when_every_layer_keeps_a_weight():
    model, optimizer = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sparsifier(model, optimizer, total_steps=100, density=0.1, seed=0)


# ----------------------------------------------------------------------------- 7. resuming another run


def test_resume_with_another_density_or_algorithm_is_refused():
    model, optimizer = _tiny()
    state = Sparsifier(model, optimizer, total_steps=100, density=0.2, seed=0).state_dict()
    assert state["density"] == 0.2 and state["algorithm"] == "sparse_momentum"

    model2, optimizer2 = _tiny()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(ValueError, match=r"the checkpoint was trained with density 0.2, this run asks for 0.1: resume with the checkpoint's, or start a new run"):
        Sparsifier(model2, optimizer2, total_steps=100, density=0.1, state=state)
    with pytest.raises(ValueError, match=r"the checkpoint was trained with algorithm 'sparse_momentum', this run asks for 'rigl': resume with the checkpoint's algorithm, or start a new run"):
        Sparsifier(model2, optimizer2, total_steps=100, density=0.2, algorithm="rigl", state=state)
    with pytest.raises(ValueError, match=r"the checkpoint was trained with algorithm 'sparse_momentum', this run asks for 'dst'"):
        Sparsifier(model2, optimizer2, total_steps=100, algorithm="dst", state=state)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())  # refused before touching it
    assert not any(hasattr(m, "parametrizations") for m in model2.modules())  # no DST thresholds attached

    resumed = Sparsifier(model2, optimizer2, total_steps=100, density=np.float32(0.2), state=state)  # same run (a float32 0.2)
    assert all(torch.equal(resumed.masks[k], v) for k, v in state["masks"].items())
    with pytest.raises(ValueError, match=r"the checkpoint was trained with density 0.2, this run asks for 0.1"):
        Sparsifier(model2, optimizer2, total_steps=100, density=0.1).load_state_dict(state)


def test_states_without_density_or_algorithm_load_unchecked():
    model, optimizer = _tiny()
    state = Sparsifier(model, optimizer, total_steps=100, density=0.2, seed=0).state_dict()
    old = {k: v for k, v in state.items() if k not in ("density", "algorithm")}
    model2, optimizer2 = _tiny()
    resumed = Sparsifier(model2, optimizer2, total_steps=100, density=0.1, state=old)  # an older checkpoint: no check
    assert all(torch.equal(resumed.masks[k], v) for k, v in state["masks"].items())


def test_dst_state_records_its_algorithm():
    model, _ = _tiny()
    state = Sparsifier(model, torch.optim.Adam(model.parameters()), algorithm="dst").state_dict()
    assert state["algorithm"] == "dst"
    model2, optimizer2 = _tiny()
    with pytest.raises(ValueError, match=r"the checkpoint was trained with algorithm 'dst', this run asks for 'set'"):
        Sparsifier(model2, optimizer2, density=0.2, algorithm="set", state={**state, "masks": {}})
    model3, _ = _tiny()
    Sparsifier(model3, torch.optim.Adam(model3.parameters()), algorithm=DST(), state=state)  # 'DST' is 'dst'


# ----------------------------------------------------------------------------- one list of options


def test_options_fill_in_the_algorithm_defaults_and_checking_again_changes_nothing():
    options = SparseOptions(density={"0.*": 0.5, "*": 0.1}, algorithm="rigl", seed=np.int64(3))
    assert options.algorithm is ALGORITHMS["rigl"] and options.algorithm_name == "rigl"
    assert (options.prune_rate, options.prune_rate_schedule, options.update_interval) == (0.3, "cosine", 100)
    assert (options.init, options.stop_at, options.seed, options.dense_layers) == ("erk", 0.75, 3, ())
    assert options.schedule.interval == 100 and options.groups == [("0.*", 0.5), ("*", 0.1)]
    again = SparseOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(SparseOptions)})
    assert again == options
    assert SparseOptions.resolve(0.1, "set") == SparseOptions(density=0.1, algorithm="set")
    epoch = SparseOptions(density=0.1)  # sparse momentum updates at epoch ends
    assert epoch.update_interval == "epoch" and epoch.schedule.interval is None
    assert dataclasses.replace(epoch, density=0.2).schedule.interval is None


def test_sparsifier_takes_options_or_keywords_not_both():
    model, opt = _tiny()
    options = SparseOptions(density=0.5, algorithm="set", seed=0)
    assert Sparsifier(model, opt, options=options).options is options
    assert Sparsifier(*_tiny(), density=0.5, algorithm="set", seed=0).options == options
    with pytest.raises(ValueError, match=r"give either `options` or the options as keyword arguments, not both \(got \['density'\]\)"):
        Sparsifier(model, opt, options=options, density=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'densty'"):
        Sparsifier(model, opt, densty=0.5)


def test_names_in_any_case_and_typos_get_the_closest_name():
    options = SparseOptions(density=0.1, algorithm="RigL", init="ERK")
    assert options.algorithm is ALGORITHMS["rigl"] and (options.algorithm_name, options.init) == ("rigl", "erk")
    assert type(Sparsifier(*_tiny(), algorithm="DST")) is DSTSparsifier
    with pytest.raises(ValueError, match=r"`algorithm` can be sparse_momentum, .*, got 'rigel'; did you mean 'rigl'\?"):
        SparseOptions(density=0.1, algorithm="rigel")
    with pytest.raises(ValueError, match=r"`init` can be uniform, erk, er, got 'erkk'; did you mean 'erk'\?"):
        SparseOptions(density=0.1, init="erkk")
    with pytest.raises(ValueError, match=r"`algorithm` can be .*, got 'xyz'$"):  # nothing close: no suggestion
        SparseOptions(density=0.1, algorithm="xyz")


def test_a_schedule_with_the_wrong_signature_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"`prune_rate_schedule` must be a function of the progress in \[0, 1\] \(one"
                                         r" float\) returning the rate; calling it with 0.0 raised TypeError"):  # fmt: skip
        SparseOptions(density=0.1, prune_rate_schedule=lambda step, total: 0.3)


# ----------------------------------------------------------------------------- density 1.0, sparsity= (issue 20)


@pytest.mark.parametrize("density", [1.0, {"*": 1.0}, {"0.*": 1.0, "*": 1}])
def test_density_one_is_refused_when_made_naming_the_dense_run(density):
    with pytest.raises(ValueError, match="keeps every weight: nothing would be masked or updated"):
        SparseTrainingCallback(density=density)
    with pytest.raises(ValueError, match="keeps every weight"):
        SparseOptions(density=density, algorithm="rigl")


def test_a_density_group_of_one_next_to_sparse_groups_is_accepted():
    assert SparseOptions(density={"0.*": 1.0, "*": 0.1}).groups == [("0.*", 1.0), ("*", 0.1)]


def test_sparsity_keyword_points_to_density():
    match = r"there is no `sparsity` option: .* \(density=0.1 for sparsity=0.9\)"
    with pytest.raises(ValueError, match=match):
        SparseTrainingCallback(sparsity=0.9)
    with pytest.raises(ValueError, match=match):
        SparseOptions(sparsity=0.9)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=match):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9)
