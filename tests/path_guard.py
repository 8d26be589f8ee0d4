"""Keep the suite inside its repository: a source scan and a runtime guard on file opens.

A clone must pass ``make test`` on its own, so no test, tool or agent module may reach beside the
repository (a neighbouring data or project directory). The one way out is the
``CERT_AGENT_CRDS_DIR`` setting (``tests/crds.py``), which ``.ci/run`` points at the upstream CRDs
when they lie beside the checkout.

- ``scan_source`` finds the ways code climbs out of the repository: ``__file__``-relative paths
  above the root (``parents[N]``, ``.parent.parent``), ``REPO.parent``, ``os.pardir``, literal
  ``../`` in scripts, and a ``shared`` directory joined onto a path.
- ``OutsideOpens`` is an audit hook (``sys.addaudithook``) that records every file or directory the
  test process opens or lists under the repository's parent, outside the repository, in an entry
  that was there before the session (a neighbouring checkout, ``shared/``, ...). conftest installs
  it for the whole session and fails the run when it saw anything.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

SOURCE_SUFFIXES = {".py", ".sh"}
SOURCE_NAMES = {"Makefile", "Dockerfile", "run"}
SKIP_DIRS = {".git", ".venv", "venv", "run", "__pycache__", ".mypy_cache", ".ruff_cache"}
SKIP_DIRS |= {".pytest_cache", ".hypothesis", "build", "dist"}

# A line that reads the one setting allowed to point outside (and only it) is not a finding.
SETTING = "CERT_AGENT_CRDS_DIR"

_PARENTS_INDEX = re.compile(r"\.parents\[(\d+)\]((?:\.parent\b)*)")
_PARENT_CHAIN = re.compile(r"__file__\)?(?:\.resolve\(\))?((?:\.parent\b)+)")
_ROOT_PARENT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT|PROJECT|HERE)\.parent\b")
_ALWAYS = (
    (re.compile(r"\.\./shared|shared/crds"), "names ../shared"),
    (re.compile(r"[\"']shared[\"']\s*/|/\s*[\"']shared[\"']"), "joins a 'shared' directory"),
    (re.compile(r"\bos\.pardir\b"), "climbs with os.pardir"),
)
_SCRIPT_UP = re.compile(r"(?<![\w.])\.\./")


# The guard and its own test spell out the patterns they look for.
SELF = {"tests/path_guard.py", "tests/test_self_contained.py"}


def source_files(repo: Path) -> Iterator[Path]:
    """The repository's code: Python, shell, Makefile, Dockerfile and the CI script."""
    for root, dirs, files in os.walk(repo):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            if str(path.relative_to(repo)) in SELF:
                continue
            if path.suffix in SOURCE_SUFFIXES or name in SOURCE_NAMES:
                yield path


def scan_source(relative: str, text: str) -> list[str]:
    """Findings ``path:line: what`` for one file, given its path relative to the repository."""
    depth = len(Path(relative).parts) - 1  # directories between the repository and the file
    is_python = relative.endswith(".py")
    findings: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0] if is_python else line
        if not is_python and code.lstrip().startswith("#"):
            continue
        if SETTING in code and "=" in code:
            continue
        problems = [what for pattern, what in _ALWAYS if pattern.search(code)]
        # parents[depth] (or .parent depth + 1 times) of a file is the repository itself.
        for match in _PARENTS_INDEX.finditer(code):
            up = int(match.group(1)) + match.group(2).count(".parent")
            if "__file__" in code and up > depth:
                problems.append(f"parents[{up}] of a file {depth} level(s) deep")
        for match in _PARENT_CHAIN.finditer(code):
            up = match.group(1).count(".parent") - 1
            if up > depth:
                problems.append(f"parents[{up}] of a file {depth} level(s) deep")
        if _ROOT_PARENT.search(code):
            problems.append("the repository root's parent")
        if not is_python and _SCRIPT_UP.search(code):
            problems.append("a ../ path")
        findings += [f"{relative}:{number}: {what}: {line.strip()}" for what in problems]
    return findings


def scan_repository(repo: Path) -> list[str]:
    findings: list[str] = []
    for path in source_files(repo):
        findings += scan_source(str(path.relative_to(repo)), path.read_text(errors="replace"))
    return findings


class OutsideOpens:
    """Audit hook: the opens and listings of paths beside the repository (see module doc)."""

    EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob", "os.chdir"})

    def __init__(self, repo: Path, *, allowed: Iterable[Path] = (), own: Iterable[Path] = ()):
        """``allowed``: paths that may be opened; ``own``: the session's own directories
        (pytest's temporary base), which may lie beside the repository when it sits in /tmp."""
        self.repo = os.path.abspath(repo)
        self.parent = os.path.dirname(self.repo)
        self.allowed = [os.path.abspath(p) for p in allowed]
        ignored = set()
        for path in own:
            full = os.path.abspath(path)
            if full.startswith(self.parent + os.sep) and not full.startswith(self.repo + os.sep):
                ignored.add(full[len(self.parent) + 1 :].split(os.sep, 1)[0])
        # Only entries that exist now are neighbours: what the session creates (temporary
        # directories when the repository sits in /tmp) is the session's own. Hidden entries
        # (~/.cache and the like when the repository sits in a home directory) belong to tools.
        try:
            names = set(os.listdir(self.parent))
        except OSError:
            names = set()
        self.neighbours = {
            n for n in names if not n.startswith(".") and n != os.path.basename(self.repo)
        } - ignored
        # A repository at the file system's root has the whole system for neighbours: no guard.
        self.enabled = self.parent != os.path.dirname(self.parent)
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if event not in self.EVENTS or not self.enabled or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            return  # a file descriptor
        full = os.path.normpath(os.path.join(os.getcwd(), path))
        if not full.startswith(self.parent + os.sep):
            return
        first = full[len(self.parent) + 1 :].split(os.sep, 1)[0]
        if first not in self.neighbours:
            return
        if any(full == a or full.startswith(a + os.sep) for a in self.allowed):
            return
        with self._lock:
            self.seen.append(f"{event} {full}")
