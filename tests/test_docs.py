"""The README, the docs and the Dockerfile agree with the project: links resolve, the quick
start works as typed, one model-file suffix, the test command is CI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        missing_anchor = dest.exists() and anchor and dest.suffix == ".md" \
            and anchor not in _anchors(dest)
        if not dest.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_quick_start_activates_before_flawscope():
    """`make demo` installs into .venv only: the first bare `flawscope` command of the README
    must come after the README says to activate it (issue 28)."""
    text = README.read_text(encoding="utf-8")
    activate = text.index(". .venv/bin/activate")
    first = re.search(r"^flawscope ", text, re.M)
    assert first and activate < first.start()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^VENV \?= \.venv$", makefile, re.M)
    assert "$(BIN)/flawscope demo -o demo-output" in makefile
    # the quick start's predict command uses the paths the demo writes
    quick = text[text.index("## Quick start"):text.index("## Workflow 1")]
    assert "demo-output/models/washer-patchcore.safetensors" in quick
    assert "demo-output/data/washer/test" in quick


def test_readme_test_command_is_ci():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    last = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last.strip() == "make test"
    text = README.read_text(encoding="utf-8")
    assert "bash .ci/run" in text and "make test " in text


def test_one_model_suffix():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    cmd = re.search(r"^CMD \[(.*)\]$", dockerfile, re.M).group(1)
    model = [a.strip().strip('"') for a in cmd.split(",")][2]
    assert model == "/models/model.safetensors"
    for path in (README, ROOT / "Dockerfile", *DOCS):
        assert not re.search(r"\.flaw\b", path.read_text(encoding="utf-8")), path.name
    assert model in README.read_text(encoding="utf-8")


def test_no_uvicorn_header_timeout_claim():
    """serve runs on Hypercorn, which has a header timeout: nothing may still say that a
    reverse proxy is needed for one."""
    assert "uvicorn" not in README.read_text(encoding="utf-8").lower()
    for path in (README, *DOCS):
        text = " ".join(path.read_text(encoding="utf-8").split())
        assert "put a reverse proxy that has one" not in text, path.name


def test_benchmark_summary_table():
    text = README.read_text(encoding="utf-8")
    header = ("| dataset | image AUROC | recall @1 % FRR | region F1 | predict img/s "
              "| PyTorch img/s | backbone img/s |")
    assert header in text
    for dataset in ("bottle", "pill", "metal_nut", "casting", "magnetic_tile"):
        assert re.search(rf"^\| {dataset}( \([^)]*\))? \|", text[text.index(header):], re.M)
    assert "TBD" not in text
