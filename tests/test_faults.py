"""The fault table (tests/faults.py) against the tests that inject the faults and against docs/reliability.md:
a fault without a test, a test marked with an unknown fault, or a stale table or total fails here."""
import ast
from pathlib import Path

from faults import DOC_BEGIN, DOC_END, FAULTS, render, totals

ROOT = Path(__file__).resolve().parents[1]


def marked_faults() -> dict[str, list[str]]:
    """{fault id: where `pytest.mark.fault(id)` is applied (file:line)}, read from the test files' source:
    on a test function or on a `pytest.param` of a parametrized one."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fault" \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "mark":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                for arg in node.args:
                    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), f"{where}: ids are literals"
                    found.setdefault(arg.value, []).append(where)
    return found


def test_every_fault_has_a_test_and_every_marked_test_a_fault():
    ids = [f.id for f in FAULTS]
    assert len(ids) == len(set(ids)), "a fault id appears twice in tests/faults.py"
    marked = marked_faults()
    assert not sorted(set(ids) - set(marked)), f"faults without a test: {sorted(set(ids) - set(marked))}"
    unknown = {k: v for k, v in marked.items() if k not in ids}
    assert not unknown, f"tests marked with faults missing from tests/faults.py: {unknown}"


def test_reliability_doc_holds_the_table_and_its_totals():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert DOC_BEGIN in doc and DOC_END in doc, "docs/reliability.md lacks the generated fault table"
    table = doc[doc.index(DOC_BEGIN):doc.index(DOC_END) + len(DOC_END)]
    assert table == render(), "docs/reliability.md's fault table is stale: paste the output of `python tests/faults.py`"
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    t = totals()
    assert len(rows) == t["tried"] == len(marked_faults()) and t["survived"] <= t["tried"]
