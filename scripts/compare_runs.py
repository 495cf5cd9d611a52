"""Compare training runs side by side: val loss at every evaluation, tokens/s and their ratios.

    python scripts/compare_runs.py REF_DIR OTHER_DIR [OTHER_DIR ...]

Each DIR is a run folder written by `attnbench train` (metrics.jsonl, summary.json). Used to check
that a DDP run follows the one-GPU run with the same global batch (scripts/multi_gpu.sh).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[dict[int, float], dict]:
    vals = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            vals[row["step"]] = row["val_loss"]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return vals, summary


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    runs = [Path(a) for a in argv]
    loaded = [load(r) for r in runs]
    ref_vals, ref_sum = loaded[0]
    print("step  " + "  ".join(f"{r.name[:28]:>28}" for r in runs))
    for step in sorted(ref_vals):
        cells = [f"{v[step]:28.4f}" if step in v else f"{'-':>28}" for v, _ in loaded]
        print(f"{step:4d}  " + "  ".join(cells))
    for run, (vals, summ) in zip(runs[1:], loaded[1:]):
        common = [s for s in ref_vals if s in vals and s > 0]
        diff = max((abs(vals[s] - ref_vals[s]) for s in common), default=float("nan"))
        tps, ref_tps = summ.get("tokens_per_s"), ref_sum.get("tokens_per_s")
        ratio = f"{tps / ref_tps:.2f}x" if tps and ref_tps else "-"
        print(f"{run.name} vs {runs[0].name}: max |val loss diff| {diff:.4f} over {len(common)} evaluations; "
              f"best val {summ.get('best_val_loss', float('nan')):.4f} vs {ref_sum.get('best_val_loss', float('nan')):.4f}; "
              f"tokens/s {tps or 0:,.0f} vs {ref_tps or 0:,.0f} ({ratio}); world size {summ.get('world_size')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
