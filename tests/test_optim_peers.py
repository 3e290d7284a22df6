"""GCOptimizer over pytorch-optimizer's optimizers (Lookahead, SAM, Lion), and the peer arms of the harness."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_optim import tiny_cnn

from gcsurgery.errors import GCSurgeryError
from gcsurgery.gcw import GCWOptions
from gcsurgery.harness.arms import build_optimizer, parse_arm
from gcsurgery.harness.loop import train_one_epoch
from gcsurgery.optim import GCOptimizer, needs_closure

po = pytest.importorskip("pytorch_optimizer")

SITES = ["conv1.weight", "conv2.weight", "fc.weight"]
ACT = GCWOptions(trust=False)  # corrections act from the second step


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: po.Lookahead(torch.optim.SGD(ps, lr=0.1, momentum=0.9), k=2),
        lambda ps: po.Lion(ps, lr=1e-3),
        lambda ps: po.AdamP(ps, lr=1e-3),
    ],
    ids=["lookahead", "lion", "adamp"],
)
def test_gcoptimizer_wraps_pytorch_optimizer_instances(make):
    model = tiny_cnn()
    twin = copy.deepcopy(model)
    opt, bare = GCOptimizer(model, make(model.parameters()), sites=SITES, gcw=ACT), make(twin.parameters())
    for i, (x, y) in enumerate(batches(4)):
        for m, o in ((model, opt), (twin, bare)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        if i == 0:
            assert same_params(model, twin)  # GC-W acts from the second step
    assert max(s["ratio"] for s in opt.gc_stats().values()) > 0
    assert not same_params(model, twin)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gcoptimizer_over_sam_corrects_the_gradient_at_the_perturbed_weights():
    model = tiny_cnn()
    twin = copy.deepcopy(model)
    opt = GCOptimizer(model, po.SAM, sites=SITES, gcw=ACT, base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)
    bare = po.SAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert needs_closure(opt) and needs_closure(bare) and not needs_closure(torch.optim.SGD(twin.parameters()))
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(GCSurgeryError, match="takes two passes per step, so step\\(\\) needs a closure"):
        opt.step()
    for i, (x, y) in enumerate(batches(4)):
        for m, o in ((model, opt), (twin, bare)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()  # SAM's protocol: the gradient at the weights, then the closure
            o.step(closure_for(m, o, x, y))
        if i == 0:  # no correction yet: exactly SAM's step (perturbed, recomputed, restored, updated)
            assert same_params(model, twin)
    assert max(s["ratio"] for s in opt.gc_stats().values()) > 0 and not same_params(model, twin)


def test_the_loop_gives_sam_its_closure_and_refuses_fp16_scaling():
    model = tiny_cnn()
    opt = build_optimizer(model, peer="sam", lr=0.1, momentum=0.9)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    before = copy.deepcopy(model)
    out = train_one_epoch(model, batches(3), opt, device=torch.device("cpu"))
    assert out["steps"] == 3 and len(calls) == 6  # two forward-backward passes per step
    assert not same_params(model, before)
    with pytest.raises(GCSurgeryError, match="two passes \\(SAM\\).*fp16 loss scaling"):
        train_one_epoch(model, batches(1), opt, device=torch.device("cpu"), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(GCSurgeryError, match="runs SAM over \\['sgd', 'adamw'\\] without GC-W; got optimizer 'lamb'"):
        build_optimizer(model, peer="sam", name="lamb", lr=0.1)


def test_gradcent_steps_on_centralised_gradients():
    model = tiny_cnn()
    before = copy.deepcopy(model)
    opt = build_optimizer(model, peer="gradcent", lr=1.0, momentum=0.0, weight_decay=0.0)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for (n, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        step = q - p  # lr 1: the gradient the optimizer used
        if p.dim() > 1:  # weights: every output channel's gradient has mean zero
            torch.testing.assert_close(step.flatten(1).mean(1), torch.zeros(len(p)), atol=1e-6, rtol=0)
            torch.testing.assert_close(step, raw[n] - raw[n].flatten(1).mean(1).view(-1, *[1] * (p.dim() - 1)))
        else:  # biases are left as they are
            torch.testing.assert_close(step, raw[n])
    with pytest.raises(GCSurgeryError, match="unknown peer 'swa'"):
        build_optimizer(model, peer="swa", lr=0.1)


@pytest.mark.parametrize("peer", ["gradcent", "lookahead"])
def test_a_variant_stacks_gcw_on_a_peer_and_its_first_step_is_the_peers(peer):
    """``gcw:peer=P``: GCOptimizer inside the peer's wrapping; GC-W's first step is the base's, so it equals P's."""
    spec = parse_arm(f"gcw:peer={peer}")
    assert (spec.arm, spec.peer, spec.optimizer_peer, parse_arm(peer).optimizer_peer) == ("gcw", peer, peer, peer)
    model = tiny_cnn()
    twin = copy.deepcopy(model)
    sites = tuple(n for n, p in model.named_parameters() if p.dim() == 4)
    stacked = build_optimizer(model, sites=sites, peer=spec.optimizer_peer, lr=0.1, momentum=0.9)
    alone = build_optimizer(twin, peer=peer, lr=0.1, momentum=0.9)
    inner = stacked if peer == "gradcent" else stacked._base_optimizer  # timm's Lookahead wraps the optimizer
    assert isinstance(inner, GCOptimizer) and not isinstance(alone, GCOptimizer)
    x, y = batches(1)[0]
    for m, opt in ((model, stacked), (twin, alone)):
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(GCSurgeryError, match=r"cannot read 'peer=sam'.*peer \(lookahead\|gradcent\)"):
        parse_arm("gcgd:peer=sam")
