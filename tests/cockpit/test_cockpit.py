"""The Cockpit: one engine sweep per step, the extension union, presets, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import cockpit as ck
from bayescurv import engine
from bayescurv.cockpit import cockpit as cockpit_module
from bayescurv.cockpit.instrument import plan_extensions
from tests.cockpit.conftest import make_tiny, run_steps
from tests.conftest import assert_close

PRESET_NAMES = {
    "economy": [
        "loss",
        "grad_norm",
        "distance",
        "update_size",
        "alpha",
        "norm_test",
        "inner_product_test",
        "orthogonality_test",
        "grad_hist_1d",
    ],
}
PRESET_NAMES["business"] = [*PRESET_NAMES["economy"], "tic", "hess_trace"]
PRESET_NAMES["full"] = [
    *PRESET_NAMES["business"],
    "hess_max_ev",
    "grad_hist_2d",
    "mean_gsnr",
    "cabs",
    "early_stopping",
]


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The savefields requested in every engine call made by the Cockpit."""
    calls: list[list[str]] = []
    original = engine.backprop

    def counting(*args, **kwargs):
        calls.append(sorted(ext.savefield for ext in args[4]))
        return original(*args, **kwargs)

    monkeypatch.setattr(cockpit_module.engine, "backprop", counting)
    return calls


def test_one_engine_sweep_per_step_with_the_union_of_extensions(engine_calls):
    p = make_tiny("ce", "mean")
    instruments = ck.preset_instruments("full")
    curvature = {
        e.savefield
        for ins in instruments
        if ins.name in ("tic", "hess_trace")
        for e in ins.required()
    } - {"sum_grad_squared"}
    run_steps(p, instruments, steps=3)
    # step 0: everything; step 1: the end of alpha's fit; step 2: nothing. The tests
    # and the noise instruments derive their quantities from grad_batch.
    assert engine_calls == [sorted({"grad_batch"} | curvature), ["grad_batch"], []]


def test_a_step_without_extensions_still_uses_the_engine_once(engine_calls):
    p = make_tiny("ce", "mean")
    run_steps(p, [ck.Loss(), ck.GradNorm()], steps=2)
    assert engine_calls == [[], []]


def test_grad_is_the_batch_gradient_even_with_stale_grads():
    p = make_tiny("mse", "mean")
    x, y = p.batches[0]
    expected = torch.autograd.grad(
        p.loss_func(p.model(x), y), list(p.model.parameters())
    )
    for param in p.model.parameters():
        param.grad = torch.full_like(param, 3.0)
    cockpit = ck.Cockpit(p.model, p.loss_func, [ck.Loss()])
    with cockpit.step(x, y) as data:
        for param, g in zip(p.model.parameters(), expected, strict=True):
            assert_close(param.grad, g, "grad")
        assert data.step == 0
        assert_close(data.loss, p.loss_func(p.model(x), y).detach(), "loss")


@pytest.mark.parametrize(
    "savefield", ["batch_l2", "batch_dot", "sum_grad_squared", "variance"]
)
def test_quantities_derived_from_individual_gradients_equal_the_engines(savefield):
    p = make_tiny("bce", "sum")
    ext = {
        "batch_l2": engine.BatchL2Grad(),
        "batch_dot": engine.BatchDotGrad(),
        "sum_grad_squared": engine.SumGradSquared(),
        "variance": engine.Variance(),
    }[savefield]
    direct = engine.backprop(p.model, p.loss_func, *p.batches[0], [ext])[savefield]
    planned = plan_extensions([ext, engine.BatchGrad(), ext])
    assert [e.savefield for e in planned] == ["grad_batch"]
    result = engine.backprop(p.model, p.loss_func, *p.batches[0], planned)
    data = ck.StepData(
        0, p.model, p.loss_func, p.batches[0][:1], p.batches[0][1], result
    )
    for name, value in direct.items():
        assert_close(data.quantity(savefield)[name], value, f"{savefield} {name}")


@pytest.mark.parametrize("preset", list(PRESET_NAMES))
def test_presets(preset: str):
    names = [ins.name for ins in ck.preset_instruments(preset)]
    assert names == PRESET_NAMES[preset]
    cockpit = ck.Cockpit(
        nn.Linear(2, 1),
        nn.MSELoss(),
        preset=ck.Preset(preset),
        optimizer=torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1),
    )
    assert [ins.name for ins in cockpit.instruments] == names


def test_preset_schedules():
    default = {ins.name: ins.schedule for ins in ck.preset_instruments("full")}
    first, costly = ck.presets.FIRST_ORDER_INTERVAL, ck.presets.CURVATURE_INTERVAL
    assert all(default["loss"](s) for s in range(costly + 1))
    assert [s for s in range(costly + 1) if default["norm_test"](s)] == list(
        range(0, costly + 1, first)
    )
    assert [s for s in range(costly + 1) if default["hess_max_ev"](s)] == [0, costly]
    every3 = ck.schedules.every(3)
    assert all(ins.schedule is every3 for ins in ck.preset_instruments("full", every3))


def test_instruments_run_on_their_schedule():
    p = make_tiny("ce", "mean")
    instruments = [
        ck.Loss(ck.schedules.every(2, offset=1)),
        ck.NormTest(schedule=ck.schedules.at([0, 3])),
    ]
    cockpit = run_steps(p, instruments, steps=5)
    assert sorted(cockpit.history["loss"].values) == [1, 3]
    assert sorted(cockpit.history["norm_test"].values) == [0, 3]
    assert cockpit.steps_taken == 5


def test_preset_and_extra_instruments_combine():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    cockpit = ck.Cockpit(
        nn.Linear(2, 1), nn.MSELoss(), [ck.MeanGSNR()], "economy", optimizer=opt
    )
    assert [ins.name for ins in cockpit.instruments][-1] == "mean_gsnr"


def test_errors_inside_the_block_propagate_and_count_the_step():
    p = make_tiny("ce", "mean")
    cockpit = ck.Cockpit(p.model, p.loss_func, [ck.Loss()])
    with pytest.raises(ValueError, match="inside"), cockpit.step(*p.batches[0]):
        raise ValueError("inside")
    assert cockpit.steps_taken == 1
    assert cockpit.history["loss"].values.keys() == {0}


def test_engine_errors_propagate_and_use_up_no_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cockpit = ck.Cockpit(model, nn.CrossEntropyLoss(), [ck.NormTest()])
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="BatchNorm"), cockpit.step(x, y):
        pass
    assert cockpit.steps_taken == 0
    model.eval()
    with cockpit.step(x, y):
        pass
    assert list(cockpit.history["norm_test"].values) == [0]


def test_nested_steps_raise():
    p = make_tiny("ce", "mean")
    cockpit = ck.Cockpit(p.model, p.loss_func, [ck.Loss()])
    with (
        cockpit.step(*p.batches[0]),
        pytest.raises(RuntimeError, match="cannot be nested"),
    ):
        with cockpit.step(*p.batches[1]):
            pass


class _NeedsMC(ck.Instrument):
    name = "needs_mc"

    def required(self):
        return (engine.DiagGGNMC(mc_samples=2),)

    def compute(self, data):
        return 0.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: ck.Cockpit(nn.Linear(2, 1), nn.MSELoss()),
            ValueError,
            "needs instruments or a preset",
        ),
        (
            lambda: ck.Cockpit(nn.Linear(2, 1), nn.MSELoss(), [ck.Loss]),
            TypeError,
            "pass the class instead",
        ),
        (
            lambda: ck.Cockpit(nn.Linear(2, 1), nn.MSELoss(), [ck.Loss(), ck.Loss()]),
            ValueError,
            r"same name: \['loss'\]",
        ),
        (
            lambda: ck.Cockpit(nn.Linear(2, 1), nn.MSELoss(), [ck.CABS()]),
            ValueError,
            r"CABS\(lr=...\) or Cockpit\(..., optimizer=...\)",
        ),
        (
            lambda: ck.Cockpit(nn.Linear(2, 1), nn.MSELoss(), preset="first"),
            ValueError,
            "Unknown preset 'first'",
        ),
        (lambda: ck.Loss(schedule=3), TypeError, "schedule must be a callable"),
        (
            lambda: ck.NormTest(threshold=0.0),
            ValueError,
            "threshold must be a positive number",
        ),
        (lambda: ck.CABS(lr=-1.0), ValueError, "lr must be a positive number"),
    ],
)
def test_invalid_configuration_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_conflicting_extensions_raise():
    p = make_tiny("ce", "mean")
    instruments = [_NeedsMC(), ck.TIC("diag_ggn_mc", mc_samples=1)]
    cockpit = ck.Cockpit(p.model, p.loss_func, instruments)
    with (
        pytest.raises(ValueError, match="conflicting extensions"),
        cockpit.step(*p.batches[0]),
    ):
        pass


def test_update_needs_a_snapshot():
    p = make_tiny("ce", "mean")
    result = engine.backprop(p.model, p.loss_func, *p.batches[0], [])
    data = ck.StepData(
        0, p.model, p.loss_func, p.batches[0][:1], p.batches[0][1], result
    )
    with pytest.raises(RuntimeError, match="snapshot"):
        data.update()
    with pytest.raises(KeyError, match="No quantity 'grad_batch'"):
        data.individual_gradients()


def test_repr_names_instruments_and_schedules_not_values():
    p = make_tiny("mse", "mean")
    cockpit = run_steps(
        p, [ck.Loss(), ck.GradNorm(schedule=ck.schedules.every(2))], steps=3
    )
    text = repr(cockpit)
    assert text.startswith("Cockpit(model=Sequential, loss_func=MSELoss(),")
    assert "steps_taken=3" in text
    assert "'grad_norm': GradNorm(schedule=every(interval=2, offset=0))," in text
    assert "tensor(" not in text
