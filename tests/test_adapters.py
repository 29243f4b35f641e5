"""Adapter layers: forward = base + x ΔWᵀ (dense), merge/unmerge, init, injection rules, gradients."""
import math
import re

import pytest
import torch
from torch import nn

from stiefel_opt import functional as F
from stiefel_opt.adapters import (
    METHODS,
    AdapterConfig,
    AdapterLayer,
    adapter_layers,
    inject_adapters,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from stiefel_opt.adapters.layers import LAYERS
from stiefel_opt.manifolds import StiefelParameter


# --- tiny models shared with the other adapter test files (no downloads) ---------------------
def tiny_bert(num_labels=None):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    if num_labels is None:
        return BertModel(cfg).eval()
    cfg.num_labels = num_labels
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def randomize(layer: AdapterLayer, scale: float = 0.3) -> None:
    """Give every free factor random values (ΔW ≠ 0); Stiefel factors become new random points."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            if isinstance(p, StiefelParameter):
                p.copy_(F.random_point(*p.shape, dtype=p.dtype))
            elif name == "lora_magnitude":
                p.mul_(1.0 + scale * torch.rand_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


class Conv1D(nn.Module):
    """transformers' Conv1D contract (weight (in, out), y = x W + b), without importing it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(0.2 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def make_base(kind, n_in, n_out, dtype=torch.float64):
    base = nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)
    return base.to(dtype)


def dense_delta(layer) -> torch.Tensor:
    """ΔW (out×in) from the raw parameters, written independently of the layer's own code."""
    s = layer.scaling
    if layer.method in ("lora", "dora"):
        return s * layer.lora_B @ layer.lora_A
    if layer.method == "symlora":
        q, c = layer.spectral.Q, layer.spectral.core
        core = torch.diag(c) if c.dim() == 1 else 0.5 * (c + c.T)
        return s * q @ core @ q.T
    left, core, right = (layer.X, layer.theta, layer.Y) if layer.method == "polar" else (layer.U, layer.S, layer.V)
    core = torch.diag(core) if core.dim() == 1 else core
    return s * left @ core @ right.T


def dense_forward(layer, x):
    w = layer.base_weight()
    bias = layer.base_layer.bias
    dw = dense_delta(layer)
    if layer.method == "dora":
        full = w + dw
        full = layer.lora_magnitude[:, None] * full / full.norm(dim=1, keepdim=True)
        return x @ full.T + bias
    return x @ (w + dw).T + bias


CASES = [(m, k, c) for m in METHODS for k in ("linear", "conv1d")
         for c in (("full", "diag") if m in ("polar", "stella", "symlora") else (None,))]


def build(method, kind="linear", core=None, n_in=12, n_out=12, r=3, dtype=torch.float64, **kw):
    if method != "symlora" and n_in == n_out == 12:
        n_out = 10
    return LAYERS[method](make_base(kind, n_in, n_out, dtype), r, lora_alpha=6, name="blk.proj", core=core, **kw)


# --- forward, merge, unmerge -----------------------------------------------------------------
@pytest.mark.parametrize("method,kind,core", CASES)
def test_forward_equals_dense(method, kind, core):
    layer = build(method, kind, core)
    randomize(layer)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
    expected = dense_forward(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), dense_delta(layer), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, layer.base_layer(x))


@pytest.mark.parametrize("method,kind,core", CASES)
def test_merge_unmerge_round_trip(method, kind, core):
    layer = build(method, kind, core, dtype=torch.float32)
    randomize(layer)
    x = torch.randn(4, layer.in_features)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge(safe_merge=True)
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.base_layer.weight, w0)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge_refuses_non_finite(method):
    layer = build(method, dtype=torch.float32)
    randomize(layer)
    free = [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")
            and not isinstance(p, StiefelParameter) and n != "lora_magnitude"]
    with torch.no_grad():
        free[0].view(-1)[0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite|NaN"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("method", METHODS)
def test_forward_never_forms_delta_w(method, monkeypatch):
    layer = build(method, n_in=12, dtype=torch.float32)
    randomize(layer)

    def forbidden(*a, **k):
        raise AssertionError("ΔW materialized in the forward pass")

    monkeypatch.setattr(layer, "delta_weight", forbidden)
    out = layer(torch.randn(3, layer.in_features))
    assert out.shape == (3, layer.out_features)


@pytest.mark.parametrize("method,kind,core", CASES)
def test_forward_has_no_out_by_in_product(method, kind, core):
    """No matrix product in the unmerged forward yields an (out, in) or (in, out) tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in products:
                self.shapes.append(tuple(out.shape))
            return out

    layer = build(method, kind, core, dtype=torch.float32)
    layer.base_layer.requires_grad_(False)  # frozen, as after inject_adapters
    randomize(layer)
    x = torch.randn(3, layer.in_features)
    with Record() as rec:
        layer(x).sum().backward()
    square = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    assert rec.shapes and not square & set(rec.shapes), rec.shapes


def test_low_precision_base_keeps_fp32_adapters():
    layer = build("polar", dtype=torch.bfloat16)
    assert layer.X.dtype == torch.float32 and layer.theta.dtype == torch.float32
    out = layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_dropout_applies_to_adapter_input_only_in_training():
    layer = LAYERS["lora"](nn.Linear(8, 8), 2, lora_alpha=2, lora_dropout=0.5)
    randomize(layer)
    x = torch.randn(64, 8)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


# --- init ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "polar", "symlora"])
def test_zero_start_methods_leave_the_output_unchanged(method):
    layer = build(method)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-12, atol=1e-12)
    if method in ("lora", "dora"):
        assert float(layer.lora_A.detach().abs().sum()) > 0  # A random, B = 0: gradient reaches B


def test_stella_starts_at_identity_core():
    layer = build("stella")
    assert torch.equal(layer.S, torch.eye(layer.r, dtype=layer.S.dtype))
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.U @ layer.V.T)
    diag = build("stella", core="diag")
    assert torch.equal(diag.S, torch.ones(diag.r, dtype=diag.S.dtype))


@pytest.mark.parametrize("method", ["polar", "stella", "symlora"])
def test_stiefel_factors_are_tall_feasible_parameters(method):
    layer = build(method, n_in=12)
    factors = layer.stiefel_factors()
    assert len(factors) == (1 if method == "symlora" else 2)
    for name, p in factors.items():
        assert isinstance(p, StiefelParameter)
        assert p.shape[0] >= p.shape[1] == layer.r
        assert float(F.distance(p.detach())) < 1e-10


@pytest.mark.parametrize("method", ["polar", "stella"])
def test_svd_init_takes_top_singular_vectors(method):
    layer = build(method, init="svd")
    u, s, vh = torch.linalg.svd(layer.base_weight().detach(), full_matrices=False)
    left, right = (layer.X, layer.Y) if method == "polar" else (layer.U, layer.V)
    r = layer.r
    torch.testing.assert_close(left.detach().abs(), u[:, :r].abs(), rtol=0, atol=1e-6)
    torch.testing.assert_close(right.detach().abs(), vh[:r].T.abs(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_rslora_scaling(method):
    plain = LAYERS[method](nn.Linear(8, 8), 4, lora_alpha=8)
    rs = LAYERS[method](nn.Linear(8, 8), 4, lora_alpha=8, use_rslora=True)
    assert plain.scaling == 2.0 and rs.scaling == 8 / math.sqrt(4)
    m = inject_adapters(Toy(), AdapterConfig(method, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert {layer.scaling for layer in adapter_layers(m).values()} == {4.0}


def test_lora_init_is_peft_kaiming_uniform():
    layer = LAYERS["lora"](nn.Linear(400, 6), 8, lora_alpha=8)
    bound = 1.0 / math.sqrt(400)  # kaiming_uniform_(a=√5) on fan_in = 400
    a = layer.lora_A.detach()
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.9 * bound
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(layer.lora_B.detach(), torch.zeros(6, 8))


@pytest.mark.parametrize("method", ["polar", "stella"])
def test_default_init_is_random_orthonormal_not_the_svd(method):
    one, two = build(method), build(method)
    svd = build(method, init="svd")
    for name in ((("X", "Y")) if method == "polar" else ("U", "V")):
        assert not torch.allclose(getattr(one, name).abs(), getattr(two, name).abs())
        assert not torch.allclose(getattr(one, name).abs(), getattr(svd, name).abs())
    core = one.theta if method == "polar" else one.S
    expected = torch.zeros(3, 3) if method == "polar" else torch.eye(3)
    assert torch.equal(core.detach(), expected.to(core.dtype))


def test_dora_dropout_follows_peft_formula():
    layer = build("dora", lora_dropout=0.5)
    randomize(layer)
    layer.train()
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5, training=True)
    w, dw = layer.base_weight(), dense_delta(layer)
    scale = layer.lora_magnitude / (w + dw).norm(dim=1)
    expected = layer.base_layer(x) + (scale - 1) * (xd @ w.T) + scale * (xd @ dw.T)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y, dense_forward(layer, x))  # dropout did act


def test_symlora_rejects_non_square_naming_module():
    with pytest.raises(ValueError, match=r"blk\.proj.*square.*out=10, in=12"):
        LAYERS["symlora"](nn.Linear(12, 10), 2, lora_alpha=2, name="blk.proj")
    with pytest.raises(ValueError, match=r"symlora adapter on head.*out=3, in=8"):
        inject_adapters(Toy(), AdapterConfig("symlora", r=2, target_modules="all-linear"))


def test_rank_above_dimension_is_rejected():
    with pytest.raises(ValueError, match="r=9 exceeds"):
        LAYERS["polar"](nn.Linear(12, 8), 9, lora_alpha=9, name="x")


def test_unsupported_base_and_init():
    with pytest.raises(TypeError, match="Embedding"):
        LAYERS["lora"](nn.Embedding(5, 4), 2, lora_alpha=2)
    with pytest.raises(ValueError, match="init"):
        AdapterConfig("symlora", target_modules=["q"], init="svd")
    with pytest.raises(ValueError, match="core"):
        AdapterConfig("lora", target_modules=["q"], core="diag")
    with pytest.raises(ValueError, match="method"):
        AdapterConfig("vera", target_modules=["q"])
    with pytest.raises(ValueError, match="target_modules is required"):
        AdapterConfig("lora")


# --- injection -------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.layers:
            x = b.norm(x + b.v_proj(torch.tanh(b.q_proj(x))))
        return self.head(x)


def wrapped(model):
    return sorted(adapter_layers(model))


def test_target_list_matches_exact_names_and_suffixes():
    m = inject_adapters(Toy(), AdapterConfig("lora", r=2, target_modules=["q_proj", "layers.1.v_proj"]))
    assert wrapped(m) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]


def test_target_string_is_a_full_regex_match():
    m = inject_adapters(Toy(), AdapterConfig("polar", r=2, target_modules=r"layers\.\d\.q_proj"))
    assert wrapped(m) == ["layers.0.q_proj", "layers.1.q_proj"]
    with pytest.raises(ValueError, match="matches no module"):  # 'q_proj' is not a full match
        inject_adapters(Toy(), AdapterConfig("polar", r=2, target_modules="q_proj"))


def test_exclude_modules_and_all_linear_on_plain_module():
    m = inject_adapters(Toy(), AdapterConfig("stella", r=2, target_modules="all-linear",
                                              exclude_modules=["v_proj"]))
    assert wrapped(m) == ["head", "layers.0.q_proj", "layers.1.q_proj"]


def test_no_match_lists_candidates():
    with pytest.raises(ValueError, match=r"matches no module.*layers\.0\.q_proj.*head"):
        inject_adapters(Toy(), AdapterConfig("lora", target_modules=["k_proj"]))


def test_target_of_wrong_type_is_an_error():
    with pytest.raises(TypeError, match="LayerNorm"):
        inject_adapters(Toy(), AdapterConfig("lora", r=2, target_modules=["norm"]))


def test_double_injection_is_refused():
    m = inject_adapters(Toy(), AdapterConfig("lora", r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(m, AdapterConfig("lora", r=2, target_modules=["v_proj"]))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_flow_only_to_adapters(method):
    m = inject_adapters(Toy(), AdapterConfig(method, r=2, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["head"]))
    for layer in adapter_layers(m).values():
        randomize(layer)
    m(torch.randn(5, 8)).square().sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(".base_layer." not in n and ".norm." not in n for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    assert all(float(p.grad.abs().sum()) > 0 for n, p in m.named_parameters() if n in trainable)


def test_modules_to_save_are_not_wrapped_and_must_exist():
    m = inject_adapters(Toy(), AdapterConfig("lora", r=2, target_modules="all-linear", modules_to_save=["head"]))
    assert "head" not in wrapped(m)
    with pytest.raises(ValueError, match="classifier"):
        inject_adapters(Toy(), AdapterConfig("lora", r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_gives_plain_model_with_same_outputs(method):
    m = inject_adapters(Toy(), AdapterConfig(method, r=2, target_modules=["q_proj", "v_proj"]))
    for layer in adapter_layers(m).values():
        randomize(layer)
    x = torch.randn(4, 8)
    y = m(x)
    merge_adapters(m)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    unmerge_adapters(m)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    merge_and_unload(m)
    assert not adapter_layers(m)
    assert type(m.layers[0].q_proj) is nn.Linear
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_all_linear_skips_a_classification_head():
    m = tiny_bert(num_labels=3)
    inject_adapters(m, AdapterConfig("lora", r=2, target_modules="all-linear"))
    names = wrapped(m)
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler


def test_all_linear_skips_transformers_output_head_and_wraps_conv1d():
    m = tiny_gpt2()
    inject_adapters(m, AdapterConfig("polar", r=2, target_modules="all-linear"))
    names = wrapped(m)
    assert "lm_head" not in names
    assert names == sorted(f"transformer.h.{i}.{s}" for i in range(2)
                           for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    layer = adapter_layers(m)["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (48, 16)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-1] in ("X", "Y", "theta") for n in trainable)


# --- param groups ----------------------------------------------------------------------------
def test_param_groups_split_stiefel_free_and_no_decay():
    from stiefel_opt.adapters import param_groups

    m = inject_adapters(Toy(), AdapterConfig("stella", r=2, target_modules=["q_proj"], core="diag",
                                             modules_to_save=["head"]))
    groups = param_groups(m, lr=1e-3, stiefel_lr_scale=4.0, weight_decay=0.1)
    assert len(groups) == 3
    stiefel, decay, no_decay = groups
    assert stiefel["manifold"] == "stiefel" and stiefel["weight_decay"] == 0.0 and stiefel["lr"] == 4e-3
    assert len(stiefel["params"]) == 4 and all(isinstance(p, StiefelParameter) for p in stiefel["params"])
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(3, 8)]
    assert no_decay["weight_decay"] == 0.0 and sorted(p.shape for p in no_decay["params"]) == [(2,), (2,), (3,)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups)  # a stock optimizer accepts the groups as they are
    assert opt.param_groups[0]["manifold"] == "stiefel"
    with pytest.raises(ValueError, match="lr"):
        param_groups(m, lr=0.0)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), lr=1.0)


@pytest.mark.parametrize("method", METHODS)
def test_adapters_follow_model_dtype_casts(method):
    m = inject_adapters(Toy(), AdapterConfig(method, r=2, target_modules=["q_proj", "v_proj"])).double()
    for layer in adapter_layers(m).values():
        randomize(layer)
    x = torch.randn(3, 8, dtype=torch.float64)
    layer = adapter_layers(m)["layers.0.q_proj"]
    torch.testing.assert_close(layer(x), dense_forward(layer, x), rtol=1e-10, atol=1e-10)
    assert m(x).dtype == torch.float64


# --- clear errors and meta-device construction (issue 14) ---------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_injection_on_the_meta_device(method):
    """Large models are built on meta, then materialized: every method injects there too."""
    with torch.device("meta"):
        m = Toy()
    inject_adapters(m, AdapterConfig(method, r=2, target_modules=["q_proj", "v_proj"]))
    layers = adapter_layers(m)
    assert len(layers) == 4
    assert all(p.is_meta for p in m.parameters())
    for layer in layers.values():
        for p in layer.stiefel_factors().values():
            assert isinstance(p, StiefelParameter) and p.shape == (8, 2)


def test_svd_init_on_the_meta_device():
    with torch.device("meta"):
        m = Toy()
    inject_adapters(m, AdapterConfig("polar", r=2, target_modules=["q_proj"], init="svd"))
    assert m.layers[0].q_proj.X.is_meta


@pytest.mark.parametrize("field,value", [("target_modules", 5), ("target_modules", ["q_proj", 3]),
                                         ("exclude_modules", 1.5), ("modules_to_save", [None]),
                                         ("lora_alpha", "8"), ("lora_dropout", None), ("use_rslora", "yes")])
def test_config_field_of_wrong_type_names_the_field(field, value):
    kw = {"target_modules": ["q_proj"], field: value}
    with pytest.raises(TypeError, match=rf"AdapterConfig: {field} must be"):
        AdapterConfig("lora", r=2, **kw)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_config_lora_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        AdapterConfig("lora", r=2, lora_alpha=alpha, target_modules=["q_proj"])


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save"])
def test_config_list_entries_must_be_non_empty(field):
    kw = {"target_modules": ["q_proj"], field: ["q_proj", ""]}
    with pytest.raises(ValueError, match=rf"AdapterConfig: {field} has an empty entry"):
        AdapterConfig("lora", r=2, **kw)


def test_stiefel_parameter_and_constrain_on_the_meta_device():
    from stiefel_opt.manifolds import constrain

    p = StiefelParameter(torch.empty(6, 3, device="meta"))
    assert p.is_meta and p.shape == (6, 3)
    assert StiefelParameter.random(6, 3, device="meta").is_meta
    for init in ("project", "keep", "random"):
        lin = nn.Linear(3, 6, device="meta")
        assert constrain(lin, init=init).is_meta and isinstance(lin.weight, StiefelParameter)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 3)])
def test_zero_size_stiefel_data_is_refused(shape):
    from stiefel_opt.manifolds import constrain

    with pytest.raises(ValueError, match=rf"StiefelParameter: .*{re.escape(str(shape))} is zero-size"):
        StiefelParameter(torch.empty(shape))
    lin = nn.Linear(3, 6)
    lin.weight = nn.Parameter(torch.empty(shape))
    with pytest.raises(ValueError, match=r"constrain\(Linear\.weight\): .*zero-size"):
        constrain(lin)
