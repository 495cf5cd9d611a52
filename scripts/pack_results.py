"""Copy what a results report keeps from a finished sweep folder (`attnbench run --out DIR`) into
results/<what>-<hardware>-<date>/, small enough for the repository (results/README.md: under 1.5 MB in all).

    python scripts/pack_results.py SWEEP_DIR results/bakeoff-all-h200-2027-01-10

Kept: report/report.md and its figures, bench/*.jsonl, sweep.json, and per run config.json, run.json,
summary.json, eval/lengthgen.jsonl and metrics.jsonl. Figures are re-encoded with a 256-colour palette
(line plots have few colours; the files shrink by about a third); metrics.jsonl and the benchmark rows are
gzipped (a 3000-step run logs ~90 KB of rows, ~23 KB gzipped; the eleven mixers' benchmark rows of the
bakeoff-all preset 373 KB, 24 KB gzipped). `gunzip -r` on the folder gives back what `attnbench report`
reads. Left out: checkpoints, logs and anything else. The report's line naming the folder it was built
from is rewritten, since that path exists only on the machine that ran it. The folder's README (what, hardware, software, command, what the files show) is written by hand.
"""
from __future__ import annotations

import argparse
import gzip
import re
import shutil
import sys
from pathlib import Path

from PIL import Image

RUN_FILES = ("config.json", "run.json", "summary.json", "eval/lengthgen.jsonl")


def shrink_png(src: Path, dst: Path) -> None:
    """A palette PNG of at most 256 colours, without dithering (plots keep their flat colours)."""
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(dst, optimize=True)


def gzip_file(src: Path, dst: Path) -> None:
    """gzip without the name and time in the header, so the same rows give the same bytes."""
    with src.open("rb") as f, dst.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g:
        shutil.copyfileobj(f, g)


def pack(sweep: Path, dest: Path) -> list[Path]:
    """Copy the kept files of `sweep` into `dest` (which must not exist yet); returns the files written."""
    if not (sweep / "report" / "report.md").is_file():
        raise SystemExit(f"{sweep} has no report/report.md: pass a finished sweep folder (attnbench run --out DIR), "
                         "after `attnbench report` has run")
    if dest.exists():
        raise SystemExit(f"{dest} exists already; a new report is a new folder (git rm the one it replaces)")
    out: list[Path] = []

    def put(src: Path, rel: str, how=shutil.copyfile) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        how(src, target)
        out.append(target)

    report = (sweep / "report" / "report.md").read_text()
    report = re.sub(r"built (.*?) from `[^`]*`( \(files on disk only\))?",
                    rf"built \1 from the sweep folder {sweep.name}/", report, count=1)
    (dest / "report").mkdir(parents=True)
    (dest / "report" / "report.md").write_text(report)
    out.append(dest / "report" / "report.md")
    for png in sorted((sweep / "report").glob("*.png")):
        put(png, f"report/{png.name}", shrink_png)
    for rows in sorted((sweep / "bench").glob("*.jsonl")):
        put(rows, f"bench/{rows.name}.gz", gzip_file)
    if (sweep / "sweep.json").is_file():
        put(sweep / "sweep.json", "sweep.json")
    for run in sorted(p for p in (sweep / "runs").glob("*") if p.is_dir()):
        for name in RUN_FILES:
            if (run / name).is_file():
                put(run / name, f"runs/{run.name}/{name}")
        if (run / "metrics.jsonl").is_file():
            put(run / "metrics.jsonl", f"runs/{run.name}/metrics.jsonl.gz", gzip_file)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="a finished sweep folder (attnbench run --out DIR)")
    ap.add_argument("dest", type=Path, help="results/<what>-<hardware>-<date>")
    a = ap.parse_args(argv)
    files = pack(a.sweep, a.dest)
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 1024:.0f} KB in {a.dest}; write its README.md and a row in results/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
