"""One direction of imports, one command on top, one Python API under both commands."""
import ast
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run

# package → the project packages it may import
ALLOWED = {"edge": {"edge"}, "train": {"train", "edge"}, "export": {"export", "train", "edge"},
           "benchmarks": {"benchmarks", "export", "train", "edge"},
           "malaria_edge": {"malaria_edge", "benchmarks", "export", "train", "edge"}}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_downward_only(package):
    bad = {f"{p.relative_to(ROOT)} imports {m}" for p in (ROOT / package).glob("*.py")
           for m in _imports(p) - ALLOWED[package]}
    assert not bad, sorted(bad)


def test_malaria_edge_infer_is_edge_infer():
    a = run(["-m", "malaria_edge", "infer", "--help"])
    b = run(["-m", "edge.cli", "--help"])
    assert a.returncode == b.returncode == 0
    flags = lambda t: sorted(w for w in t.split() if w.startswith("--"))  # noqa: E731
    assert flags(a.stdout) == flags(b.stdout) and "--field" in flags(a.stdout)


def test_python_api_classifies_paths_and_arrays_like_the_cli():
    from edge import Classifier
    from edge.images import load_image
    cells = sorted((ROOT / "examples" / "cells").rglob("*.png"))
    clf = Classifier.load()
    by_path = clf.predict(cells)
    by_array = clf.predict([load_image(c) for c in cells])
    assert [p.label for p in by_path] == [c.parent.name for c in cells]
    assert [p.prob_parasitized for p in by_path] == [p.prob_parasitized for p in by_array]
    assert all(p.threshold == clf.model.card.threshold and 0.5 <= p.confidence <= 1 for p in by_path)
    probs, heat, cls = clf.explain(cells[:2])
    assert heat.shape[0] == 2 and list(cls) == [int(p >= clf.threshold) for p in probs]
    assert np.all((heat >= 0) & (heat <= 1))


def test_python_api_operating_point_sets_threshold_and_counts():
    from edge import Classifier
    clf = Classifier.load(mode="field", operating_point="counting")
    op = clf.model.card.operating_points["counting"]
    assert clf.threshold == op["threshold"] and clf.counts == op["counts"]


def test_readme_commands_write_only_where_git_ignores_or_where_artifacts_are_committed():
    import re
    import subprocess
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    targets = re.findall(r"--(?:out|output|json|predictions|plots|dest|figure) (\S+)", blocks)
    assert len(targets) >= 8
    for t in targets:
        if t.startswith(("/tmp", "~", "models/", "benchmarks/results", "<")) or "$" in t:
            continue
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", t], cwd=ROOT).returncode == 0
        assert ignored, f"README writes {t}, which git would show as untracked"


def test_malaria_edge_infer_runs_where_tensorflow_cannot_be_imported():
    from tests.test_edge import BLOCK_TF
    cell = str(next((ROOT / "examples" / "cells").rglob("*.png")))
    code = BLOCK_TF + f"sys.argv = ['malaria-edge', 'infer', {cell!r}, '--format', 'jsonl']\n" \
                      "from malaria_edge.cli import main\nmain()\n"
    res = run(["-c", code])
    assert res.returncode == 0 and '"status": "ok"' in res.stdout, res.stderr[-800:]
