"""Classifier-free guidance around a model brought in through sdekit.interop: the guided
output is ``(1 + w) cond - w uncond`` of the diffusers-style network, for prompt embeddings
(``encoder_hidden_states``) and class labels, and it samples with a solver at 2 NFE per call."""
import pytest
import torch

import sdekit
from sdekit.guidance import classifier_free
from sdekit.interop import from_diffusers


def unet_like(sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True):
    """A stand-in with UNet2DConditionModel's call signature (a tuple output with return_dict)."""
    out = sample * 0.1 + timestep.reshape(-1, 1) * 1e-3
    if encoder_hidden_states is not None:
        out = out + encoder_hidden_states.mean(1)
    if class_labels is not None:
        out = out + class_labels.reshape(-1, 1).to(out)
    return (out,) if not return_dict else {"sample": out}


@pytest.mark.parametrize("cond_arg, cond, null", [
    ("encoder_hidden_states", torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)),
     torch.zeros(5, 4)),
    ("class_labels", torch.tensor([1, 2, 3]), torch.tensor(0)),
])
def test_cfg_around_a_from_diffusers_model(cond_arg, cond, null):
    sde, model = from_diffusers({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                 "prediction_type": "epsilon"}, unet_like)
    w = 2.5
    guided = classifier_free(model, sde, cond, null, w, cond_arg=cond_arg)
    assert guided.prediction == model.prediction and guided.time_input == model.time_input
    x, t = torch.randn(3, 4), torch.tensor(0.4)
    nulls = null.expand(cond.shape[1:]).unsqueeze(0).expand(cond.shape)
    with torch.no_grad():
        c = model.net.fn(x, model._cond(model._batch_time(x, t)), **{cond_arg: cond})
        u = model.net.fn(x, model._cond(model._batch_time(x, t)), **{cond_arg: nulls})
        torch.testing.assert_close(guided.raw(x, t), (1 + w) * c - w * u)
    sol = sdekit.sample(sde, guided, shape=(3, 4), solver="dpmpp_2m", steps=6)
    assert sol.nfe == 12 and torch.isfinite(sol.x).all()


def test_cfg_refuses_a_model_of_another_sde():
    sde, model = from_diffusers({"num_train_timesteps": 1000}, unet_like)
    with pytest.raises(ValueError, match="same forward SDE"):
        classifier_free(model, sdekit.VPSDE(), torch.tensor([1]), torch.tensor(0), 1.0,
                        cond_arg="class_labels")
