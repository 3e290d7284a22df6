"""The rules between the rooms of the house, read off the imports of every core module (with `ast`)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "gcsurgery"
CORE = (
    "trace",
    "shapes",
    "layouts",
    "stages",
    "plans",
    "verify",
    "rewrite",
    "gcode",
    "gcode_nd",
    "gcw",
    "optim",
    "checkpoint",
    "errors",
    "wrappers",
    "_version",
    "diagnostics",  # a package: measures gradients of a (gcified) model; trains nothing
)
HARNESS = ("harness", "cli")
ANALYSIS = ("trace", "shapes", "layouts", "stages", "plans", "verify")  # find what to insert; insert nothing
TRAINING_TIME = ("gcode", "gcode_nd", "gcw", "optim", "rewrite", "checkpoint")
NO_FX = ("gcode", "gcode_nd", "gcw")


def files(room: str) -> list[Path]:
    """The source files of a room: `gcsurgery/<room>.py`, or every file of the package `gcsurgery/<room>/`."""
    return sorted((PACKAGE / room).rglob("*.py")) if (PACKAGE / room).is_dir() else [PACKAGE / f"{room}.py"]


def imports(room: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every import in a room's files, anywhere in them: (absolute module, names imported from it)."""
    out = []
    for path in files(room):
        package = ["gcsurgery", *path.relative_to(PACKAGE).parent.parts]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = tuple(alias.name for alias in node.names)
                if not node.level:
                    out.append((node.module, names))
                    continue
                base = ".".join(package[: len(package) - node.level + 1])
                if node.module is None:  # from . import layouts
                    out += [(f"{base}.{name}", ()) for name in names]
                else:
                    out.append((f"{base}.{node.module}", names))
    return out


def test_the_core_list_and_the_harness_cover_the_package():
    rooms = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert rooms - {"__init__", "__main__"} - set(CORE) - set(HARNESS) == set(), "a new room: add it to CORE or HARNESS"


def _room(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "gcsurgery" and len(parts) > 1 else None


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_the_harness(module):
    found = [name for name, _ in imports(module) if _room(name) in HARNESS]
    assert not found, f"gcsurgery/{module} imports the harness: {found}"


@pytest.mark.parametrize("module", ANALYSIS)
def test_analysis_never_imports_what_runs_at_train_time(module):
    found = [name for name, _ in imports(module) if _room(name) in TRAINING_TIME]
    assert not found, f"gcsurgery/{module} imports {found}"


@pytest.mark.parametrize("module", NO_FX)
def test_branch_and_corrector_never_import_torch_fx(module):
    found = [
        (name, names)
        for name, names in imports(module)
        if name.startswith("torch.fx") or (name == "torch" and "fx" in names)
    ]
    assert not found, f"gcsurgery/{module} imports torch.fx: {found}"


@pytest.mark.parametrize("module", CORE + HARNESS)
def test_no_private_name_is_imported_across_modules(module):
    found = [
        f"{name}.{n}"
        for name, names in imports(module)
        if name.startswith("gcsurgery")
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not found, f"gcsurgery/{module} imports private names {found}"


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    # the reader itself: a relative import of a private name, a harness module and torch.fx are all seen
    (tmp_path / "bad.py").write_text(
        "from torch import fx\nfrom .loader import _seed\n\n\ndef f():\n    from . import demo\n\n    return demo\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    assert imports("bad") == [("torch", ("fx",)), ("gcsurgery.loader", ("_seed",)), ("gcsurgery.demo", ())]


def test_relative_imports_in_a_subpackage_resolve_to_their_room(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("from .stats import coherence\n")
    (tmp_path / "sub" / "probe.py").write_text("from ..harness.run import Run\nfrom . import stats\n")
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    found = imports("sub")
    assert ("gcsurgery.harness.run", ("Run",)) in found and ("gcsurgery.sub.stats", ("coherence",)) in found
    assert [_room(name) for name, _ in found] == ["sub", "harness", "sub"]
