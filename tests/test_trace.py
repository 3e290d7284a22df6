"""Tracing: leaves (the user's, timm's, stochastic depth, the fallback's), errors, train and eval graphs."""

import pytest
import timm
import torch
from conftest import TinyResNet, WithUntraceable, branch_site, outputs
from torch import nn

import gcsurgery as gcs
from gcsurgery import GCSurgeryError
from gcsurgery.trace import preserve_buffers


def test_untraceable_submodule_becomes_a_recorded_leaf():
    p = gcs.plan(WithUntraceable(), torch.randn(2, 3, 32, 32))
    assert [leaf.module for leaf in p.leaves] == ["stages.1.1.0"]
    assert "TraceError" in p.leaves[0].reason or "bool" in p.leaves[0].reason
    assert "leaf: stages.1.1.0" in str(p)


def test_error_untraceable_model_names_the_module_and_suggests_leaf_modules():
    class TopLevelBranch(TinyResNet):
        def forward(self, x):
            if x.mean() > 0:
                x = -x
            return super().forward(x)

    with pytest.raises(GCSurgeryError, match=r"top-level TopLevelBranch.forward.*leaf_modules="):
        gcs.plan(TopLevelBranch(), torch.randn(2, 3, 32, 32))


def test_error_bad_leaf_modules(tiny_resnet):
    with pytest.raises(GCSurgeryError, match=r"\['nope'\] that are not submodules"):
        gcs.plan(tiny_resnet, torch.randn(2, 3, 32, 32), leaf_modules=["nope"])


def test_stochastic_depth_is_kept_whole_so_train_and_eval_graphs_match():
    # inline, DropPath's train-mode ops renamed every later node and NextViT's states had no train counterpart
    model = timm.create_model("test_convnext", drop_path_rate=0.5)
    p = gcs.plan(model)
    assert not any("train and eval" in n for n in p.notes)
    gm, x = gcs.gcify(model, p), torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    y = model.train()(x)
    torch.manual_seed(0)
    assert torch.equal(gm.train()(x), y)


class InlineDropPath(nn.Module):
    """A residual conv whose branch is dropped per sample in train mode, written inline (not a leaf module)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * (torch.rand_like(y[:, :1, :1, :1]) >= 0.5).to(y.dtype)  # (B, 1, 1, 1) mask
        return x + y


class Gated(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


def test_train_graph_nodes_are_named_after_their_eval_counterparts():
    # the train-only `mul` of the drop path took the name `mul` of the eval graph's state (the gate's product),
    # with the same target and shape, so the train graph's branch went to the drop path
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(InlineDropPath(8), Gated(8)),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    x = torch.randn(2, 3, 16, 16)
    gm = gcs.gcify(model, example_inputs=x)
    assert [s.module for s in gm.gc_plan.states] == ["0", "1.1", "3.1"]
    train, eval_ = ([branch_site(n)[1] for n in g.nodes if str(n.target).startswith("gc.ode.")] for g in gm.graphs)
    assert train == eval_ == [("<built-in function mul>", "1.1"), ("3.1", "3.1")]
    for training in (False, True):
        assert torch.equal(outputs(model, x, training=training)[0], outputs(gm, x, training=training)[0])


class ReplacesItsBuffer(nn.Module):
    """Replaces a placeholder buffer by a table on the first call, and registers a new buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(1, 1), persistent=False)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.table = torch.ones(1, x.shape[-1])
        self.register_buffer("made", torch.ones(2))
        self.count += 1
        return x * self.table


def test_preserve_buffers_puts_back_the_tensors_a_forward_replaced():
    m = ReplacesItsBuffer()
    table, count = m.table, m.count
    with preserve_buffers(m):
        m(torch.randn(2, 5))
        assert m.table.shape == (1, 5) and float(m.count) == 1 and hasattr(m, "made")
    assert m.table is table and m.table.shape == (1, 1) and torch.equal(table, torch.zeros(1, 1))
    assert m.count is count and float(count) == 0  # updated in place: the same tensor, its old value
    assert not hasattr(m, "made") and "made" not in dict(m.named_buffers())
    assert set(m.state_dict()) == {"count"}  # `table` is still non-persistent
