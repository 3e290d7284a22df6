"""GC-W's pure update math, corrector network and options."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcw import (
    Corrector,
    GCWOptions,
    bounded_coefficients,
    correction,
    cumulative_scale,
    direction_weights,
    hyper_loss,
    masked_adam_,
    next_dots,
    row_features,
    row_gram,
    trust_factor,
    unit_gram,
    update_trust,
)


def _history(C=6, D=4, n=10, seed=0, dtype=torch.float64):
    return torch.randn(C, D, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _delta(raw, V, rho):
    """ΔG from raw corrector outputs through the pure functions: (C, D), (C, D, n) -> (C, n)."""
    cos, norms = unit_gram(row_gram(V).to(V.dtype))
    return correction(direction_weights(bounded_coefficients(raw, cos, rho=rho), norms), V)


# --- options -----------------------------------------------------------------------------------------


def test_options_defaults_roundtrip_and_frozen():
    opts = GCWOptions()
    assert GCWOptions.from_dict(opts.to_dict()) == opts
    assert opts.n_dirs == 3 and opts.direction_names == ("grad", "ema10", "weight")
    custom = GCWOptions(rho=1.0, horizons=[5, 50, 500], cumulative_bound=None)
    assert custom.horizons == (5, 50, 500) and GCWOptions.from_dict(custom.to_dict()) == custom
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rho = 2.0
    with pytest.raises(TypeError):
        GCWOptions(0.5)  # keyword-only


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"rho": -1.0}, ["rho", "-1.0", "positive"]),
        ({"lr": float("inf")}, ["lr", "positive finite"]),
        ({"update_every": 0}, ["update_every", "positive int"]),
        ({"horizons": (100, 10)}, ["horizons", "increasing", "(100, 10)"]),
        ({"horizons": ()}, ["horizons", "1 to 4"]),
        ({"betas": (0.9, 1.0)}, ["betas", "[0, 1)"]),
        ({"trust": 1}, ["trust", "True or False"]),
        ({"cumulative_bound": 0.0}, ["cumulative_bound", "positive"]),
        ({"history_dtype": "float16"}, ["history_dtype", "'bfloat16' or 'param'", "'float16'"]),
    ],
)
def test_options_validation(kwargs, words):
    with pytest.raises(GCSurgeryError) as e:
        GCWOptions(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_options_from_dict_rejects_unknown_fields():
    with pytest.raises(GCSurgeryError, match=r"unknown GCWOptions field\(s\) \['roh'\].*valid fields.*'rho'"):
        GCWOptions.from_dict({"roh": 1.0})
    with pytest.raises(GCSurgeryError, match=r"needs a dict like GCWOptions\(\).to_dict\(\), got None"):
        GCWOptions.from_dict(None)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 4), "n_features must be a positive int, got 0"),
        (("8", 4), "n_features must be a positive int, got '8'"),
        ((8, -1), "n_dirs must be a positive int, got -1"),
        ((8, 4, 16, True), "hidden must be a positive int, got True"),
    ],
)
def test_corrector_arguments_are_validated(args, match):
    n_features, n_dirs, *rest = args
    d_model, hidden = rest or (16, 32)
    with pytest.raises(GCSurgeryError, match=match):
        Corrector(n_features, n_dirs, d_model=d_model, hidden=hidden)


@pytest.mark.parametrize("shape", [(5, 7), (7,), (1, 5, 8)])
def test_corrector_refuses_features_of_the_wrong_shape(shape):
    corrector = Corrector(8, 4, d_model=16, hidden=32)
    assert corrector(torch.randn(5, 8)).shape == (5, 4)
    with pytest.raises(GCSurgeryError, match=r"takes \(rows, 8\) features, got shape") as e:
        corrector(torch.randn(*shape))
    assert str(tuple(shape)) in str(e.value)


# --- correction math -------------------------------------------------------------------------------


def test_zero_initialised_corrector_gives_zero_correction():
    opts = GCWOptions()
    net = Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden)
    V = _history(C=7, D=opts.n_dirs, dtype=torch.float32)
    gram = row_gram(V)
    feats = row_features(gram, debias=torch.ones(opts.n_dirs), step=3, lr_ratio=0.5)
    assert feats.shape == (7, opts.n_features) and torch.isfinite(feats).all()
    raw = net(feats)
    assert torch.equal(raw, torch.zeros(7, opts.n_dirs))
    dG = _delta(raw, V, rho=0.5)
    assert torch.equal(dG, torch.zeros_like(dG))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rho=st.floats(0.01, 4.0),
    scale=st.floats(-6, 6),
    rows=st.integers(1, 9),
    n=st.integers(1, 40),
    collinear=st.booleans(),
)
def test_correction_is_bounded_per_row(seed, rho, scale, rows, n, collinear):
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(rows, 4, n, generator=gen, dtype=torch.float64)
    if collinear:  # nearly parallel directions, the case where norms could add up
        V = V[:, :1] * torch.tensor([1.0, 1.0001, -0.9999, 1.0], dtype=torch.float64)[:, None] + 1e-6 * V
    V[0, 0] = 0  # a dead row: zero gradient
    raw = torch.randn(rows, 4, generator=gen, dtype=torch.float64) * 10**scale
    dG = _delta(raw, V, rho)
    g_norm = torch.linalg.vector_norm(V[:, 0], dim=1)
    assert torch.isfinite(dG).all()
    assert (torch.linalg.vector_norm(dG, dim=1) <= rho * g_norm * (1 + 1e-5) + 1e-12).all()


def test_features_are_finite_for_degenerate_and_non_finite_history():
    V = _history(dtype=torch.float32)
    V[0] = 0
    V[1, 2] = float("nan")
    V[2, 1] = float("inf")
    feats = row_features(row_gram(V), debias=torch.ones(4), step=0, lr_ratio=1.0)
    assert torch.isfinite(feats).all()


def test_hyper_loss_matches_the_full_inner_product_and_its_autograd():
    gen = torch.Generator().manual_seed(2)
    V, h = _history(), torch.randn(6, 10, generator=gen, dtype=torch.float64)
    raw = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    cos, norms = unit_gram(row_gram(V).double())
    inv = torch.where(norms > 0, 1 / norms, 0)
    B = next_dots(h, V).double() * inv * norms[:, :1]  # ‖g‖⟨h, v̂_j⟩

    c1 = bounded_coefficients(raw, cos, rho=0.7).requires_grad_()
    direct = -(h * correction(direction_weights(c1, norms), V)).sum()
    (grad_direct,) = torch.autograd.grad(direct, c1)
    c2 = c1.detach().requires_grad_()
    small = hyper_loss(c2, B)
    (grad_small,) = torch.autograd.grad(small, c2)
    # the Gram matrix (hence norms and B) is float32: agreement to float32 precision
    torch.testing.assert_close(small, direct.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_small, grad_direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_small, -B)


def test_hypergradient_matches_finite_differences_of_the_next_loss():
    """d L(W_t - η(g_t + ΔG(c)))/dc = -η ⟨g_{t+1}, ∂ΔG/∂c⟩ = η ∂ hyper_loss/∂c, on a quadratic."""
    gen = torch.Generator().manual_seed(1)
    C, n, eta = 5, 8, 0.1
    A = torch.randn(C * n, C * n, generator=gen, dtype=torch.float64)
    A = A @ A.T / (C * n) + torch.eye(C * n, dtype=torch.float64)

    def loss(W):
        return 0.5 * W.flatten() @ A @ W.flatten()

    def grad(W):
        return (A @ W.flatten()).view(C, n)

    W = torch.randn(C, n, generator=gen, dtype=torch.float64)
    g = grad(W)
    V = torch.stack([g, 0.5 * g + torch.randn(C, n, generator=gen, dtype=torch.float64), W], dim=1)  # (C, 3, n)
    cos, norms = unit_gram(row_gram(V).double())
    c0 = 0.1 * torch.randn(C, 3, generator=gen, dtype=torch.float64)

    def next_loss(c):
        return loss(W - eta * (g + correction(direction_weights(c, norms), V)))

    g_next = grad(W - eta * (g + correction(direction_weights(c0, norms), V)))
    inv = torch.where(norms > 0, 1 / norms, 0)
    B = next_dots(g_next, V).double() * inv * norms[:, :1]
    c = c0.clone().requires_grad_()
    (hyper,) = torch.autograd.grad(eta * hyper_loss(c, B), c)
    fd = torch.zeros_like(c0)
    for i in range(C):
        for j in range(3):
            e = torch.zeros_like(c0)
            e[i, j] = 1e-5
            fd[i, j] = (next_loss(c0 + e) - next_loss(c0 - e)) / 2e-5
    torch.testing.assert_close(hyper, fd, rtol=1e-5, atol=1e-8)


# --- damping ---------------------------------------------------------------------------------------


def _trust_after(rs, **kw):
    stats = torch.zeros(4)
    for r in rs:
        stats = update_trust(stats, torch.tensor(float(r)), torch.tensor(True), beta=0.99)
    return float(trust_factor(stats, z=2.0, warmup=20, **kw))


def test_trust_needs_consistent_positive_evidence():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(300, generator=gen)
    assert float(trust_factor(torch.zeros(4), z=2.0, warmup=20)) == 0.0  # no evidence
    assert _trust_after([0.5] * 5) < 0.3  # too few observations
    assert _trust_after([0.5] * 60) == 1.0  # consistently positive
    assert _trust_after(0.3 + 0.1 * noise) == 1.0
    assert _trust_after(-0.3 + 0.1 * noise) == 0.0  # harmful
    assert _trust_after(0.01 + 0.5 * noise) == 0.0  # indistinguishable from noise


def test_trust_ignores_invalid_observations():
    stats = update_trust(torch.zeros(4), torch.tensor(0.5), torch.tensor(True), beta=0.9)
    same = update_trust(stats, torch.tensor(float("nan")), torch.tensor(False), beta=0.9)
    assert torch.equal(stats, same)


def test_cumulative_bound_holds_along_a_biased_sequence():
    gen = torch.Generator().manual_seed(0)
    C, n, beta, bound = 4, 16, 0.9, 0.25
    e, m = torch.zeros(C, n), torch.zeros(C, n)
    bias = torch.randn(C, n, generator=gen)
    hits = 0
    for _ in range(200):
        g = torch.randn(C, n, generator=gen)
        m = beta * m + (1 - beta) * g
        dG = 0.5 * torch.linalg.vector_norm(g, dim=1, keepdim=True) * bias / torch.linalg.vector_norm(bias)
        lam = cumulative_scale(
            torch.linalg.vector_norm(dG, dim=1),
            torch.linalg.vector_norm(e, dim=1),
            torch.linalg.vector_norm(m, dim=1),
            beta=beta,
            bound=bound,
        )
        assert ((lam >= 0) & (lam <= 1)).all()
        decayed = beta * torch.linalg.vector_norm(e, dim=1)
        e = beta * e + (1 - beta) * lam[:, None] * dG
        limit = bound * torch.linalg.vector_norm(m, dim=1)
        # corrections only add while under the bound; over it (m shrank) e just decays
        assert (torch.linalg.vector_norm(e, dim=1) <= torch.maximum(limit, decayed) + 1e-6).all()
        assert (torch.linalg.vector_norm(e, dim=1)[lam > 0] <= limit[lam > 0] + 1e-6).all()
        hits += int((lam < 1).sum())
    assert hits > 0  # the bound was active


# --- the corrector's optimizer ---------------------------------------------------------------------


def test_masked_adam_matches_adam_and_skips_exactly():
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    mine = [p.clone() for p in ref]
    ref_params = [torch.nn.Parameter(p.clone()) for p in ref]
    adam = torch.optim.Adam(ref_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    m1, m2, step = [torch.zeros_like(p) for p in mine], [torch.zeros_like(p) for p in mine], torch.zeros(())
    for i in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in mine]
        ok = torch.tensor(i != 2)
        before = [p.clone() for p in mine] + [x.clone() for x in m1 + m2] + [step.clone()]
        masked_adam_(mine, grads, m1, m2, step, lr=1e-2, betas=(0.9, 0.999), ok=ok)
        if not ok:
            after = mine + m1 + m2 + [step]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            continue
        for p, gr in zip(ref_params, grads, strict=True):
            p.grad = gr
        adam.step()
    for p, q in zip(ref_params, mine, strict=True):
        torch.testing.assert_close(p.detach(), q)


# --- all sites at once -----------------------------------------------------------------------------


def test_batched_correctors_match_each_sites_own_corrector():
    """`corrector_forward` on stacked parameters and padded rows is `Corrector.forward` site by site."""
    from gcsurgery.gcw import Layout, corrector_forward

    opts = GCWOptions()
    layout = Layout.of(opts)
    gen = torch.Generator().manual_seed(0)
    nets = [Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden) for _ in range(3)]
    for net in nets:  # a non-zero last layer, so the outputs say something
        torch.nn.init.normal_(net.out.weight, generator=gen)
    psi = torch.stack([torch.cat([p.detach().flatten() for p in net.parameters()]) for net in nets])
    counts = (5, 2, 7)
    x = torch.randn(3, 7, opts.n_features, generator=gen)
    mask = torch.arange(7)[None] < torch.tensor(counts)[:, None]
    out = corrector_forward(layout, psi, x, mask)
    for i, (net, C) in enumerate(zip(nets, counts, strict=True)):
        torch.testing.assert_close(out[i, :C], net(x[i, :C]), rtol=1e-5, atol=1e-6)


def test_a_fresh_layout_holds_the_seeded_corrector_and_leaves_the_rng_alone():
    from gcsurgery.gcw import Layout

    opts = GCWOptions(seed=3)
    before = torch.get_rng_state()
    layout = Layout.of(opts)
    site = layout.init_site(opts)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(3)
    ref = Corrector(opts.n_features, opts.n_dirs, d_model=opts.d_model, hidden=opts.hidden)
    assert torch.equal(site[layout.site["psi"]], torch.cat([p.detach().flatten() for p in ref.parameters()]))
    assert not site[layout.site["psi"].stop :].any()  # Adam moments, trust, flags, statistics: all zero
