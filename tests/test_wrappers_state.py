"""riemannian()/landing() wrappers: weights_only-safe state dicts (torch.save/torch.load and the HF
Trainer resume), what a load restores or refuses, and sparse gradients."""
import copy
import io
import warnings

import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import Stiefel, StiefelParameter, landing, riemannian

from _trainer import tiny_trainer


def _params():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(F.random_point(10, 3))
    wide = torch.nn.Parameter(F.random_point(3, 12))
    own = StiefelParameter(F.random_point(8, 2))
    bias = torch.nn.Parameter(torch.randn(5))
    return [tall, wide, own, bias]


def _wrapped(kind, ps, **kw):
    tall, wide, own, bias = ps
    opt = torch.optim.AdamW([{"params": [tall], "manifold": Stiefel("canonical", "qr"), "weight_decay": 0.0},
                             {"params": [wide, own], "manifold": "stiefel", "weight_decay": 0.0},
                             {"params": [bias], "weight_decay": 0.1}], lr=0.05)
    return riemannian(opt, **kw) if kind == "riemannian" else landing(opt, lam=0.5, **kw)


def _train(opt, ps, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        opt.zero_grad()
        sum((p * torch.randn(p.shape, generator=g)).sum() + p.square().sum() for p in ps).backward()
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["riemannian", "landing"])
def test_state_dict_loads_weights_only_and_resumes_bit_identical(kind):
    ps = _params()
    opt = _wrapped(kind, ps)
    _train(opt, ps, 3)
    sd = opt.state_dict()
    loaded = _roundtrip(sd)  # raises UnpicklingError if a Stiefel object is in the dict
    assert loaded["param_groups"][0]["manifold"] == {"manifold": "stiefel", "metric": "canonical",
                                                     "retraction": "qr", "ndim": 2}
    assert isinstance(opt.param_groups[0]["manifold"], Stiefel)  # the live groups keep their Stiefel

    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ps2[2] = StiefelParameter(ps[2].detach().clone(), check=False)  # landing leaves it near the manifold
    opt2 = _wrapped(kind, ps2)
    opt2.load_state_dict(loaded)
    assert isinstance(loaded["param_groups"][0]["manifold"], dict)  # the caller's dict is not changed
    m = opt2.param_groups[0]["manifold"]
    assert isinstance(m, Stiefel) and (m.metric, m.retraction) == ("canonical", "qr")
    assert opt2.state_dict()["param_groups"] == sd["param_groups"]

    _train(opt, ps, 3, start=3)
    _train(opt2, ps2, 3, start=3)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
    if kind == "riemannian":
        assert float(F.distance(ps2[0].detach())) < 1e-5


def test_remove_leaves_a_weights_only_state_dict_and_rewrapping_works():
    ps = _params()
    opt = _wrapped("riemannian", ps)
    _train(opt, ps, 1)
    opt.stiefel_handle.remove()
    _roundtrip(opt.state_dict())
    opt = riemannian(opt)
    _train(opt, ps, 2)
    assert max(float(F.distance(p.detach())) for p in ps[:3]) < 1e-5
    assert isinstance(_roundtrip(opt.state_dict())["param_groups"][1]["manifold"], dict)


def test_loading_a_plain_state_dict_keeps_the_wrappers_manifold():
    """A checkpoint of the same AdamW saved before wrapping has no "manifold": the loaded group keeps
    the current one instead of silently becoming Euclidean."""
    ps = _params()
    plain = torch.optim.AdamW([{"params": [ps[0]], "weight_decay": 0.0}, {"params": ps[1:3], "weight_decay": 0.0},
                               {"params": [ps[3]], "weight_decay": 0.1}], lr=0.05)
    _train(plain, ps, 1)
    with torch.no_grad():
        for p in ps[:3]:
            p.copy_(F.project(p))
    opt = _wrapped("riemannian", ps)
    opt.load_state_dict(_roundtrip(plain.state_dict()))
    assert isinstance(opt.param_groups[0]["manifold"], Stiefel)
    _train(opt, ps, 3)
    assert max(float(F.distance(p.detach())) for p in ps[:3]) < 1e-5


def test_landing_refuses_a_loaded_weight_decay_on_a_stiefel_group_before_changing_anything():
    ps = _params()
    opt = _wrapped("landing", ps)
    _train(opt, ps, 1)
    sd = _roundtrip(opt.state_dict())
    sd["param_groups"][1]["weight_decay"] = 0.01
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param group 1 .*weight_decay=0.01.*allow_weight_decay=True"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][k]["exp_avg"], before["state"][k]["exp_avg"]) for k in before["state"])


@pytest.mark.parametrize("kind", ["riemannian", "landing"])
def test_sparse_gradient_raises_naming_the_parameter(kind):
    ps = _params()
    opt = _wrapped(kind, ps)
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[1].grad = ps[1].grad.to_sparse()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 \(shape \(3, 12\)\).*sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state

    lin = torch.nn.Linear(12, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(F.random_point(3, 12))
    opt = riemannian(torch.optim.SGD([{"params": list(lin.named_parameters()), "manifold": "stiefel"}], lr=0.1))
    lin.weight.grad = torch.randn(3, 12).to_sparse()
    with pytest.raises(ValueError, match=r"parameter 'weight' .*sparse"):
        opt.step()


def test_hf_trainer_resumes_a_wrapped_adamw_with_group_declared_stiefel_params(tmp_path):
    """Trainer(optimizers=(riemannian(AdamW(groups with "manifold"))...)): the checkpoint's optimizer.pt
    loads with torch.load(weights_only=True) and the resumed run equals the uninterrupted one."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
        model = GPT2LMHeadModel(cfg)
        attn = model.transformer.h[0].attn
        stiefel = [attn.c_attn.weight, attn.c_proj.weight]  # 16×48 (orthonormal rows) and 16×16
        with torch.no_grad():
            for w in stiefel:
                w.copy_(F.project(w))
        others = [p for p in model.parameters() if all(p is not w for w in stiefel)]
        opt = torch.optim.AdamW([{"params": stiefel, "manifold": "stiefel", "weight_decay": 0.0},
                                 {"params": others, "weight_decay": 0.01}], lr=3e-2)
        return model, riemannian(opt), stiefel


    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, stiefel = build()
        tiny_trainer(model, opt, tmp_path / "full").train()
        saved = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=True)
        assert saved["param_groups"][0]["manifold"]["manifold"] == "stiefel"
        model2, opt2, stiefel2 = build()
        tiny_trainer(model2, opt2, tmp_path / "resumed").train(
            resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert isinstance(opt2.param_groups[0]["manifold"], Stiefel)
    assert all(float(opt2.state[w]["step"]) == 6 for w in stiefel2)
    for w in stiefel2:
        assert float(F.distance(w.detach())) < 1e-5
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_a_malformed_manifold_spec_is_refused_at_load_naming_the_group():
    ps = _params()
    opt = _wrapped("riemannian", ps)
    _train(opt, ps, 1)
    sd = _roundtrip(opt.state_dict())
    sd["param_groups"][0]["manifold"] = {"manifold": "stiefel", "metric": "hyperbolic", "retraction": "qr", "ndim": 2}
    with pytest.raises(ValueError, match=r"riemannian\(\): loaded param group 0 has manifold .*metric must be one of"):
        opt.load_state_dict(sd)
    sd["param_groups"][0]["manifold"] = {"manifold": "sphere"}
    with pytest.raises(ValueError, match=r"loaded param group 0 has manifold \{'manifold': 'sphere'\}"):
        opt.load_state_dict(sd)
    assert isinstance(opt.param_groups[0]["manifold"], Stiefel) and opt.param_groups[0]["manifold"].metric == "canonical"
