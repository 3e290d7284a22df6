"""Gradient diagnostics against hand-computed cases, on plain and gcified tiny CNNs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gcsurgery as gcs
from gcsurgery.diagnostics import GradientRecorder, coherence, diagnose, gsnr, per_sample_gradients
from gcsurgery.diagnostics.stats import GradientMoments


def _batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_gradients_of_a_linear_model(method):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, t = torch.randn(5, 4), torch.randn(5, 3)

    def loss(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    g = per_sample_gradients(lin, x, t, loss_fn=loss, params=["weight", "bias"], method=method)
    r = (x @ lin.weight.T + lin.bias - t).detach()  # (5, 3): residuals
    torch.testing.assert_close(g["weight"], r[:, :, None] * x[:, None, :])  # ∂ℓ_n/∂W = r_n x_nᵀ
    torch.testing.assert_close(g["bias"], r)
    assert lin.weight.grad is None


def _dot_loss(out, target):
    return out.sum()  # ℓ_n = w·x_n: the gradient of sample n is x_n


def test_coherence_is_one_for_identical_and_one_over_n_for_orthogonal_samples():
    lin = nn.Linear(6, 1, bias=False)
    for x, expected in ((torch.ones(6, 6) * 0.7, 1.0), (torch.eye(6) * 2.0, 1 / 6)):
        g = per_sample_gradients(lin, x, torch.zeros(6), loss_fn=_dot_loss, params=["weight"])["weight"]
        m = GradientMoments(6)
        m.add(g.flatten(1))
        assert m.summary()["coherence"] == pytest.approx(expected, rel=1e-12)
    # two samples at 60 degrees with unit norms: ‖(a+b)/2‖² / 1 = (1 + cos)/2 = 0.75
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 3**0.5 / 2])
    assert coherence(a + b, 2.0, 2) == pytest.approx(0.75)


def test_gsnr_of_a_known_case():
    # per-sample gradients of three parameters over two samples: (1, 2, 0) and (3, 2, 2)
    g = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 2.0]])
    value, left_out = gsnr(g.sum(0), (g * g).sum(0), 2)
    # parameter 0: mean 2, variance 1 -> 4; parameter 2: mean 1, variance 1 -> 1; parameter 1 does not vary
    assert value == pytest.approx((4 + 1) / 2)
    assert left_out == 1


def _hooked_norms(model, modules, x, y, *, branch=None):
    """‖∂ℓ_n/∂(output of each module)‖ per sample by plain autograd, one sample at a time, in eval mode."""
    model.eval()
    norms, branch_norms = [[] for _ in modules], []
    for i in range(x.shape[0]):
        outs = []

        def keep(_m, _i, o, outs=outs):
            o.retain_grad()
            outs.append(o)

        hooks = [m.register_forward_hook(keep) for m in modules]
        seen = []
        if branch is not None:

            def pre(_m, args, seen=seen):
                src = args[0] * 1.0
                src.retain_grad()
                seen.append(src)
                return (src, *args[1:])

            hooks.append(branch.register_forward_pre_hook(pre))
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for h in hooks:
            h.remove()
        for k, o in enumerate(outs):
            norms[k].append(float(o.grad.norm()))
        if seen:
            branch_norms.append(float(seen[0].grad.norm()))
    model.zero_grad(set_to_none=True)
    return [sum(v) / len(v) for v in norms], branch_norms


def test_norm_profile_of_a_plain_cnn(tiny_resnet):
    x, y = _batch()
    report = diagnose(tiny_resnet, (x, y))
    assert [s.node for s in report.states] == ["stem_2", "relu_3", "relu_7", "relu_11"]
    stages = tiny_resnet.stages
    expected, _ = _hooked_norms(tiny_resnet, [tiny_resnet.stem, stages[0], stages[1], stages[2]], x, y)
    assert [s.grad_norm for s in report.states] == pytest.approx(expected, rel=1e-4)
    assert report.method == "vmap" and report.samples == 8 and not report.branches
    # a plan without GC-W sites makes diagnose build the graph with zero-gated branches: still no branch rows
    no_sites = gcs.plan(tiny_resnet, x[:2]).without(gcw=[0, 1, 2])
    again = diagnose(tiny_resnet, (x, y), plan=no_sites)
    assert not again.branches
    assert [s.grad_norm for s in again.states] == pytest.approx([s.grad_norm for s in report.states], rel=1e-5)
    names = [g.name for g in report.groups]
    assert names[:5] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert "gcw:stages.1.1.conv2.weight" in names
    assert dict(zip(names, [g.params for g in report.groups], strict=True))["head"] == ("fc.weight",)
    assert all(0 < g.coherence <= 1 and g.gsnr > 0 for g in report.groups)
    text = str(report)
    assert "E|dl/dh|" in text and "stage3" in text
    assert report.to_dict()["states"][0]["node"] == "stem_2"


def test_vmap_and_loop_agree(tiny_resnet):
    x, y = _batch(6)
    a = diagnose(tiny_resnet, (x, y), method="vmap", chunk_size=4)
    b = diagnose(tiny_resnet, (x, y), method="loop")
    assert [s.grad_norm for s in a.states] == pytest.approx([s.grad_norm for s in b.states], rel=1e-5)
    assert [g.coherence for g in a.groups] == pytest.approx([g.coherence for g in b.groups], rel=1e-4)
    assert [g.gsnr for g in a.groups] == pytest.approx([g.gsnr for g in b.groups], rel=1e-3)


def _live_branches(gc_model):
    """Moves every GC-ODE parameter off its initial value, so the branches carry gradient."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in gc_model.gc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_norm_profile_and_branch_share_of_a_gcified_cnn(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    x, y = _batch()
    at_insertion = diagnose(gm, (x, y))
    plain = diagnose(tiny_resnet, (x, y))
    assert [s.grad_norm for s in at_insertion.states] == pytest.approx([s.grad_norm for s in plain.states], rel=1e-4)
    assert all(b.branch_norm == 0 and b.share == 0 for b in at_insertion.branches)
    assert any("gates are still zero" in n for n in at_insertion.notes)

    _live_branches(gm)
    report = diagnose(gm, (x, y))
    assert [(b.branch, b.src, b.dst) for b in report.branches] == [
        ("gc.ode.0", 0, 1), ("gc.ode.1", 1, 2), ("gc.ode.2", 2, 3),
    ]  # fmt: skip
    modules = [gm.get_submodule("stem.2"), *gm.gc.ode]  # h0, then each branch's output is h1..h3
    expected, _ = _hooked_norms(gm, modules, x, y)
    assert [s.grad_norm for s in report.states] == pytest.approx(expected, rel=1e-4)
    for k, b in enumerate(report.branches):
        _, per_sample = _hooked_norms(gm, [gm.gc.ode[k]], x, y, branch=gm.gc.ode[k])
        assert b.branch_norm == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-4)
        assert 0 < b.share < 1 and b.main_norm > 0


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        torch.get_rng_state(),
    )


@pytest.mark.parametrize("gcified", [False, True])
def test_diagnose_leaves_the_model_and_the_rng_as_they_were(tiny_resnet, x32, gcified):
    model = gcs.gcify(tiny_resnet, example_inputs=x32) if gcified else tiny_resnet
    x, y = _batch()
    model.train()
    F.cross_entropy(model(x), y).backward()  # grads present
    model.get_submodule("stages.1.0.bn1").eval()  # a mixed mode, as frozen BatchNorm leaves it
    before, code = _state(model), model.code if gcified else None
    diagnose(model, (x, y), method="auto")
    after = _state(model)
    if gcified:
        assert model.code == code  # the train-mode graph is the one that runs again
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    for k, g in before[1].items():
        assert (g is None and after[1][k] is None) or torch.equal(g, after[1][k]), k
    assert before[2] == after[2]
    assert torch.equal(before[3], after[3])


def test_bad_input_is_refused(tiny_resnet):
    x, y = _batch(2)
    with pytest.raises(gcs.GCSurgeryError, match="method must be one of"):
        diagnose(tiny_resnet, (x, y), method="fast")
    with pytest.raises(gcs.GCSurgeryError, match="inputs but"):
        diagnose(tiny_resnet, (x, y[:1]))
    with pytest.raises(gcs.GCSurgeryError, match="no samples"):
        diagnose(tiny_resnet, [])
    with pytest.raises(gcs.GCSurgeryError, match="max_samples"):
        diagnose(tiny_resnet, (x, y), max_samples=0)
    with pytest.raises(gcs.GCSurgeryError, match="no plan was given"):
        GradientRecorder(tiny_resnet)
    with pytest.raises(gcs.GCSurgeryError, match="every must be"):
        GradientRecorder(tiny_resnet, gcs.plan(tiny_resnet, (2, 3, 32, 32)), every=0)


def _train(model, opt, rec, steps):
    grads = []
    for t in range(steps):
        x, y = _batch(8, seed=10 + t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in rec.groups["stage2"]]).clone())
        rec.after_backward(t)
        opt.step()
        rec.after_step(t)
    return grads


def test_recorder_cosines_against_hand_computed_ones(tiny_resnet):
    plan = gcs.plan(tiny_resnet, (2, 3, 32, 32))
    opt = torch.optim.SGD(tiny_resnet.parameters(), lr=0.05)  # no momentum: W_{t+1} - W_t = -lr g_t
    rec = GradientRecorder(tiny_resnet, plan, every=1)
    grads = _train(tiny_resnet, opt, rec, 4)
    assert [r["step"] for r in rec.records] == [0, 1, 2, 3]
    for t in range(3):
        d = rec.records[t]["groups"]["stage2"]
        assert d["cos_next"] == pytest.approx(float(F.cosine_similarity(grads[t], grads[t + 1], dim=0)), rel=1e-5)
        assert d["cos_step"] == pytest.approx(1.0, abs=1e-5)  # plain SGD steps exactly along -g
    assert "cos_next" not in rec.records[3]["groups"]["stage2"]  # step 4 never came
    assert [r["step"] for r in rec.pop_complete()] == [0, 1]  # 2 and 3 are released by later steps
    assert rec.pop_complete() == []
    assert rec.flat(rec.records[0])["diag/stage2/cos_step"] == pytest.approx(1.0, abs=1e-5)


def test_recorder_every_k_with_momentum_and_gcw(tiny_resnet, x32):
    gm = gcs.gcify(tiny_resnet, example_inputs=x32)
    opt = gcs.GCOptimizer(gm, torch.optim.SGD, lr=0.05, momentum=0.9)
    rec = GradientRecorder(gm, every=3, optimizer=opt)
    _train(gm, opt, rec, 7)
    assert [r["step"] for r in rec.records] == [0, 3, 6]
    first = rec.records[0]
    assert {"cos_next", "cos_step", "grad_norm", "next_grad_norm"} <= set(first["groups"]["stage1"])
    assert -1 <= first["groups"]["stage1"]["cos_step"] <= 1
    site = first["gcw"]["stages.1.1.conv2.weight"]
    assert {"ratio", "next_grad_dot", "cos_dG_next", "proposal_cosine"} <= set(site)
    cos = site["cos_dG_next"]  # undefined while GC-W applies no correction
    assert site["ratio"] >= 0 and (math.isnan(cos) if site["ratio"] == 0 else -1 - 1e-6 <= cos <= 1 + 1e-6)
    assert "gcw-opt:stages.1.1.conv2.weight" in rec.summary()


@pytest.mark.parametrize("every", [1, 2])
def test_recorder_cos_dG_next_matches_the_correction_read_off_the_weights(tiny_resnet, every):
    # plain SGD without momentum: W_{t+1} − W_t = −lr (G_t + ΔG_t), so ΔG_t can be read off the weights
    plan = gcs.plan(tiny_resnet, (2, 3, 32, 32))
    gcw = gcs.GCWOptions(trust=False, cumulative_bound=None, lr=0.01)  # corrections from step 1 on
    opt = gcs.GCOptimizer(tiny_resnet, torch.optim.SGD, sites=[s.param for s in plan.gcw_sites], lr=0.05, gcw=gcw)
    rec = GradientRecorder(tiny_resnet, plan, every=every, optimizer=opt)
    site = "stages.1.1.conv2.weight"
    p = tiny_resnet.get_parameter(site)
    grads, corrections = [], []
    for t in range(7):
        x, y = _batch(8, seed=20 + t)
        opt.zero_grad()
        F.cross_entropy(tiny_resnet(x), y).backward()
        rec.after_backward(t)
        g, w = p.grad.clone(), p.detach().clone()
        opt.step()
        rec.after_step(t)
        grads.append(g)
        corrections.append(-(p.detach() - w) / 0.05 - g)
    checked = 0
    for r in rec.records:
        t, d = r["step"], r["gcw"][site]
        if t + 1 >= len(grads) or d["ratio"] == 0:
            continue
        dG = corrections[t]
        assert d["ratio"] == pytest.approx(float(dG.norm() / grads[t].norm()), rel=1e-4)
        expected = float(F.cosine_similarity(dG.flatten(), grads[t + 1].flatten(), dim=0))
        # GC-W forms <g_t+1, dG_t> from its bfloat16 history (docs/gcw.md), so the cosine agrees to about 1%
        assert d["cos_dG_next"] == pytest.approx(expected, rel=1e-2, abs=1e-4)
        checked += 1
    assert checked >= 2


@pytest.mark.slow
def test_the_benchmark_writes_its_table_plots_and_json(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "diagnostics.py"
    spec = importlib.util.spec_from_file_location("diagnostics_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--seeds", "0", "--steps", "3", "--every", "1", "--batch", "16", "--diag-samples", "4"]
    argv += ["--calibration", "16", "--models", "plain20", "--arms", "baseline", "gcgd", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and [r["arm"] for r in saved["results"]] == ["baseline", "gcgd"]
    assert len(saved["results"][1]["final"]["branches"]) == 3
    assert "plain20, after training" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "norm_profile.png").stat().st_size > 0 and (tmp_path / "coherence.png").stat().st_size > 0
