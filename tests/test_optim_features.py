"""Optimizer features: safe step, state_dict, schedulers, GradScaler, compile, deepcopy, non-finite
gradients, low precision, conv/wide/batched parameters, wrappers' handle, HF Trainer."""
import copy
import io
import warnings

import pytest
import torch

import stiefel_opt.functional as F
from stiefel_opt import (LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, Stiefel, StiefelParameter,
                         constrain, landing, riemannian)

ALL = [
    (RiemannianSGD, dict(lr=0.05, momentum=0.9)),
    (RiemannianAdam, dict(lr=0.01)),
    (LandingSGD, dict(lr=0.05, momentum=0.9)),
    (LandingAdam, dict(lr=0.01, amsgrad=True)),
]
IDS = [c.__name__ for c, _ in ALL]


def _model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 6)
    constrain(lin, "weight")  # wide 6×12: orthonormal rows
    conv = torch.nn.Conv2d(2, 3, 2)
    constrain(conv, "weight")  # (3, 2·2·2) wide
    tall = torch.nn.Parameter(F.random_point(20, 4))
    return lin, conv, tall


def _loss(mods, seed):
    lin, conv, tall = mods
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 12, generator=g)
    img = torch.randn(2, 2, 5, 5, generator=g)
    return (lin(x) ** 2).mean() + conv(img).pow(2).mean() + (tall.T @ torch.randn(20, 4, generator=g)).trace()


def _opt(cls, kw, mods):
    lin, conv, tall = mods
    return cls([{"params": [lin.weight, conv.weight]}, {"params": [tall], "manifold": "stiefel"},
                {"params": [lin.bias, conv.bias]}], **kw)


def _train(opt, mods, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(mods, i).backward()
        opt.step()


@pytest.mark.parametrize("cls,kw", ALL, ids=IDS)
def test_feasible_and_state_dict_resume_bit_identical(cls, kw):
    mods = _model()
    opt = _opt(cls, kw, mods)
    _train(opt, mods, 3)
    buf = io.BytesIO()
    torch.save({"model": [m.state_dict() if isinstance(m, torch.nn.Module) else m.detach().clone() for m in mods],
                "opt": opt.state_dict()}, buf)
    _train(opt, mods, 3, start=3)
    expected = [p.detach().clone() for m in mods for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m])]

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    mods2 = _model()
    mods2[0].load_state_dict(ck["model"][0])
    mods2[1].load_state_dict(ck["model"][1])
    with torch.no_grad():
        mods2[2].copy_(ck["model"][2])
    opt2 = _opt(cls, kw, mods2)
    opt2.load_state_dict(ck["opt"])
    _train(opt2, mods2, 3, start=3)
    got = [p.detach() for m in mods2 for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m])]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    tol = 1e-5 if cls in (RiemannianSGD, RiemannianAdam) else 0.5
    for w, nd in ((mods[0].weight, 2), (mods[1].weight, 4), (mods[2], 2)):
        assert float(Stiefel(ndim=nd).distance(w.detach()).max()) <= tol


def test_load_state_dict_layout_mismatch():
    a = StiefelParameter(F.random_point(8, 3))
    opt = RiemannianAdam([a], lr=0.1)
    a.grad = torch.randn(8, 3)
    opt.step()
    sd = opt.state_dict()
    b = StiefelParameter(F.random_point(9, 3))
    with pytest.raises(ValueError, match="different parameter layout"):
        RiemannianAdam([b], lr=0.1).load_state_dict(sd)


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("cls", [LandingSGD, LandingAdam])
def test_safe_step_under_adversarial_gradients(cls, lam):
    eps = 0.5
    x = StiefelParameter(F.random_point(4, 30, 5), check=False)
    kw = {"momentum": 0.9} if cls is LandingSGD else {}
    opt = cls([x], lr=10.0, lam=lam, safe_eps=eps, **kw)
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        scale = (1e8, 1e-8, 1.0, 1e4)[i % 4] * (-1) ** i
        x.grad = scale * torch.randn(x.shape, generator=g)
        opt.step()
        assert float(F.distance(x.detach()).max()) <= eps + 1e-6
        assert torch.isfinite(x).all()


def test_landing_pulls_off_manifold_start_back():
    x = StiefelParameter(F.random_point(30, 4) * 1.1, check=False)
    opt = LandingSGD([x], lr=0.5)
    for _ in range(60):
        x.grad = torch.zeros_like(x)
        opt.step()
    assert float(F.distance(x.detach())) < 1e-6


def test_scheduler_changes_lr():
    x = StiefelParameter(F.random_point(10, 3))
    opt = LandingAdam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1)
    x.grad = torch.randn(10, 3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    before = x.detach().clone()
    opt.step()
    assert 0 < float((x.detach() - before).norm()) < 0.1


@pytest.mark.parametrize("cls,kw", ALL, ids=IDS)
def test_nonfinite_skip_and_raise(cls, kw):
    x = StiefelParameter(F.random_point(3, 10, 4))
    y = StiefelParameter(F.random_point(10, 4))
    opt = cls([x, y], **kw)
    g = torch.randn(3, 10, 4)
    g[1, 0, 0] = float("nan")
    x.grad, y.grad = g, torch.randn(10, 4)
    before = x.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(x.detach()[1], before[1])
    assert not torch.equal(x.detach()[0], before[0])
    assert torch.isfinite(x).all()
    assert opt.state[x]["nonfinite_skips"] == 1
    assert all(torch.isfinite(v).all() for v in opt.state[x].values() if isinstance(v, torch.Tensor))
    state_y = {k: v.clone() for k, v in opt.state[y].items() if isinstance(v, torch.Tensor)}
    y_before = y.detach().clone()
    x.grad, y.grad = torch.randn(3, 10, 4), torch.full((10, 4), float("inf"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(y.detach(), y_before)  # the whole parameter skipped: value, moments and step kept
    for k, v in state_y.items():
        assert torch.equal(opt.state[y][k], v), k
    opt2 = cls([x], nonfinite="raise", **kw)
    x.grad = g
    with pytest.raises(FloatingPointError):
        opt2.step()


@pytest.mark.parametrize("cls,kw", ALL, ids=IDS)
def test_bf16_master_weights(cls, kw):
    x = StiefelParameter(F.random_point(40, 4).bfloat16())
    opt = cls([x], **kw)
    a = torch.randn(40, 40)
    a = a @ a.T
    for _ in range(20):
        opt.zero_grad()
        (-torch.trace(x.float().T @ a @ x.float())).backward()
        opt.step()
    master = opt.state[x]["master"]
    assert master.dtype == torch.float32 and x.dtype == torch.bfloat16
    tol = 1e-5 if cls in (RiemannianSGD, RiemannianAdam) else 0.5
    assert float(F.distance(master)) <= tol
    assert torch.equal(master.bfloat16(), x.detach())
    sd = opt.state_dict()
    opt2 = cls([x], **kw)
    opt2.load_state_dict(sd)
    assert opt2.state[x]["master"].dtype == torch.float32


def test_grad_scaler_skips_inf_step():
    x = StiefelParameter(F.random_point(10, 3))
    w = torch.nn.Parameter(torch.randn(3))
    opt = RiemannianAdam([x, w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = (x @ w).sum()
    scaler.scale(loss).backward()
    x.grad[0, 0] = float("inf")
    before = x.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(x.detach(), before)
    opt.zero_grad()
    scaler.scale((x @ w).sum()).backward()
    scaler.step(opt)
    assert not torch.equal(x.detach(), before)
    assert float(F.distance(x.detach())) < 1e-5


# Both filtered warnings come from torch itself while compiling (a stock torch.optim.Adam raises
# the same ones under warnings-as-errors): dynamo reads .grad of non-leaf tensors it builds.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_train_step_matches_eager():
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        x = torch.nn.Parameter(F.random_point(12, 3))
        w = torch.nn.Parameter(torch.randn(3))
        return x, w, LandingAdam([{"params": [x], "manifold": "stiefel"}, {"params": [w]}], lr=0.05)

    def step(x, w, opt, inp):
        opt.zero_grad()
        loss = ((inp @ x) @ w).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    inp = torch.randn(5, 12)
    x1, w1, o1 = make()
    x2, w2, o2 = make()
    compiled = torch.compile(step)
    for _ in range(3):
        step(x1, w1, o1, inp)
        compiled(x2, w2, o2, inp)
    torch.testing.assert_close(x1.detach(), x2.detach())
    torch.testing.assert_close(w1.detach(), w2.detach())


@pytest.mark.parametrize("cls,kw", ALL, ids=IDS)
def test_deepcopy_continues_identically(cls, kw):
    # plain parameters declared Stiefel by their param group (a StiefelParameter off the manifold,
    # as landing leaves it, cannot be deep-copied: its constructor re-checks orthonormality)
    lin, conv, tall = _model()
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone())
    mods = (lin, conv, tall)
    opt = cls([{"params": [lin.weight, tall], "manifold": "stiefel"},
               {"params": [conv.weight], "manifold": Stiefel(ndim=4)},
               {"params": [lin.bias, conv.bias]}], **kw)
    _train(opt, mods, 2)
    mods2, opt2 = copy.deepcopy((mods, opt))
    _train(opt, mods, 2, start=2)
    _train(opt2, mods2, 2, start=2)
    assert torch.equal(mods[0].weight, mods2[0].weight)
    assert torch.equal(mods[2], mods2[2])


def test_wrappers_handle_remove_and_deepcopy():
    x = StiefelParameter(F.random_point(10, 3))
    opt = riemannian(torch.optim.AdamW([x], lr=0.1))
    with pytest.raises(ValueError, match="already wrapped"):
        landing(opt)
    x.grad = torch.randn(10, 3)
    opt.step()
    assert float(F.distance(x.detach())) < 1e-5
    assert float(F.sym(x.detach().T @ opt.state[x]["exp_avg"]).norm()) < 1e-5
    opt2 = copy.deepcopy(opt)
    assert opt2.stiefel_handle.wrap.kind == "riemannian"
    opt.stiefel_handle.remove()
    assert not hasattr(opt, "stiefel_handle")
    x.grad = torch.randn(10, 3)
    opt.step()
    assert float(F.distance(x.detach())) > 1e-4  # plain AdamW again


def test_landing_wrapper_rejects_weight_decay_on_stiefel_group():
    x = StiefelParameter(F.random_point(10, 3))
    with pytest.raises(ValueError, match="weight_decay"):
        landing(torch.optim.AdamW([x], lr=0.1))


def test_hf_trainer_accepts_optimizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    constrain(model.bert.encoder.layer[0].attention.self.query, "weight")

    class DS(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([1 + i, 2, 3, 4]), "labels": torch.tensor(i % 2)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for how in ("cls_and_kwargs", "optimizers"):
            args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                  report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
            kwargs = {}
            if how == "optimizers":
                kwargs["optimizers"] = (LandingAdam(model.parameters(), lr=1e-3), None)
            else:
                kwargs["optimizer_cls_and_kwargs"] = (RiemannianAdam, {"lr": 1e-3})
            trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), **kwargs)
            trainer.train()
            w = model.bert.encoder.layer[0].attention.self.query.weight
            assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                              (LandingAdam, RiemannianAdam))
            assert float(F.distance(w.detach())) < 0.5


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated:FutureWarning")  # inductor's own
@pytest.mark.parametrize("cls,kw,whole_graph", [(LandingAdam, dict(lr=0.05, amsgrad=True), True),
                                                (RiemannianAdam, dict(lr=0.05), True),
                                                (RiemannianSGD, dict(lr=0.05, momentum=0.9, nesterov=True), False)],
                         ids=["LandingAdam", "RiemannianAdam", "RiemannianSGD"])
def test_compile_option_matches_eager_without_recompiling(cls, kw, whole_graph):
    """compile=True: the same steps as eager to rounding, over a changing lr (a schedule) and two
    shapes; once the first steps have compiled (static, then dynamic shapes; momentum buffer absent,
    then present), new lr and step values compile nothing. The Adam steps compile without a graph
    break (the lr and bias corrections are 0-d tensors there: no Python number may be read off them)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    a = torch.randn(4, 12, 12)
    a = a @ a.mT

    def run(compile):
        torch.manual_seed(0)
        xs = [StiefelParameter(F.random_point(12, 3)), StiefelParameter(F.random_point(2, 7, 2))]
        opt = cls(xs, compile=compile, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        graphs = []
        for _ in range(6):
            opt.zero_grad()
            loss = -(xs[0].mT @ a[0] @ xs[0]).trace() - (xs[1].mT @ a[1:3, :7, :7] @ xs[1]).diagonal(0, -2, -1).sum()
            loss.backward()
            opt.step()
            sched.step()
            graphs.append(counters["stats"]["unique_graphs"])
        return [x.detach().clone() for x in xs], graphs

    counters.clear()
    compiled, graphs = run(True)
    assert graphs[0] >= 1 and graphs[-1] == graphs[2]
    assert not whole_graph or not counters["graph_break"], dict(counters["graph_break"])
    eager, _ = run(False)
    atol = 5e-6 if cls is RiemannianAdam else 1e-6  # compiled, the polar factor takes the eigh route
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=atol)
        assert float(F.distance(c).max()) < 0.5


def test_compile_option_rejects_bad_values():
    x = StiefelParameter(F.random_point(6, 2))
    with pytest.raises(ValueError, match="compile must be True or False"):
        LandingAdam([x], compile="yes")
    with pytest.raises(ValueError, match="does not combine|use backend='torch'"):
        LandingSGD([x], compile=True, backend="triton")
