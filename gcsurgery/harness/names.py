"""Model names: which forms `build_model` takes, and close matches for a typo, without importing torch.

The names timm and torchvision know are cached in ``gcsurgery/assets/model_names.json`` for the versions
installed when it was written, so that ``gcsurgery plan timm:resnet5O`` answers in a fraction of a second;
with other versions installed, the libraries are imported and asked.
"""

import difflib
import json
import re
from importlib import metadata
from pathlib import Path

from ..errors import GCSurgeryError

__all__ = ["CIFAR_PREFIXES", "check_model_name", "known_models", "split_factory", "write_cache"]

CACHE = Path(__file__).resolve().parents[1] / "assets" / "model_names.json"
CIFAR_PREFIXES = ("cifar_resnet", "cifar_plain")
FORMS = (
    "timm:NAME, torchvision:NAME, cifar_resnetDEPTH, cifar_plainDEPTH or package.module:factory "
    "(e.g. timm:resnet50, torchvision:resnet18, cifar_resnet20, mypkg.models:make_net)"
)
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _live(library: str) -> list[str]:
    if library == "timm":
        import timm

        return sorted(timm.list_models())
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_models(library: str) -> list[str]:
    """The model names of ``library`` (``"timm"`` or ``"torchvision"``): cached for its version, else asked."""
    if CACHE.exists():
        cached = json.loads(CACHE.read_text())
        if cached.get(library, {}).get("version") == _version(library):
            return cached[library]["models"]
    return _live(library)


def write_cache() -> Path:
    """Writes the cache for the installed timm and torchvision (run after upgrading either)."""
    data = {lib: {"version": _version(lib), "models": _live(lib)} for lib in ("timm", "torchvision")}
    CACHE.write_text(json.dumps(data, indent=0) + "\n")
    return CACHE


def split_factory(name: str) -> tuple[str, str]:
    """``"package.module:factory"`` as ``(module, factory)``; GCSurgeryError for any other form."""
    module, sep, factory = name.partition(":")
    if sep and _DOTTED.match(module) and factory.isidentifier():
        return module, factory
    hint = ""
    if name.endswith(".py") or ".py:" in name or "/" in name:
        hint = (
            " A file is not a model: in Python, build the model and call gcs.plan(model, example_inputs) (or "
            "gcs.gcify); on the command line, make the file importable and name its factory as "
            "package.module:factory, e.g. mymodel:build for a function build() in mymodel.py on PYTHONPATH."
        )
    hint = hint or " Or build the model in Python and call gcs.plan(model, example_inputs=...)."
    raise GCSurgeryError(f"unknown model {name!r}; use {FORMS}.{hint}")


def _suggest(word: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, names, n=4, cutoff=0.75)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def check_model_name(name: str) -> None:
    """Raises a GCSurgeryError, with close matches, when `build_model` cannot know ``name``.

    The depth of CIFAR nets, and whether a factory imports, are checked when the model is built.
    """
    if not isinstance(name, str) or not name:
        raise GCSurgeryError(f"a model name must be a non-empty string, got {name!r}; use {FORMS}")
    if any(name.startswith(p) and name.removeprefix(p).isdigit() for p in CIFAR_PREFIXES):
        return
    family, sep, arch = name.partition(":")
    if family in ("timm", "torchvision") and sep:
        names = known_models(family)
        base = arch.split(".")[0] if family == "timm" else arch  # timm:resnet50.a1_in1k names a pretrained tag
        if base in names:
            return
        listing = "timm.list_models('PATTERN*')" if family == "timm" else "torchvision.models.list_models()"
        what = "model" if family == "timm" else "classification model"
        raise GCSurgeryError(f"{family} has no {what} {arch!r}{_suggest(base, names)} (list them with {listing})")
    if name.endswith(".py") or ".py:" in name or "/" in name:
        split_factory(name)  # a file path: say how to name a factory instead
    if not sep:
        pool = [f"timm:{n}" for n in known_models("timm")] + [f"torchvision:{n}" for n in known_models("torchvision")]
        pool += [f"{p}{d}" for p in CIFAR_PREFIXES for d in (20, 32, 44, 56, 110)]
        exact = [p for p in pool if p.partition(":")[2] == name]
        hint = (
            f"; did you mean {' or '.join(exact)}?"
            if exact
            else _suggest(name, [p.partition(":")[2] or p for p in pool])
        )
        raise GCSurgeryError(f"unknown model {name!r}; use {FORMS}{hint}. Or build it in Python: gcs.plan(model)")
    split_factory(name)
