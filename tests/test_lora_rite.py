"""LoRA-RITE: transformation invariance, r = 1, convergence, LoRA training, API contracts."""
import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stiefel_opt import functional as F
from stiefel_opt.optim.lora_rite import LoRARITE

from _trainer import tiny_trainer


def _well_conditioned(r, dtype=torch.float64):
    """Q diag(σ) Q'ᵀ with σ in [0.6, 1.9]: an invertible r×r matrix of condition number ≤ 3.2."""
    q1 = torch.linalg.qr(torch.randn(r, r, dtype=dtype))[0]
    q2 = torch.linalg.qr(torch.randn(r, r, dtype=dtype))[0]
    return q1 @ torch.diag(torch.linspace(0.6, 1.9, r, dtype=dtype)) @ q2.T


def _problem(out=24, inp=20, rank=6, dtype=torch.float64):
    t = torch.randn(out, rank, dtype=dtype) @ torch.randn(rank, inp, dtype=dtype) / math.sqrt(rank)
    x = torch.randn(64, inp, dtype=dtype)
    return t, x


def _run(a, b, target, x, make_opt, steps):
    """Fit ΔW = B A to the map x ↦ x targetᵀ (a quartic loss, so the Hessian changes along the run)."""
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    opt = make_opt(a, b)
    for _ in range(steps):
        opt.zero_grad()
        err = x @ (b @ a - target).T
        loss = 0.5 * err.square().mean() + 0.05 * err.square().mean().square()
        loss.backward()
        opt.step()
    return (b @ a).detach()


def _rite(**kw):
    return lambda a, b: LoRARITE([(a, b)], **kw)


def _adam(**kw):
    return lambda a, b: torch.optim.Adam([a, b], **kw)


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def _reparametrization(kind, r):
    """S: a general well-conditioned matrix, a pure scale 30·I, or a pure rotation (orthogonal)."""
    if kind == "scale":
        return 30.0 * torch.eye(r, dtype=torch.float64)
    if kind == "rotation":
        return torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
    return _well_conditioned(r)


@pytest.mark.parametrize("r, init, kind", [(4, "random", "general"), (4, "peft", "general"), (1, "random", "general"),
                                           (4, "random", "scale"), (4, "random", "rotation")])
def test_invariant_to_factor_reparametrization_adam_is_not(r, init, kind):
    """ΔW after 50 steps from (A, B) and from (S⁻¹A, BS) agree; the gradient has rank 6 > r, so B
    has full rank after its first step from 0 (invariance needs full-rank factors)."""
    target, x = _problem()
    a = torch.randn(r, 20, dtype=torch.float64) / math.sqrt(20)
    b = torch.randn(24, r, dtype=torch.float64) * 0.3 if init == "random" else torch.zeros(24, r, dtype=torch.float64)
    s = _reparametrization(kind, r)
    a2, b2 = torch.linalg.solve(s, a), b @ s
    w1 = _run(a, b, target, x, _rite(lr=1e-2), 50)
    w2 = _run(a2, b2, target, x, _rite(lr=1e-2), 50)
    assert float(w1.norm()) > 0.1  # ΔW moved
    assert _rel(w2, w1) < 1e-4
    w1 = _run(a, b, target, x, _adam(lr=1e-2), 50)
    w2 = _run(a2, b2, target, x, _adam(lr=1e-2), 50)
    assert _rel(w2, w1) > 1e-2


def test_invariant_with_escaped_mass_off_and_no_clip():
    target, x = _problem()
    a = torch.randn(4, 20, dtype=torch.float64) / math.sqrt(20)
    b = torch.randn(24, 4, dtype=torch.float64) * 0.3
    s = _well_conditioned(4) * 7.0  # also a global scale
    kw = dict(lr=2e-2, escaped_mass=False, clip=None, betas=(0.8, 0.99))
    w1 = _run(a, b, target, x, _rite(**kw), 50)
    w2 = _run(torch.linalg.solve(s, a), b @ s, target, x, _rite(**kw), 50)
    assert _rel(w2, w1) < 1e-4


def test_rank_one_is_normalized_factor_descent():
    """r = 1, β₁ = β₂ = 0, ε → 0: δA = −η √in ∇_A/(‖∇_A‖ ‖B‖) and δB = −η √out ∇_B/(‖∇_B‖ ‖A‖)."""
    out, inp, lr = 9, 7, 0.1
    a = torch.randn(1, inp, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, 1, dtype=torch.float64, requires_grad=True)
    g = torch.randn(out, inp, dtype=torch.float64)
    (g * (b @ a)).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a0, b0 = a.detach().clone(), b.detach().clone()
    LoRARITE([(a, b)], lr=lr, betas=(0.0, 0.0), eps=1e-300, escaped_mass=False, clip=None).step()
    da = -lr * math.sqrt(inp) * ga / (ga.norm() * b0.norm())
    db = -lr * math.sqrt(out) * gb / (gb.norm() * a0.norm())
    torch.testing.assert_close(a.detach() - a0, da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach() - b0, db, rtol=1e-10, atol=1e-12)


def test_converges_on_low_rank_regression_with_unbalanced_factors():
    """½‖BA − T‖², T of rank 3 (σ from 1 to 0.1), 40×40, factors scaled by 100 and 1/100."""
    torch.manual_seed(1)
    u = torch.linalg.qr(torch.randn(40, 3))[0]
    v = torch.linalg.qr(torch.randn(40, 3))[0]
    target = u @ torch.diag(torch.tensor([1.0, 0.3, 0.1])) @ v.T

    def fit(make_opt, steps=300):
        g = torch.Generator().manual_seed(2)
        a = (torch.randn(3, 40, generator=g) * 10.0).requires_grad_()
        b = (torch.randn(40, 3, generator=g) * 1e-3).requires_grad_()
        opt = make_opt(a, b)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (b @ a - target).square().sum()).backward()
            opt.step()
        return float((b @ a - target).detach().norm() / target.norm())

    rite = fit(_rite(lr=1e-2))
    adam = fit(_adam(lr=1e-2))
    assert rite < 1e-3
    assert adam > 10 * rite


def test_trains_small_transformers_model_with_lora_adapters():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from stiefel_opt.adapters import AdapterConfig, inject_adapters, lora_pairs

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     initializer_range=0.2, loss_type="ForCausalLM")
    model = inject_adapters(GPT2LMHeadModel(cfg),
                            AdapterConfig(method="lora", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    pairs = lora_pairs(model)
    assert len(pairs) == 4 and all(a.shape[0] == b.shape[1] == 4 for a, b in pairs)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for pair in pairs for t in pair}
    opt = LoRARITE(pairs, lr=2e-2)
    ids = torch.randint(1, 32, (8, 12), generator=torch.Generator().manual_seed(3))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_fn())
    assert last < 0.8 * first
    assert all(torch.isfinite(t).all() for pair in pairs for t in pair)


def test_plain_params_get_torch_adamw_bit_identically():
    a = torch.randn(3, 10, requires_grad=True)
    b = torch.randn(8, 3, requires_grad=True)
    w = torch.randn(8, 10, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    w2, bias2 = w.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    ours = LoRARITE([{"pairs": [(a, b)], "params": [w, bias], **kw}])
    ref = torch.optim.AdamW([w2, bias2], **kw)
    x = torch.randn(16, 10)
    for _ in range(7):
        for opt, ww, bb in ((ours, w, bias), (ref, w2, bias2)):
            opt.zero_grad()
            y = x @ (ww + (b @ a if opt is ours else 0)).T + bb
            y.square().mean().backward()
        # the same gradient for the plain parameters
        w2.grad, bias2.grad = w.grad.clone(), bias.grad.clone()
        ours.step()
        ref.step()
        assert torch.equal(w, w2) and torch.equal(bias, bias2)


def test_same_shape_pairs_batched_equal_one_at_a_time():
    target, x = _problem(out=12, inp=10)
    pairs = [(torch.randn(3, 10, dtype=torch.float64).requires_grad_(),
              torch.randn(12, 3, dtype=torch.float64).requires_grad_()) for _ in range(3)]
    solo = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in pairs]
    together = LoRARITE(pairs, lr=1e-2, clip=None)
    alone = [LoRARITE([p], lr=1e-2, clip=None) for p in solo]
    for _ in range(10):
        for group, opts in ((pairs, [together]), (solo, alone)):
            for opt in opts:
                opt.zero_grad()
            sum(0.5 * (x @ (b @ a - target).T).square().mean() for a, b in group).backward()
            for opt in opts:
                opt.step()
    for (a, b), (a2, b2) in zip(pairs, solo):
        torch.testing.assert_close(b @ a, b2 @ a2, rtol=1e-12, atol=1e-12)
    # one stack: the three pairs' moments are views of one buffer per side
    storage = {together.state[a]["exp_avg_sq"].untyped_storage().data_ptr() for a, _ in pairs}
    assert len(storage) == 1


def _unmagnified_norm_sq(a, b):
    """‖ḡ_A‖² + ‖ḡ_B‖² of one pair: each gradient in its partner's basis (ḡ = ∇_X R⁺)."""
    _, ra_pinv = F.rite_basis(a.detach().T)
    _, rb_pinv = F.rite_basis(b.detach())
    return (F.rite_unmagnified_gram(a.grad.T, rb_pinv).trace()
            + F.rite_unmagnified_gram(b.grad, ra_pinv).trace())


def test_clip_scales_all_pairs_by_the_global_unmagnified_norm():
    """clip = c is clip = None on gradients scaled by min(1, c / ‖ḡ‖), ‖ḡ‖ over every pair (two shapes)."""
    g = torch.Generator().manual_seed(5)
    shapes = [((3, 10), (8, 3)), ((2, 7), (5, 2))]
    pairs = [(torch.randn(sa, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(sb, generator=g, dtype=torch.float64).requires_grad_()) for sa, sb in shapes]
    ref = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in pairs]
    clipped = LoRARITE(pairs, lr=1e-2, clip=0.5, eps=1e-3)
    plain = LoRARITE(ref, lr=1e-2, clip=None, eps=1e-3)
    coeffs = []
    for step in range(6):
        for (a, b), (a2, b2) in zip(pairs, ref):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64) * (1e-3, 1e-2, 10.0)[step % 3]
            b.grad = torch.randn(b.shape, generator=g, dtype=torch.float64) * (1e-3, 1e-2, 10.0)[step % 3]
        norm = float(sum(_unmagnified_norm_sq(a, b) for a, b in pairs)) ** 0.5
        coeff = min(1.0, 0.5 / (norm + 1e-6))
        coeffs.append(coeff)
        for (a, b), (a2, b2) in zip(pairs, ref):
            a2.grad, b2.grad = a.grad * coeff, b.grad * coeff
        clipped.step()
        plain.step()
    assert min(coeffs) < 0.1 and max(coeffs) == 1.0  # both regimes were exercised
    for (a, b), (a2, b2) in zip(pairs, ref):
        torch.testing.assert_close(a, a2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, b2, rtol=1e-10, atol=1e-12)
    unclipped = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in ref]
    plain2 = LoRARITE(unclipped, lr=1e-2, clip=None, eps=1e-3)
    for (a, b), (a2, b2) in zip(pairs, unclipped):
        a.grad, b.grad = 1e3 * torch.ones_like(a), 1e3 * torch.ones_like(b)
        a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    clipped.step()
    plain2.step()
    assert not torch.allclose(pairs[0][0], unclipped[0][0])  # clip changed the step


def test_escaped_mass_option_sets_the_damping():
    """escaped_mass=True accumulates ρ > 0 once the partner's basis turns; False keeps ρ = 0; the runs differ."""
    target, x = _problem()
    a = torch.randn(4, 20, dtype=torch.float64) / math.sqrt(20)
    b = torch.randn(24, 4, dtype=torch.float64) * 0.3
    runs = {}
    for on in (True, False):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        opt = LoRARITE([(aa, bb)], lr=2e-2, escaped_mass=on)
        for _ in range(10):
            opt.zero_grad()
            (0.5 * (x @ (bb @ aa - target).T).square().mean()).backward()
            opt.step()
        runs[on] = (bb @ aa).detach(), float(opt.state[aa]["escaped_mass"]), float(opt.state[bb]["escaped_mass"])
    assert runs[True][1] > 0 and runs[True][2] > 0
    assert runs[False][1] == 0.0 and runs[False][2] == 0.0
    assert _rel(runs[True][0], runs[False][0]) > 1e-6


def test_bf16_factors_are_stepped_in_fp32():
    """A bf16 pair takes exactly the fp32 step from the same values and gradients, rounded to bf16."""
    g = torch.Generator().manual_seed(7)
    a16 = torch.randn(3, 12, generator=g).bfloat16().requires_grad_()
    b16 = torch.randn(9, 3, generator=g).bfloat16().requires_grad_()
    a32, b32 = a16.detach().float().requires_grad_(), b16.detach().float().requires_grad_()
    low, ref = LoRARITE([(a16, b16)], lr=1e-2), LoRARITE([(a32, b32)], lr=1e-2)
    for _ in range(4):
        a16.grad = torch.randn(a16.shape, generator=g).bfloat16()
        b16.grad = torch.randn(b16.shape, generator=g).bfloat16()
        a32.grad, b32.grad = a16.grad.float(), b16.grad.float()
        low.step()
        ref.step()
        assert a16.dtype == torch.bfloat16 and torch.equal(a16, a32.bfloat16())
        assert torch.equal(b16, b32.bfloat16())
        with torch.no_grad():  # the reference continues from the rounded factors, as the bf16 run does
            a32.copy_(a16)
            b32.copy_(b16)
    assert low.state[a16]["exp_avg"].dtype == torch.float32
    assert torch.equal(low.state[a16]["exp_avg_sq"], ref.state[a32]["exp_avg_sq"])


def test_hf_trainer_trains_lora_pairs_and_resumes_from_checkpoint(tmp_path):
    """Trainer(optimizers=(LoRARITE(...), None)): its scheduler drives our lr, the loss goes down,
    and resuming from a checkpoint (our state_dict through torch.save/torch.load) gives the same
    factors as the uninterrupted run."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from stiefel_opt.adapters import AdapterConfig, inject_adapters, lora_pairs

    def build():
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                         initializer_range=0.2, loss_type="ForCausalLM")
        model = inject_adapters(GPT2LMHeadModel(cfg), AdapterConfig(method="lora", r=4, lora_alpha=8,
                                                                    target_modules=["c_attn"]))
        return model, LoRARITE(lora_pairs(model), lr=3e-2)


    model, opt = build()
    t = tiny_trainer(model, opt, tmp_path / "full")
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == 0.0  # the Trainer's linear schedule reached its end
    pairs = lora_pairs(model)
    assert all(float(opt.state[x]["step"]) == 6 for pair in pairs for x in pair)
    assert all(torch.count_nonzero(b) > 0 for _, b in pairs)

    model2, opt2 = build()
    t2 = tiny_trainer(model2, opt2, tmp_path / "resumed")
    t2.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert all(float(opt2.state[x]["step"]) == 6 for pair in lora_pairs(model2) for x in pair)
    for (a, b), (a2, b2) in zip(pairs, lora_pairs(model2)):
        assert torch.equal(a, a2) and torch.equal(b, b2)


def _train(pairs, opt, x, steps):
    """A few steps on ‖x (BA)ᵀ − y‖² with y = x·1 (B = 0 is not a critical point)."""
    for _ in range(steps):
        opt.zero_grad()
        sum((x @ (b @ a).T.to(x.dtype) - x.sum(-1, keepdim=True)).square().mean() for a, b in pairs).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(dtype):
    x = torch.randn(16, 10)
    make = lambda: [(torch.randn(2, 10, dtype=dtype).requires_grad_(),  # noqa: E731
                     torch.randn(6, 2, dtype=dtype).requires_grad_()) for _ in range(2)]
    pairs = make()
    opt = LoRARITE(pairs, lr=1e-2)
    _train(pairs, opt, x, 5)
    saved_pairs = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in pairs]
    saved = copy.deepcopy(opt.state_dict())
    _train(pairs, opt, x, 5)
    resumed = LoRARITE(saved_pairs, lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.state[saved_pairs[0][0]]["exp_avg"].dtype == torch.float32
    _train(saved_pairs, resumed, x, 5)
    for (a, b), (a2, b2) in zip(pairs, saved_pairs):
        assert torch.equal(a, a2) and torch.equal(b, b2)


def test_deepcopy_continues_identically():
    x = torch.randn(16, 10)
    pairs = [(torch.randn(2, 10).requires_grad_(), torch.randn(6, 2).requires_grad_())]
    opt = LoRARITE(pairs, lr=1e-2)
    _train(pairs, opt, x, 3)
    pairs2, opt2 = copy.deepcopy((pairs, opt))
    _train(pairs, opt, x, 3)
    _train(pairs2, opt2, x, 3)
    assert torch.equal(pairs[0][0], pairs2[0][0]) and torch.equal(pairs[0][1], pairs2[0][1])


def test_load_state_dict_of_other_layout_is_rejected():
    p1 = [(torch.randn(2, 10, requires_grad=True), torch.randn(6, 2, requires_grad=True))]
    p2 = p1 + [(torch.randn(2, 10, requires_grad=True), torch.randn(6, 2, requires_grad=True))]
    with pytest.raises(ValueError, match="different layout"):
        LoRARITE(p2).load_state_dict(LoRARITE(p1).state_dict())


def test_nonfinite_gradient_skips_only_that_pair():
    pairs = [(torch.randn(2, 10, requires_grad=True), torch.randn(6, 2, requires_grad=True)) for _ in range(3)]
    before = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
    opt = LoRARITE(pairs, lr=1e-2)
    for a, b in pairs:
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    pairs[1][1].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(pairs[1][0], before[1][0]) and torch.equal(pairs[1][1], before[1][1])
    assert not torch.equal(pairs[0][0], before[0][0]) and not torch.equal(pairs[2][1], before[2][1])
    assert opt.nonfinite_skips == 1
    assert float(opt.state[pairs[1][0]]["step"]) == 0.0 and float(opt.state[pairs[0][0]]["step"]) == 1.0
    assert torch.count_nonzero(opt.state[pairs[1][0]]["exp_avg"]) == 0
    for a, b in pairs:
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()  # the next finite step works for every pair
    assert all(torch.isfinite(t).all() for pair in pairs for t in pair)

    # LoRA's B = 0 at init: A's gradient reaches the check through R_B⁺ = 0 (0·NaN is still NaN)
    a, b = torch.randn(2, 10, requires_grad=True), torch.zeros(6, 2, requires_grad=True)
    zero_b = LoRARITE([(a, b)], lr=1e-2)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a.grad[1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        zero_b.step()
    assert zero_b.nonfinite_skips == 1 and torch.count_nonzero(b) == 0

    plain = torch.randn(3, requires_grad=True)
    plain.grad = torch.randn(3)
    strict = LoRARITE([{"pairs": [pairs[0]], "params": [plain]}], nonfinite="raise")
    pairs[0][0].grad[0, 0] = float("inf")
    kept = [t.detach().clone() for t in (*pairs[0], plain)]
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in .*pair 0 in param group 0.*nothing was"):
        strict.step()
    assert all(torch.equal(t, k) for t, k in zip((*pairs[0], plain), kept))  # AdamW's parameters too


def test_side_state_is_views_of_one_stack_reused_across_steps():
    pairs = [(torch.randn(2, 10, requires_grad=True), torch.randn(6, 2, requires_grad=True)) for _ in range(2)]
    opt = LoRARITE(pairs, lr=1e-2)
    bases = []
    for _ in range(3):
        for a, b in pairs:
            a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        bases.append([opt.state[a][k]._base for a, _ in pairs for k in ("exp_avg", "exp_avg_sq", "escaped_mass")])
    assert all(t is not None and t is u for t, u in zip(bases[1], bases[2]))  # no copy on the hot path
    assert bases[1][0] is bases[1][3]  # the two A factors share one exp_avg stack
    assert opt.state[pairs[0][0]]["exp_avg"].shape == (10, 2) and opt.state[pairs[0][0]]["escaped_mass"].shape == ()


def test_errors_name_the_pair():
    a, b = torch.randn(4, 10, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    bad = torch.randn(6, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"pair 1 of param group 0: A has shape \(4, 10\).*\(6, 3\)"):
        LoRARITE([(a, b), (a.detach().clone().requires_grad_(), bad)])
    with pytest.raises(ValueError, match=r"pair 0 of param group 1: A has shape \(4, 10\).*\(6, 3\)"):
        LoRARITE([{"pairs": [(a, b)]}, {"pairs": [(a.detach().clone().requires_grad_(), bad)]}])
    with pytest.raises(ValueError, match="pair 0 of param group 0: rank r = 4 exceeds"):
        LoRARITE([(torch.randn(4, 3, requires_grad=True), torch.randn(6, 4, requires_grad=True))])
    with pytest.raises(ValueError, match="appears twice"):
        LoRARITE([(a, b), (a, b)])
    with pytest.raises(TypeError, match="tuple"):
        LoRARITE([a, b])
    with pytest.raises(ValueError, match="betas"):
        LoRARITE([(a, b)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nonfinite"):
        LoRARITE([{"pairs": [(a, b)], "nonfinite": "ignore"}])
    for eps in (0.0, -1e-8, float("nan")):  # ε = 0 divides by zero on a zero gradient
        with pytest.raises(ValueError, match=r"LoRARITE: eps must be > 0"):
            LoRARITE([(a, b)], eps=eps)


def test_weight_decay_is_decoupled_and_zero_gradient_gives_no_step():
    a, b = torch.randn(2, 10, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = LoRARITE([(a, b)], lr=0.1, weight_decay=0.5)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    opt.step()
    torch.testing.assert_close(a.detach(), a0 * 0.95)
    torch.testing.assert_close(b.detach(), b0 * 0.95)


def test_lr_scheduler_and_bf16_factors():
    x = torch.randn(16, 10)
    pairs = [(torch.randn(2, 10, dtype=torch.bfloat16).requires_grad_(),
              torch.zeros(6, 2, dtype=torch.bfloat16).requires_grad_())]
    opt = LoRARITE(pairs, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        _train(pairs, opt, x, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert pairs[0][0].dtype == torch.bfloat16 and opt.state[pairs[0][0]]["exp_avg_sq"].dtype == torch.float32
    assert torch.count_nonzero(pairs[0][1]) > 0


# -- functional pieces -----------------------------------------------------------------------


def test_functional_pieces_match_their_formulas():
    n, r = 12, 3
    y = torch.randn(n, r, dtype=torch.float64)
    grad = torch.randn(n, r, dtype=torch.float64)
    u, r_pinv = F.rite_basis(y)
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(u @ torch.linalg.inv(r_pinv), y)
    gbar = grad @ r_pinv
    torch.testing.assert_close(F.rite_unmagnified_gram(grad, r_pinv), gbar.T @ gbar)
    v = torch.randn(r, r, dtype=torch.float64)
    v = v @ v.T
    m = torch.randn(n, r, dtype=torch.float64)
    u_old = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0]
    p, v_moved = F.rite_transport(u, u_old, v)
    torch.testing.assert_close(p, u.T @ u_old)
    torch.testing.assert_close(v_moved, p @ v @ p.T)
    k = F.rite_inv_root(v, torch.tensor(0.1, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(k @ k, torch.linalg.inv(v + 0.1 * torch.eye(r, dtype=torch.float64)))
    torch.testing.assert_close(F.rite_first_moment(m, p, grad, r_pinv, k, 0.9),
                               0.9 * m @ p.T + 0.1 * gbar @ k)
    x = torch.randn(n, r, dtype=torch.float64)
    torch.testing.assert_close(F.rite_update(x, m, r_pinv, 0.1, 0.99), 0.99 * x - 0.1 * m @ r_pinv.T)


def test_unmagnified_gram_is_invariant_to_partner_reparametrization():
    """With ∇_X = Ĝ Y: Y → Y S leaves the spectrum of ḡᵀḡ = R⁺ᵀ ∇ᵀ∇ R⁺ unchanged."""
    g_hat = torch.randn(15, 11, dtype=torch.float64)
    y = torch.randn(11, 3, dtype=torch.float64)
    s = _well_conditioned(3)
    spectra = []
    for yy in (y, y @ s):
        _, r_pinv = F.rite_basis(yy)
        spectra.append(torch.linalg.eigvalsh(F.rite_unmagnified_gram(g_hat @ yy, r_pinv)))
    torch.testing.assert_close(spectra[0], spectra[1])


def test_escaped_mass_is_zero_without_rotation_and_positive_with_it():
    v = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    u = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0]
    _, same = F.rite_transport(u, u, v)
    assert float(F.rite_escaped_mass(v, same)) == pytest.approx(0.0, abs=1e-12)
    u2 = torch.linalg.qr(u + 0.5 * torch.randn(10, 3, dtype=torch.float64))[0]
    _, moved = F.rite_transport(u2, u, v)
    rho = F.rite_escaped_mass(v, moved)
    assert float(rho) > 0
    lam_old = torch.linalg.eigvalsh(v)
    lam_new = torch.linalg.eigvalsh(moved + rho * torch.eye(3, dtype=torch.float64))
    assert bool((lam_new >= lam_old - 1e-12).all())


def test_basis_of_zero_factor_has_zero_pseudo_inverse():
    u, r_pinv = F.rite_basis(torch.zeros(2, 8, 3))
    assert u.shape == (2, 8, 3) and torch.count_nonzero(r_pinv) == 0
    _, r_pinv = F.rite_basis(torch.randn(8, 3, dtype=torch.bfloat16))
    assert r_pinv.dtype == torch.float32


class _OneShard(F.RowShards):
    """Row shards with a single shard (the sum over shards is the local value)."""

    def sum(self, t):
        return t


@given(r=st.integers(1, 4), data=st.data())
def test_row_sharded_basis_spans_the_factor_like_householder(r, data):
    """Under a row-sharded reduction rite_basis works from Grams (FSDP2): U has orthonormal columns
    on the kept directions and zero columns on the dropped ones, Y R⁺ = U, U Uᵀ is the projector onto
    range(Y) (what the Householder U gives), and the unmagnified-gradient Grams of the two bases have
    the same spectrum — so the LoRA-RITE step is the same. Rank k ≤ r, including Y = 0."""
    n = data.draw(st.integers(r, 12), label="n")
    k = data.draw(st.integers(0, r), label="rank")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    q1 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dt))[0][:, :k]
    q2 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=dt))[0][:, :k]
    sigma = scale * (0.5 + 1.5 * torch.rand(k, generator=g, dtype=dt))
    y = (q1 * sigma) @ q2.T
    grad = torch.randn(n + 2, r, generator=g, dtype=dt)
    u, r_pinv = F.rite_basis(y, rows=_OneShard(n))
    u_h, r_pinv_h = F.rite_basis(y)
    eye_k = torch.diag((u.norm(dim=0) > 0.5).to(dt))
    assert int(eye_k.trace()) == k
    assert torch.allclose(u.T @ u, eye_k, atol=1e-12)
    assert torch.allclose(y @ r_pinv, u, atol=1e-12)
    assert torch.allclose(u @ u.T, q1 @ q1.T, atol=1e-10)
    assert torch.allclose(u_h @ (u_h.T @ y), y, atol=1e-10 * scale)
    lam = torch.linalg.eigvalsh(F.rite_unmagnified_gram(grad, r_pinv))
    lam_h = torch.linalg.eigvalsh(F.rite_unmagnified_gram(grad, r_pinv_h))
    assert torch.allclose(lam, lam_h, rtol=1e-8, atol=1e-10 * float(lam_h.abs().max().clamp_min(1)))


def test_benchmark_small_grid_writes_reports_and_rite_ignores_the_scale_split(tmp_path):
    """benchmarks/lora_rite on a tiny grid: the reports are written, LoRA-RITE needs the same number
    of iterations for every split (s·A₀, B₀/s) of the same ΔW, and Adam does not."""
    from benchmarks import lora_rite as bench

    grid = bench.Grid(step_shapes=((2, 32, 4),), step_repeats=2, kappas=(10.0,), ranks=(4,),
                      scales=(1.0, 100.0), lrs=(1e-2,), cap=100, target=0.1)
    res = bench.run(out=tmp_path, grid=grid)
    assert {"lora_rite.json", "lora_rite.md", "lora_rite_k10_r4.png"} <= {p.name for p in tmp_path.iterdir()}
    (row,) = res["step_time"]
    assert row["rite_ms"] > 0 and row["adam_ms"] > 0
    one, hundred = res["regression"]
    assert one["rite_iters"] is not None and one["rite_iters"] == hundred["rite_iters"]
    assert hundred["adam_iters"] != one["adam_iters"]


def test_groups_without_any_pair_are_refused():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="no \\(A, B\\) pair.*lora_pairs"):
        LoRARITE([{"params": [w], "weight_decay": 0.0}])
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    opt = LoRARITE([{"params": [w]}, {"pairs": [(a, b)]}])  # one group with a pair is enough
    assert [g["num_pairs"] for g in opt.param_groups] == [0, 1]
