"""Zoo sweeps (slow): every torchvision classification model and the smallest model of each timm family.

Each model's status is pinned to the one `docs/coverage.md` records: a model that falls from ``ok`` (or
whose refusal turns into a crash) fails. Changing a status on purpose means rerunning the sweep and
committing the new `docs/coverage.md`.
"""

import json
import re
from pathlib import Path

import pytest

from gcsurgery.harness.sweep import FAMILIES_CACHE, check_model, torchvision_models

COVERAGE = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"


def pinned_statuses() -> dict[str, str]:
    """``{model: status}`` from the tables of docs/coverage.md (``ok (no state at ...)`` counts as ``ok``)."""
    out = {}
    for line in COVERAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.match(r"^(timm|torchvision):", cells[0]):
            out[cells[0]] = re.split(r"[:(]", cells[6])[0].strip()
    return out


PINNED = pinned_statuses()


def _timm_specs():
    # read the packaged choice as it is: recomputing it at collection would slow every test run
    return sorted(json.loads(FAMILIES_CACHE.read_text())["families"].values()) if FAMILIES_CACHE.exists() else []


def test_every_zoo_model_has_a_pinned_status():
    expected = {f"timm:{n}" for n in _timm_specs()} | {f"torchvision:{n}" for n in torchvision_models()}
    assert not expected - set(PINNED), f"no row in docs/coverage.md: {sorted(expected - set(PINNED))[:5]}"
    assert set(PINNED.values()) <= {"ok", "no hierarchy", "refused"}
    # 81: Hiera's later stages run on unrolled tokens (not in raster order), which are not read as feature maps
    assert sum(s == "ok" for m, s in PINNED.items() if m.startswith("timm:")) == 81


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_models())
def test_torchvision_model_keeps_its_status(name):
    row = check_model(f"torchvision:{name}")
    assert row["status"] == PINNED[f"torchvision:{name}"], row["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _timm_specs())
def test_timm_family_keeps_its_status(name):
    row = check_model(f"timm:{name}")
    assert row["status"] == PINNED[f"timm:{name}"], row["detail"]


@pytest.mark.slow
def test_hrnet_parallel_streams_are_one_exact_pair():
    # docs/design.md: the parallel /4../32 streams are spanned by one pair, from the split to the merge
    row = check_model("timm:hrnet_w18_small")
    assert (row["status"], row["states"], row["pairs"]) == ("ok", 3, 2), row["detail"]
