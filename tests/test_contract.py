"""The solver contract (sdekit/solvers/base.py): kinds, typed state, the explicit model-output
hand-over of UniC, the frozen schedule."""
import pytest
import torch

import sdekit
from sdekit.solvers import get_solver

REUSING = ["dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpmpp_2s", "deis_tab3", "ipndm", "ddim",
           "edm_euler", "unipc_bh2"]


@pytest.mark.parametrize("predictor", REUSING)
def test_unic_hands_its_model_call_to_the_predictor(predictor):
    """UniC on any OneCallStepper costs no NFE: the predictor's step takes the output UniC
    computed (no second call), and the result differs from the predictor alone."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=3, seed=1)
    x = data.marginal_sample(4, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = sdekit.sample(sde, data.model(), x, solver="unic_dpmpp_2m", predictor=predictor,
                        steps=7)
    assert sol.nfe == 7
    alone = sdekit.sample(sde, data.model(), x, solver=predictor, steps=7)
    assert torch.isfinite(sol.x).all() and not torch.equal(sol.x, alone.x)


@pytest.mark.parametrize("predictor", ["euler", "deis_rhork", "heun", "dopri5", "fno"])
def test_unic_refuses_a_predictor_that_cannot_take_the_output(predictor):
    """A predictor whose step does not take a computed model output (euler evaluates at
    t(lambda_i), which the old proxy did not recognise: 2 NFE per step) is refused up front."""
    with pytest.raises(ValueError, match=f"predictor='{predictor}' is invalid: UniC needs"):
        get_solver("unic_dpmpp_2m", predictor=predictor)


KINDS = ("FixedGridSolver", "AdaptiveSolver", "ExternalSolver", "LearnedSampler")


@pytest.mark.parametrize("name", sdekit.solver_names())
def test_every_solver_is_of_one_kind_and_its_flags_follow(name):
    """The kinds are marker base classes; the read-only flags are derived from them."""
    from sdekit.solvers import base
    s = get_solver(name)
    kinds = [k for k in ("FixedGridSolver", "AdaptiveSolver", "ExternalSolver")
             if isinstance(s, getattr(base, k))]
    assert len(kinds) == 1, (name, kinds)
    assert s.adaptive == isinstance(s, base.AdaptiveSolver)
    assert s.external_loop == isinstance(s, base.ExternalSolver)
    assert s.grid_free == isinstance(s, base.LearnedSampler)
    with pytest.raises(AttributeError):
        s.adaptive = True
    # the distillation hook belongs to learned samplers only
    assert hasattr(s, "for_problem") == isinstance(s, base.LearnedSampler)
    if not isinstance(s, base.LearnedSampler):
        assert sdekit.solvers.for_problem(s, sdekit.VPSDE(), None, (3,)) is s


def test_a_solver_of_no_kind_is_refused():
    class NoKind(sdekit.Solver):
        paper = "none"

        def step(self, p, i, x, state):
            return x, state

    with pytest.raises(TypeError, match="is of no kind: subclass FixedGridSolver"):
        sdekit.sample(sdekit.VPSDE(), lambda x, t: x * 0, shape=(2, 3), solver=NoKind(), steps=2)


def _class_vars(cls):
    """The names a class and its bases declare as ``ClassVar`` (class constants)."""
    return {k for c in cls.__mro__ for k, v in vars(c).get("__annotations__", {}).items()
            if "ClassVar" in str(v)}


@pytest.mark.parametrize("name", sdekit.solver_names())
def test_options_never_set_a_class_constant(name):
    """Options become instance attributes; no instance (built with its registry options, which
    also sets its name) shadows a ``ClassVar`` of its class: those are constants of the class
    only, and the declarations that depend on options are instance attributes."""
    s = get_solver(name)
    assert not set(vars(s)) & _class_vars(type(s)), sorted(set(vars(s)) & _class_vars(type(s)))
    assert "name" in vars(s) and "default_grid" not in _class_vars(type(s))


def test_schedule_is_frozen_and_the_driver_leaves_the_problem_alone():
    """The schedule (times, alpha, sigma, lambda) is a frozen float64 object; the driver passes
    the step index to the solver and changes nothing on the problem from step to step."""
    import dataclasses

    from sdekit.solvers import FixedGridSolver, Schedule
    sde = sdekit.VPSDE()
    seen = []

    class Probe(FixedGridSolver):
        paper = "none"

        def step(self, p, i, x, state):
            seen.append((i, dict(vars(p))))
            return x, state

    sdekit.sample(sde, lambda x, t: x * 0, shape=(2, 3), solver=Probe(), steps=4)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert all(d == seen[0][1] for _, d in seen)
    p = sdekit.solvers.Problem(sde, sdekit.DiffusionModel(lambda x, t: x, sde),
                               sdekit.make_grid(sde, "uniform", 4))
    assert isinstance(p.schedule, Schedule) and not hasattr(p, "step_index")
    assert p.alpha.dtype == p.sigma.dtype == p.lam.dtype == torch.float64
    torch.testing.assert_close(p.lam, sde.lambda_(p.times).double(), rtol=0, atol=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.schedule.alpha = p.sigma
    with pytest.raises(AttributeError):
        p.alpha = p.sigma



def test_grid_coefficients_come_from_the_schedule_and_reach_the_one_call_steppers_call():
    """The grid's Coeffs are the frozen schedule's (plain float64 numbers); a OneCallStepper's
    call at grid point i converts with them (no SDE evaluated for it), in the linear form; a
    given output comes back as it is in its own kind, or converted through the kinds table."""
    from sdekit.dynamics import Coeffs, to_eps, to_x0
    from sdekit.solvers import ModelOutput, Problem
    sde = sdekit.VPSDE()
    model = sdekit.DiffusionModel(lambda x, t: 0.5 * x, sde, "x0", time_input="t")
    p = Problem(sde, model, sdekit.make_grid(sde, "logsnr", 5))
    assert p.coeffs(2) is p.schedule.coeffs[2]
    assert p.coeffs(2) == Coeffs(float(p.alpha[2]), float(p.sigma[2]))
    assert all(type(v) is float for v in p.coeffs(2)[:2])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, calls = sde.alpha, []
    sde.alpha = lambda t: (calls.append(t), alpha(t))[1]
    eps = p.predict_at(2, x, "eps")
    assert calls == []      # the conversion x0 -> eps used the schedule's coefficients
    torch.testing.assert_close(eps, to_eps("x0", 0.5 * x, x, *p.coeffs(2)), rtol=0, atol=0)
    kind, x0 = p.predict_linear_at(2, x)
    assert kind == p.linear_form == "x0" and torch.equal(x0, 0.5 * x)
    given = ModelOutput(2, "eps", eps)
    assert p.predict_linear_at(2, x, given) == ("eps", eps)
    assert p.predict_at(2, x, "eps", given) is eps
    torch.testing.assert_close(p.predict_at(2, x, "x0", given),
                               to_x0("eps", eps, x, *p.coeffs(2)), rtol=0, atol=0)
    torch.testing.assert_close(p.predict_at(2, x, "x0", given), x0)
    assert calls == [] and model.nfe == 2

def test_nan_message_names_the_denoising_step():
    """With the step derived from the call's time, the final denoising call (after the last
    step) is named as step ``steps``."""
    from sdekit.solvers import ModelOutputError
    sde = sdekit.VPSDE()
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 4 else torch.zeros_like(x)

    with pytest.raises(ModelOutputError, match=r"step 3 \(t=.*\) of solver 'ddim'"):
        sdekit.sample(sde, net, shape=(2, 3), solver="ddim", steps=3, denoise=True)


@pytest.mark.parametrize("name", ["dpmpp_3m", "dpmpp_2s", "deis_tab3", "ipndm", "unipc_bh2",
                                  "unic_dpmpp_2m", "dpmpp_2m_sde"])
def test_multistep_states_are_frozen_and_returned_anew(name):
    """A step returns a new state (an immutable NamedTuple); the state it was given, and the
    outputs it holds, are left as they were."""
    sde = sdekit.VPSDE()
    model = sdekit.DiffusionModel(lambda x, t: torch.sin(x), sde)
    p = sdekit.solvers.Problem(sde, model, sdekit.make_grid(sde, "logsnr", 6),
                               sdekit.SeededNoise([1, 2]))
    s = get_solver(name)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    st0 = s.init(p, x)
    assert isinstance(st0, tuple) and hasattr(st0, "_fields") and "outputs" in st0._fields
    with pytest.raises(AttributeError):
        st0.outputs = None
    x1, st1 = s.step(p, 0, x, st0)
    x2, st2 = s.step(p, 1, x1, st1)
    assert st1 is not st0 and st2 is not st1
    assert isinstance(st0.outputs, tuple) and st0.outputs == ()
    assert len(st1.outputs) == 1 and len(st2.outputs) == 2 and st2.outputs[1] is st1.outputs[0]
