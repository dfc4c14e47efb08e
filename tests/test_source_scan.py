"""Safe-loading rules, enforced on the source of `components/` (kubellm) and `pipelines/`.

    .venv/bin/python -m pytest tests/test_source_scan.py -q

AST-based, so formatting, aliases (`import torch as th`, `from torch import load`,
`from pickle import loads as l`) and keyword spelling cannot hide a call:

* every `torch.load(...)` passes `weights_only=True` (a literal True, not a variable, not **kwargs);
* no `pickle`/`cPickle`/`_pickle`/`dill`/`cloudpickle` `load`/`loads`/`Unpickler`, no `joblib.load`,
  no `numpy.load(..., allow_pickle=True)`, no `torch.serialization.add_safe_globals` outside the
  checkpoint engine's allow-list (widening it must be reviewed there);
* no `trust_remote_code=True` (keyword, or `"trust_remote_code": True` in a dict literal).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("components", "pipelines")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}
PICKLE_LOADERS = {"load", "loads", "Unpickler"}
ALLOW_LIST_OWNER = "components/training/checkpoint_engine.py"


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("th" -> "torch")

    def _origin(self, node: ast.AST) -> str | None:
        """Dotted origin of a call target: `th.load` -> `torch.load`, `l` -> `pickle.loads`."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._origin(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def _report(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if node.module:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        origin = self._origin(node.func) or ""
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if origin in ("torch.load", "torch.serialization.load"):
            if not _is_true(kwargs.get("weights_only")):
                self._report(node, f"{origin}(...) without a literal weights_only=True")
        mod, _, name = origin.rpartition(".")
        if mod.split(".")[0] in PICKLE_MODULES and name in PICKLE_LOADERS:
            self._report(node, f"{origin}(...): unpickling runs arbitrary code")
        if origin == "joblib.load":
            self._report(node, "joblib.load(...) unpickles")
        if origin in ("numpy.load", "np.load") and _is_true(kwargs.get("allow_pickle")):
            self._report(node, f"{origin}(..., allow_pickle=True)")
        if origin.endswith("add_safe_globals") or origin.endswith("serialization.safe_globals"):
            if self.filename != ALLOW_LIST_OWNER:
                self._report(node, f"{origin}(...) widens the weights_only allow-list outside "
                                   f"{ALLOW_LIST_OWNER}")
        if _is_true(kwargs.get("trust_remote_code")):
            self._report(node, "trust_remote_code=True")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for k, v in zip(node.keys, node.values, strict=True):
            if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v):
                self._report(node, '"trust_remote_code": True')
        self.generic_visit(node)


def scan_source(source: str, filename: str) -> list[str]:
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.problems


def _files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def test_package_source_loads_safely() -> None:
    files = _files()
    assert len(files) > 10, f"scanned only {len(files)} files under {SCANNED}: wrong root?"
    problems = [p for f in files for p in scan_source(f.read_text(), f.relative_to(ROOT).as_posix())]
    assert not problems, "unsafe loading in the package:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch\ntorch.load(p, weights_only=flag)",
    "import torch\ntorch.load(p, **kw)",
    "import torch as th\nth.load(p, map_location='cpu')",
    "from torch import load\nload(p)",
    "import torch.serialization\ntorch.serialization.load(p)",
    "import pickle\npickle.load(f)",
    "from pickle import loads as l\nl(b)",
    "import pickle as pk\npk.Unpickler(f).load()",
    "import dill\ndill.loads(b)",
    "import joblib\njoblib.load(p)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(d, trust_remote_code=True)",
    "kw = {'trust_remote_code': True}",
    "import torch\ntorch.serialization.add_safe_globals([object])",
])
def test_scanner_catches(snippet: str) -> None:
    assert scan_source(snippet, "components/x.py"), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import torch\ntorch.save(x, p)",
    "import json\njson.load(f)",
    "import numpy as np\nnp.load(p)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(d, trust_remote_code=False)",
    "import yaml\nyaml.safe_load(f)",
])
def test_scanner_allows(snippet: str) -> None:
    assert scan_source(snippet, "components/x.py") == []
