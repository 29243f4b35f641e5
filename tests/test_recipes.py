"""``stiefel_opt.recipes``: each published recipe, built for a model with injected adapters, against a
transcription of the official update (tests/_official.py): a Linear 64→48 with r = 4, float64, 20
steps, a reference copy of the model stepped by the transcription from identical tensors, gradients
from the same data."""
import copy
import inspect
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from _official import max_diff, polar_step, stella_step
from torch import nn

import stiefel_opt as so
from stiefel_opt import recipes
from stiefel_opt.adapters import adapter_layers, lora_pairs

F64 = torch.float64
STEPS = 20


class Tiny(nn.Module):
    """One Linear 64→48 (or n→n) and a ``config.hidden_size``, as a transformers model has."""

    def __init__(self, out=48, inp=64, hidden=32):
        super().__init__()
        self.proj = nn.Linear(inp, out, bias=False, dtype=F64)
        self.config = SimpleNamespace(hidden_size=hidden)

    def forward(self, x):
        return self.proj(x)


def _model(method, core=None, out=48, inp=64):
    torch.manual_seed(0)
    model = Tiny(out, inp)
    so.inject_adapters(model, so.AdapterConfig(method, r=4, lora_alpha=4, target_modules=["proj"], core=core))
    return model


def _backward(model, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, model.proj.in_features, dtype=F64, generator=g)
    y = torch.randn(16, model.proj.out_features, dtype=F64, generator=g)
    model.zero_grad(set_to_none=True)
    (model(x) - y).square().mean().backward()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


POLAR_CASES = [(5e-3, None, 0.0), (5e-3, 0.05, 0.0), (1.0, None, 0.01), (1.0, 0.05, 0.01)]


@pytest.mark.parametrize("lam,max_norm,wd", POLAR_CASES,
                         ids=[f"lam={c[0]}-clip={c[1]}-wd={c[2]}" for c in POLAR_CASES])
def test_polar_recipe_is_the_official_polar_update(lam, max_norm, wd):
    model = _model("polar")
    layer = model.proj
    with torch.no_grad():
        layer.theta.copy_(0.5 * torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(1)))
    ref = copy.deepcopy(model)
    opt = recipes.polar(model, lr=4e-3, lam=lam, weight_decay=wd, max_grad_norm=max_norm)
    ref_opt = torch.optim.AdamW(_trainable(ref), lr=4e-3, weight_decay=wd)
    factors = [(ref.proj.X, False), (ref.proj.Y, False)]
    norms, worst = [], 0.0
    for step in range(STEPS):
        _backward(ref, step)
        norms.append(polar_step(_trainable(ref), factors, ref_opt, lam, max_norm))
        _backward(model, step)
        opt.step()
        worst = max(worst, max_diff(_trainable(ref), _trainable(model)))
    assert worst <= 1e-12, worst
    assert max_diff([layer.theta], [torch.zeros(4, 4)]) > 0.1  # Θ moved: the comparison has substance
    if max_norm is not None:
        assert min(norms) > 2 * max_norm  # the clipping acted at every step


STELLA_CASES = [(False, None, "full", 0.0), (True, 0.05, "diag", 0.01), (16.0, None, "full", 0.01)]


@pytest.mark.parametrize("grad_scaling,max_norm,core,wd", STELLA_CASES,
                         ids=[f"scaling={c[0]}-clip={c[1]}-core={c[2]}-wd={c[3]}" for c in STELLA_CASES])
def test_stella_recipe_is_the_official_stella_update(grad_scaling, max_norm, core, wd):
    model = _model("stella", core=core)
    ref = copy.deepcopy(model)
    opt = recipes.stella(model, lr=5e-3, grad_scaling=grad_scaling, weight_decay=wd, max_grad_norm=max_norm)
    layer = ref.proj
    ref_opt = torch.optim.AdamW([{"params": [layer.U, layer.V], "weight_decay": 0.0},
                                 {"params": [layer.S], "weight_decay": wd}], lr=5e-3)
    hidden = {False: None, True: model.config.hidden_size}.get(grad_scaling, grad_scaling)
    norms, worst = [], 0.0
    for step in range(STEPS):
        _backward(ref, step)
        norms.append(stella_step(_trainable(ref), [(layer.U, False), (layer.V, False)], ref_opt, hidden, max_norm))
        _backward(model, step)
        opt.step()
        worst = max(worst, max_diff(_trainable(ref), _trainable(model)))
    assert worst <= 1e-12, worst
    assert max(so.feasibility(p) for p in (model.proj.U, model.proj.V)) < 1e-12
    if max_norm is not None:
        assert min(norms) > 2 * max_norm


def test_stella_grad_scaling_needs_a_hidden_size():
    model = _model("stella")
    del model.config
    with pytest.raises(ValueError, match="model.config.hidden_size"):
        recipes.stella(model)
    assert recipes.stella(model, grad_scaling=32).stiefel_handle.wrap.hidden_size == 32


def _lora_model(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, dtype=F64), nn.ReLU(), nn.Linear(12, 10, dtype=F64))
    return so.inject_adapters(model, so.AdapterConfig(method, r=3, target_modules="all-linear"))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_rite_recipe_pairs_every_lora_layer(method):
    model = _lora_model(method)
    opt = recipes.lora_rite(model, lr=1e-2)
    assert isinstance(opt, so.LoRARITE)
    pairs = lora_pairs(model)
    assert len(pairs) == 2 and sum(g["num_pairs"] for g in opt.param_groups) == len(pairs)
    ordered = [p for g in opt.param_groups for p in g["params"]]
    assert ordered[:4] == [p for pair in pairs for p in pair]       # the pairs, in order
    assert {id(p) for p in ordered} == {id(p) for p in _trainable(model)}   # + DoRA magnitudes
    with torch.no_grad():
        for _, b in pairs:
            b.normal_()
    before = [layer.delta_weight().clone() for layer in adapter_layers(model).values()]
    model(torch.randn(5, 16, dtype=F64)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, layer.delta_weight()) for b, layer in zip(before, adapter_layers(model).values()))


def test_symlora_recipe_keeps_q_orthonormal_and_learns_the_spectrum():
    model = _model("symlora", out=48, inp=48)
    spectral = model.proj.spectral
    opt = recipes.symlora(model, lr=1e-2)
    assert opt.param_groups[0]["params"] == [spectral.Q] and "manifold" in opt.param_groups[0]
    q0 = spectral.Q.detach().clone()
    for step in range(STEPS):
        _backward(model, step)
        opt.step()
    assert so.feasibility(spectral.Q) < 1e-12
    assert max_diff([spectral.Q], [q0]) > 1e-3 and float(spectral.core.detach().abs().min()) > 0


@pytest.mark.parametrize("recipe,method", [("polar", "stella"), ("stella", "polar"), ("lora_rite", "polar"),
                                           ("symlora", "lora")])
def test_a_recipe_refuses_other_adapters_naming_them(recipe, method):
    model = _lora_model(method) if method == "lora" else _model(method)
    with pytest.raises(ValueError, match=rf"recipes\.{recipe}: the model has adapters .*{method}"):
        getattr(recipes, recipe)(model, lr=1e-3)
    with pytest.raises(ValueError, match="no adapters"):
        getattr(recipes, recipe)(Tiny(), lr=1e-3)


@pytest.mark.parametrize("recipe,defaults", [(recipes.polar, recipes.POLAR_DEFAULTS),
                                             (recipes.stella, recipes.STELLA_DEFAULTS)])
def test_recipe_defaults_are_the_published_hyperparameters(recipe, defaults):
    for name, param in inspect.signature(recipe).parameters.items():
        if name in defaults:
            assert param.default == defaults[name], name


def test_cosine_with_warmup_with_and_without_transformers(monkeypatch):
    lrs = {}
    for source in ("transformers", "fallback"):
        if source == "fallback":
            monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=4e-3)
        sched = recipes.cosine_with_warmup(opt, total_steps=100)
        seq = []
        for _ in range(100):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs[source] = seq
    assert lrs["transformers"] == pytest.approx(lrs["fallback"], abs=1e-18)
    seq = lrs["fallback"]
    assert seq[0] == 0.0 and seq[3] == 4e-3 and seq[1] == pytest.approx(4e-3 / 3)   # ⌈0.03·100⌉ = 3 steps
    assert seq[52] == pytest.approx(4e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 97)))
    with pytest.raises(ValueError, match="warmup_ratio"):
        recipes.cosine_with_warmup(opt, 10, warmup_ratio=1.0)
