"""The library stands alone: ``import flaxres`` pulls in no trainer, dataset, plotting or PyTorch
module, and every module that flaxres/ imports at its top level is one of its declared
dependencies (the rest are imported where used, with a clear error or fallback)."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution, for the library's third-party imports.
DISTRIBUTIONS = {"jax": "jax", "flax": "flax", "numpy": "numpy", "orbax": "orbax-checkpoint",
                 "PIL": "pillow", "safetensors": "safetensors"}
# Imported only inside the functions that need them, each optional for the library: torch (the
# `torch` extra) converts .pth weights, jax2onnx and onnx (the `export` extra) write ONNX.
OPTIONAL = {"torch", "tqdm", "jax2onnx", "onnx"}


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
            for d in deps}


def _third_party_imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "flaxres"}


def test_import_flaxres_pulls_in_no_trainer_dataset_plotting_or_torch():
    code = ("import sys, flaxres; flaxres.create_model('resnet20'); "
            "print(' '.join(sorted(m for m in ('torch', 'tensorflow_datasets', 'tensorflow', "
            "'matplotlib', 'scipy', 'tqdm', 'train', 'bench', 'parity') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("path", sorted((ROOT / "flaxres").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_only_its_declared_dependencies(path: Path):
    declared = _declared()
    top = _third_party_imports(path, top_level_only=True)
    assert {DISTRIBUTIONS.get(n, n) for n in top} <= declared, top
    anywhere = _third_party_imports(path, top_level_only=False)
    assert {DISTRIBUTIONS.get(n, n) for n in anywhere - OPTIONAL} <= declared, anywhere
