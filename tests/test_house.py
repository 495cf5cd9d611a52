"""The repository speaks of attnbench alone, in the present tense: no development history or references
outside the repository in the package, tests, scripts or docs, and a small results folder that indexes
every report it holds."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".cfg", ".txt"}
RESULTS_LIMIT = 1.5 * 2**20


def tracked_text_files() -> list[Path]:
    roots = [ROOT / d for d in ("attnbench", "tests", "scripts", "docs", ".ci")] + [ROOT / "README.md"]
    files = []
    for r in roots:
        files += [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file() and
                                           (p.suffix in TEXT_SUFFIXES or p.parent.name == ".ci")]
    return [f for f in files if "__pycache__" not in f.parts]


HISTORY = [
    (r"\b[Ss]ession \d", "a numbered session"),
    (r"\b[Cc]all [A-Z]\b|\b(?:device|results|GPU) call \d", "a numbered call"),
    (r"[Tt]ried an[d] dropped", "an abandoned attempt"),
    (r"\b(?:before|after) the fix\b", "'before/after the fix'"),
    (r"(?<![\w/-])20\d\d-\d\d-\d\d(?![\w-]*/)", "a date outside a results report's path"),
]
OUTSIDE = [
    (r"\.\./shar[e]d", "a folder beside the checkout"),
    (r"FLA_NOTE[S]", "a document the repository does not hold"),
    (r"(?<![\w.])/(?:work|root|home)/", "an absolute path"),
]


def _hits(patterns: list[tuple[str, str]]) -> list[str]:
    me = Path(__file__).resolve()
    out = []
    for f in tracked_text_files():
        if f.resolve() == me:
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for pat, what in patterns:
                if re.search(pat, line):
                    out.append(f"{f.relative_to(ROOT)}:{i}: {what}: {line.strip()[:100]}")
    return out


def test_no_development_history_in_code_tests_scripts_or_docs():
    assert _hits(HISTORY) == []


def test_nothing_refers_outside_the_repository():
    assert _hits(OUTSIDE) == []


@pytest.mark.parametrize("line, bad", [("# sess" "ion 4 measured it", True), ("call A on the H200", True), ("mixer tokens per call 1", False),
                                       ("see results/bakeoff-h200-2026-12-03/README.md", False),
                                       ("measured 2026-12-02 on the GPU", True), ("S0 = init state", False)])
def test_the_history_patterns_catch_what_they_should(line, bad):
    assert any(re.search(p, line) for p, _ in HISTORY) == bad


def test_results_are_small_and_every_report_is_indexed():
    results = ROOT / "results"
    size = sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
    assert size < RESULTS_LIMIT, f"results/ holds {size / 2**20:.2f} MiB"
    index = (results / "README.md").read_text()
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        assert (folder / "README.md").is_file(), f"{folder.name} has no README"
        assert f"({folder.name}/README.md)" in index, f"{folder.name} is not in results/README.md"


def test_long_modules_say_why_at_their_top():
    """No module above ~400 lines without a reason stated in its docstring."""
    import ast

    for path in sorted((ROOT / "attnbench").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Over 400 lines because" in doc, f"{path.relative_to(ROOT)} is long and does not say why"


def test_every_cited_results_report_exists():
    """A comment or doc that justifies a choice with a figure names a report that the repository holds."""
    missing = []
    for f in tracked_text_files():
        for m in re.finditer(r"results/([\w.-]+)/", f.read_text(errors="replace")):
            if not (ROOT / "results" / m.group(1)).is_dir() and "<" not in m.group(1):
                missing.append(f"{f.relative_to(ROOT)}: results/{m.group(1)}/")
    assert missing == []
