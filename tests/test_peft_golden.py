"""Golden values from Hugging Face PEFT on the same weights: PiSSA's and OLoRA's initial factors and effective
weights, AdaLoRA's init, update and orthogonality penalty.

Factors are compared up to the joint sign of each rank-one pair (svdtune canonicalises signs, PEFT keeps LAPACK's),
which leaves every product, and so every effective weight, unchanged. The effective weights are compared after the
same perturbation of the factors, so the check covers training, not just the init point (where both equal W).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

import svdtune
from svdtune.core import regularisation

R, ALPHA = 4, 8.0  # scale 2, so PEFT's division of the singular values by the scale is exercised


class TwoLayers(nn.Module):
    """Two linear layers (48 -> 40 -> 48) whose forward returns an output with a loss, as PEFT's AdaLoRA needs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down, self.up = nn.Linear(48, 40), nn.Linear(40, 48)

    def forward(self, x: torch.Tensor) -> CausalLMOutput:
        y = self.up(torch.tanh(self.down(x)))
        return CausalLMOutput(loss=y.pow(2).mean(), logits=y)


def peft_lora(model: nn.Module, init: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["down", "up"],
                                            init_lora_weights=init))


def pair_signs(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """±1 per column aligning `ours` with `theirs` (a singular/QR pair's sign is a convention)."""
    return torch.sign((ours * theirs).sum(dim=0))


@pytest.mark.parametrize("method, init", [("pissa", "pissa"), ("olora", "olora")])
def test_initial_factors_and_effective_weights_equal_pefts(method: str, init: str) -> None:
    theirs = peft_lora(TwoLayers(), init)
    ours = svdtune.adapt(TwoLayers(), method, r=R, alpha=ALPHA, targets="down|up", verbose=False)
    gen = torch.Generator().manual_seed(1)
    for name, adapter in svdtune.adapters(ours).items():
        layer = getattr(theirs.base_model.model, name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        signs = pair_signs(adapter.B.detach(), B.detach())
        torch.testing.assert_close(adapter.B.detach(), B.detach() * signs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.A.detach(), signs[:, None] * A.detach(), rtol=1e-4, atol=1e-5)
        assert layer.scaling["default"] == adapter.config.scale
        with torch.no_grad():  # the same step on both, in PEFT's frame
            dB, dA = (0.1 * torch.randn(t.shape, generator=gen) for t in (B, A))
            B.add_(dB), A.add_(dA)
            adapter.B.add_(dB * signs), adapter.A.add_(signs[:, None] * dA)
            effective = layer.base_layer.weight + layer.get_delta_weight("default")
            torch.testing.assert_close(adapter.base.weight + adapter.delta(), effective, rtol=1e-5, atol=1e-5)


def peft_adalora(model: nn.Module, orth_reg: float) -> nn.Module:
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=R, target_r=2, lora_alpha=ALPHA, target_modules=["down", "up"], total_step=100,
                           orth_reg_weight=orth_reg)
    return get_peft_model(model, config)


def test_adalora_init_update_and_orthogonality_penalty_equal_pefts() -> None:
    theirs = peft_adalora(TwoLayers(), 0.3)
    ours = svdtune.adapt(TwoLayers(), "adalora", r=R, alpha=ALPHA, orth_reg=0.3, targets="down|up", verbose=False)
    gen = torch.Generator().manual_seed(2)
    for name, adapter in svdtune.adapters(ours).items():
        layer = getattr(theirs.base_model.model, name)
        A, B, E = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"])
        assert torch.equal(adapter.E, torch.zeros(R)) and torch.equal(E, torch.zeros(R, 1))
        for mine, peft in ((adapter.Q.detach(), A.detach()), (adapter.P.detach(), B.detach())):  # both N(0, 0.02²)
            assert mine.shape == peft.shape and 0.015 < float(mine.std()) < 0.025 and 0.015 < float(peft.std()) < 0.025
        with torch.no_grad():  # PEFT's factors, trained a little, in both
            for t in (A, B, E):
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
            adapter.Q.copy_(A), adapter.P.copy_(B), adapter.E.copy_(E[:, 0])
            torch.testing.assert_close(adapter.delta(), layer.get_delta_weight("default"), rtol=1e-4, atol=1e-7)
    x = torch.randn(3, 48, generator=gen)
    theirs.train()
    with_penalty = theirs.base_model(x).loss  # AdaLoraModel.forward adds the penalty (a bare PeftModel skips it)
    theirs.peft_config["default"].orth_reg_weight = 0.0
    penalty = with_penalty - theirs.base_model(x).loss
    assert float(penalty.detach()) > 0.01
    torch.testing.assert_close(regularisation(svdtune.adapters(ours).values()), penalty, rtol=1e-5, atol=1e-7)


def test_lora2_penalty_is_the_mean_over_its_four_factors() -> None:
    """LoRA² uses the same normalisation, one term per factor tensor (plus its cross-plane term)."""
    from svdtune.methods.masked import orthogonality

    model = svdtune.adapt(copy.deepcopy(TwoLayers()), "lora2", r=R, orth_reg=0.3, cross_reg=0.0,
                          orthonormal_init=False, targets="down", verbose=False)
    a = svdtune.adapters(model)["down"]
    expected = 0.3 * sum(orthogonality(t) for t in (a.A, a.B, a.aa, a.bb)) / 4
    torch.testing.assert_close(a.extra_loss(), expected, rtol=1e-6, atol=0)
