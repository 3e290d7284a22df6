"""Zoo sweeps (slow): every torchvision classification model and the smallest model of each timm family."""

import json

import pytest

from gcsurgery.harness.sweep import FAMILIES_CACHE, check_model, torchvision_models

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", torchvision_models())
def test_torchvision_model_is_planned_and_exact(name):
    row = check_model(f"torchvision:{name}")
    assert row["status"] == ("no hierarchy" if name.startswith("vit_") else "ok"), row["detail"]


def _timm_specs():
    # read the packaged choice as it is: recomputing it at collection would slow every test run
    return sorted(json.loads(FAMILIES_CACHE.read_text())["families"].values()) if FAMILIES_CACHE.exists() else []


@pytest.mark.parametrize("name", _timm_specs())
def test_timm_family_is_planned_and_exact_or_refused_clearly(name):
    row = check_model(f"timm:{name}")
    assert row["status"] in ("ok", "no hierarchy", "refused"), row["detail"]


def test_hrnet_parallel_streams_are_one_exact_pair():
    # docs/design.md: the parallel /4../32 streams are spanned by one pair, from the split to the merge
    row = check_model("timm:hrnet_w18_small")
    assert (row["status"], row["states"], row["pairs"]) == ("ok", 3, 2), row["detail"]
