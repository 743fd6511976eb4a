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
