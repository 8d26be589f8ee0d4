"""The repository stands alone: nothing in it reads beside it (see tests/path_guard.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests import conftest
from tests.path_guard import OutsideOpens, scan_repository, scan_source, source_files

REPO = Path(__file__).resolve().parents[1]


def test_no_code_or_script_climbs_out_of_the_repository() -> None:
    assert scan_repository(REPO) == []


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("tests/fakekube.py", 'CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "crds"'),
        ("tests/test_x.py", "CRDS = Path(__file__).resolve().parents[1].parent"),
        ("tests/test_x.py", "DATA = Path(__file__).parent.parent.parent / 'data'"),
        ("agent/x/y.py", "ROOT = Path(__file__).resolve().parents[3]"),
        ("tests/conftest.py", "SHARED = REPO.parent / 'other'"),
        ("tests/test_x.py", "p = os.path.join(here, os.pardir, 'x')"),
        ("tests/test_x.py", "open('../shared/crds/x.yaml')"),
        (".ci/run", "cp ../data/x tests/"),
        ("Makefile", "\tcat ../notes.txt"),
    ],
)
def test_the_scan_catches_each_way_out(path: str, line: str) -> None:
    assert scan_source(path, f"import os\n{line}\n") != []


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("tests/test_x.py", "REPO = Path(__file__).resolve().parents[1]"),
        ("agent/x/y.py", "HERE = Path(__file__).parent.parent.parent"),
        ("tests/test_x.py", "DATA = Path(__file__).parent.parent / 'data'"),
        ("tests/test_x.py", 'call("../escape")  # a bad volume id the agent must refuse'),
        ("tests/test_x.py", "target.parent.mkdir(parents=True)"),
        (".ci/run", 'export CERT_AGENT_CRDS_DIR="$(cd ../shared/crds && pwd)"'),
    ],
)
def test_the_scan_lets_paths_inside_pass(path: str, line: str) -> None:
    assert scan_source(path, f"{line}\n") == []


def test_the_audit_hook_records_opens_beside_the_repository(tmp_path: Path) -> None:
    parent = tmp_path / "work"
    repo, shared, allowed = parent / "repo", parent / "data", parent / "crds"
    for directory in (repo, shared / "crds", allowed):
        directory.mkdir(parents=True)
    (shared / "crds" / "a.yaml").write_text("a: 1\n")
    (allowed / "b.yaml").write_text("b: 1\n")
    (repo / "c.txt").write_text("c\n")
    guard = OutsideOpens(repo, allowed=[allowed])
    sys.addaudithook(guard)  # stays registered; disabled below
    try:
        (parent / "made-later").mkdir()  # the session's own, not a neighbour
        (parent / "made-later" / "d").write_text("d\n")
        assert (repo / "c.txt").read_text() == "c\n"
        assert (allowed / "b.yaml").read_text() == "b: 1\n"
        assert guard.seen == []
        assert (shared / "crds" / "a.yaml").read_text() == "a: 1\n"
        sorted(shared.iterdir())
    finally:
        guard.enabled = False
    assert guard.seen == [
        f"open {shared / 'crds' / 'a.yaml'}",
        f"os.listdir {shared}",
    ]


def test_the_session_guard_is_installed_and_has_seen_nothing() -> None:
    guard = conftest.OUTSIDE_OPENS
    assert guard is not None and guard.repo == str(REPO)
    assert guard.seen == []


def test_every_document_the_code_cites_is_in_the_repository() -> None:
    """A docstring pointing at a document must point at one a reader of the clone has."""
    cited = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
    missing = []
    for path in source_files(REPO):
        if path.suffix != ".py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bDESIGN\b", line):
                missing.append(f"{path.relative_to(REPO)}:{number}: cites DESIGN")
            for name in cited.findall(line):
                if not (REPO / name).is_file():
                    missing.append(f"{path.relative_to(REPO)}:{number}: cites {name}")
    assert missing == []
