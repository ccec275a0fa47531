"""Every file the results page links to ships with the repository: the page is rendered from an archive
under ``docs/results/``, and a .gitignore rule (``runs/`` matched ``docs/results/runs/``) once kept that
archive out of every commit while the page still pointed at it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_picture_and_record_of_the_results_page_exists_and_is_not_ignored():
    page = REPO / "docs" / "results.md"
    links = [m for m in re.findall(r"\]\(([^)#]+)\)", page.read_text()) if not m.startswith("http")]
    targets = [(page.parent / link).resolve() for link in links]
    assert targets and all(t.exists() for t in targets), [str(t) for t in targets if not t.exists()]
    archive = sorted(p for p in (REPO / "docs" / "results" / "runs").rglob("*") if p.is_file())
    assert (REPO / "docs" / "results" / "runs" / "index.json") in archive
    machine = [p for p in archive if p.suffix != ".png" and f"{REPO.parent}/" in p.read_text()]
    assert not machine, f"absolute paths of the machine that ran them: {machine}"  # a clone has other paths
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(REPO)) for p in archive + targets if p.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.strip() == "", f"ignored by .gitignore, so never committed:\n{ignored.stdout}"


def test_archived_records_name_paths_relative_to_the_repository():
    sys.path.insert(0, str(REPO / "scripts"))
    from results_page import portable
    repo = Path("/home/u/maelab")
    text = "data: /home/u/shared/datasets/cifar10/train\nout: /home/u/maelab/runs/a/pretrain\nlog: /tmp/x\n"
    assert portable(text, repo) == "data: ../shared/datasets/cifar10/train\nout: runs/a/pretrain\nlog: /tmp/x\n"


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    """Pages move (findings left the README for docs/findings.md): a link written from the README's folder
    breaks when its text moves to docs/ unless it is rewritten."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", link) and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(REPO)}: {link}")
    assert len(pages) > 5 and not broken, broken


def test_the_detection_results_script_keeps_the_pages_own_description():
    """`python scripts/detection_results.py` rewrote docs/transfer_detection.md from its own copy of the
    description above the results, undoing every edit made to the page since that copy was written."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("detection_results", repo / "scripts" / "detection_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = repo / "docs" / "transfer_detection.md"
    kept = "\n".join(["## Detection", "", script.usage(page), "### Results at CPU scale (coco128)"])
    assert page.read_text().startswith(kept)
