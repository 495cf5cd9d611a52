"""README.md stays true: CI runs its test command verbatim, and its config table names real keys."""
import re
from pathlib import Path

from attnbench.config import all_keys

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd.strip() in [line.strip() for line in ci]


def test_readme_config_table_names_existing_keys():
    readme = (ROOT / "README.md").read_text()
    keys = set(all_keys())
    sections = {k.split(".")[0] for k in keys}
    rows = [line for line in readme.splitlines()
            if re.match(r"\| `(%s)\.[a-z_]+`" % "|".join(sections), line)]
    assert len(rows) > 10
    for row in rows:
        names = re.findall(r"`([a-z_.]+)`", row.split("|")[1])
        section = names[0].split(".")[0]
        for n in names:
            full = n if "." in n else f"{section}.{n}"
            assert full in keys, f"README names unknown config key {full}"


def test_readme_bakeoff_table_is_the_linked_reports_table():
    """The headline table is the bake-off section of the report README links to, not copied by hand."""
    from attnbench.report import bakeoff_section

    readme = (ROOT / "README.md").read_text()
    report = re.search(r"\[full report\]\((results/[^)]+/report\.md)\)", readme).group(1)
    table = [line for line in bakeoff_section(ROOT / report).splitlines() if line.startswith("|")]
    lines = readme.splitlines()
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table
