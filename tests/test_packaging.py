"""What the notebooks import is declared in pyproject.toml (dependencies or the dev extra)."""

import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported modules whose distribution comes with a declared one, not declared itself.
VIA = {"grpc": "tensorflow-serving-api", "IPython": "ipykernel"}


def _dist_name(requirement):
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {_dist_name(r) for r in reqs}


def _notebook_imports():
    found = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for line in "".join(cell["source"]).splitlines():
                m = re.match(r"\s*(?:from|import)\s+([A-Za-z_]\w*)", line)
                if m:
                    found.add(m.group(1))
    return found - set(sys.stdlib_module_names) - {"tfadv"}


def test_notebook_imports_are_declared():
    declared = _declared()
    dists = importlib.metadata.packages_distributions()
    imports = _notebook_imports()
    assert "pandas" in imports  # the check sees the notebooks' imports
    missing = []
    for module in sorted(imports):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if module in VIA:
            names = {VIA[module]}
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(names)) or 'not installed'})")
    assert not missing, f"add to pyproject.toml: {missing}"
