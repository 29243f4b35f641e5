"""Training a tiny GPT-2 (built from a config) through the adapters with our optimizers, and one
short HF ``Trainer`` run with a PoLAR adapter: the loss goes down, every Stiefel factor stays
feasible, gradients reach only the adapters."""
import pytest
import torch

from stiefel_opt.adapters import METHODS, AdapterConfig, adapter_layers, inject_adapters, param_groups
from stiefel_opt.diagnostics import feasibility
from stiefel_opt.manifolds import StiefelParameter


def lm(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     initializer_range=0.2, loss_type="ForCausalLM")
    return GPT2LMHeadModel(cfg)


def tokens(n=8, length=12):
    return torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(1))


def adapted_lm(method):
    model = lm()
    targets = ["attn.c_proj"] if method == "symlora" else "all-linear"  # symlora: square weights only
    return inject_adapters(model, AdapterConfig(method, r=4, lora_alpha=4, target_modules=targets)).train()


def stiefel_params(model):
    return [p for p in model.parameters() if isinstance(p, StiefelParameter)]


def make_optimizer(name, groups, lr):
    from stiefel_opt import optim

    if name == "LandingAdam":
        return optim.LandingAdam(groups, lr=lr, lam=10.0)  # safe-step cap 1/(2λ) = 0.05 ≥ lr
    if name == "RiemannianAdam":
        return optim.RiemannianAdam(groups, lr=lr)
    return optim.riemannian(torch.optim.AdamW(groups, lr=lr))


OPTIMIZERS = ["LandingAdam", "RiemannianAdam", "riemannian(AdamW)"]


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_keeps_factors_feasible(method, opt_name):
    model = adapted_lm(method)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(opt_name, param_groups(model, lr=5e-2), lr=5e-2)
    ids = tokens()
    losses, gaps = [], []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        gaps.append(max((feasibility(p) for p in stiefel_params(model)), default=0.0))
    assert losses[-1] < 0.9 * losses[0], losses
    if opt_name == "LandingAdam":  # infeasible method: within the safe-step bound ε = 0.5, landing
        assert max(gaps) < 0.5 and gaps[-1] < 0.05, gaps
    else:  # retraction after every step
        assert max(gaps) < 1e-4, gaps
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    if method in ("polar", "stella", "symlora"):
        assert stiefel_params(model)


def test_hf_trainer_runs_polar_with_our_optimizer_and_logs_diagnostics(tmp_path):
    from transformers import Trainer, TrainingArguments

    from stiefel_opt.adapters import AdapterDiagnosticsCallback
    from stiefel_opt.optim import LandingAdam

    model = adapted_lm("polar")
    ids = tokens(16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    opt = LandingAdam(param_groups(model, lr=2e-2), lr=2e-2, lam=10.0)
    callback = AdapterDiagnosticsCallback(every=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[callback])
    x_before = adapter_layers(model)["transformer.h.0.attn.c_attn"].X.detach().clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) >= 5 and logged[-1]["loss"] < logged[0]["loss"]
    diag = [h for h in trainer.state.log_history if "adapters/feasibility_max" in h]
    assert [h["step"] for h in diag] == list(range(2, 13, 2)) and diag[-1]["adapters/feasibility_max"] < 0.05
    assert [step for step, _ in callback.history] == list(range(2, 13, 2))
    last = callback.history[-1][1]
    assert len(last) == 8 and all(row["feasibility"] < 0.05 for row in last)  # landing: near, not on
    assert all(row["update_norm"] > 0 and row["stable_rank"] >= 1.0 for row in last)
    x_after = adapter_layers(model)["transformer.h.0.attn.c_attn"].X.detach()
    assert not torch.allclose(x_after, x_before) and feasibility(x_after) < 0.05
