"""The import layering of DESIGN.md: imports only point down, heavy dependencies load lazily."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import (statically, anywhere in its files)
FORBIDDEN = {
    "ldm": {
        "transformers",
        "diffusers",
        "accelerate",
        "datasets",
        "PIL",
        "open_clip",
        "peft",
        "huggingface_hub",
        "safetensors",
        "autoencoder",
        "text_encoder",
        "pipelines",
        "train",
    },
    "autoencoder": {
        "transformers",
        "diffusers",
        "accelerate",
        "datasets",
        "PIL",
        "open_clip",
        "peft",
        "huggingface_hub",
        "ldm",
        "text_encoder",
        "pipelines",
        "train",
    },
    "text_encoder": {"diffusers", "accelerate", "datasets", "peft", "pipelines", "train"},
    "pipelines": {"diffusers", "accelerate", "datasets", "peft", "train"},
    "train": {"diffusers"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports_anywhere_in_package(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = _imported_roots(path) & FORBIDDEN[package]
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"{package}/ imports what its layer may not: {bad}"


def _modules_loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split(".")[0] for line in out.stdout.split()}


def _all_submodules(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=package + "."):
        names.append(info.name)
    return names


def test_importing_the_core_loads_torch_only():
    mods = _all_submodules("ldm") + _all_submodules("autoencoder")
    loaded = _modules_loaded_after("\n".join(f"import {m}" for m in mods))
    assert "torch" in loaded
    heavy = {"transformers", "PIL", "accelerate", "diffusers", "datasets", "open_clip", "peft"}
    assert not loaded & heavy, f"the core pulled in {sorted(loaded & heavy)}"


def test_importing_pipelines_does_not_load_training_stack():
    loaded = _modules_loaded_after("\n".join(f"import {m}" for m in _all_submodules("pipelines")))
    heavy = {"train", "accelerate", "datasets", "peft", "diffusers"}
    assert not loaded & heavy, f"pipelines pulled in {sorted(loaded & heavy)}"
