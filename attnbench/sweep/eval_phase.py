"""The evaluation after training, when the sweep file has an [eval] table: `attnbench eval` of every
finished run at the listed lengths (attnbench/evaluate/), before the report, so the report gets its
length-generalisation section. The lengths are checked against each dataset's validation split before
any training; runs already evaluated at every length are not evaluated again."""
from __future__ import annotations

from pathlib import Path

from ..data import Corpus
from ..errors import AttnbenchError
from ..evaluate import evaluate_path
from ..evaluate.windows import check_length
from .plan import PlannedRun
from .processes import Slot, _say
from .spec import Sweep


def check_eval(sweep: Sweep, runs: list[PlannedRun]) -> None:
    """Every [eval] length fits in every run's validation split (AttnbenchError naming it otherwise)."""
    if sweep.eval is None:
        return
    seen = set()
    for r in runs:
        key = (r.config["data"]["data_dir"], r.config["data"]["dataset"])
        if key in seen:
            continue
        seen.add(key)
        corpus = Corpus.load(*key)
        for n in sweep.eval.lengths:
            check_length(len(corpus.val), n, f"{corpus.folder} ({sweep.path} [eval] lengths)")


def eval_device(slots: list[Slot]) -> str:
    """The first device of the sweep's slots ('cuda:0' of 'cuda:0,1'), else the CPU."""
    dev = str(slots[0].device).split(",")[0] if slots else "cpu"
    return dev if dev.startswith("cuda") else "cpu"


def run_eval_phase(sweep: Sweep, out: Path, slots: list[Slot]) -> None:
    spec = sweep.eval
    if spec is None or not (out / "runs").is_dir():
        return
    dev = eval_device(slots)
    _say(f"evaluating the finished runs at lengths {', '.join(map(str, spec.lengths))} ({spec.checkpoint} "
         f"checkpoint) on {dev}")
    try:
        evaluate_path(out, spec.lengths, spec.checkpoint, dev, spec.batch_tokens, skip_done=True, say=_say)
    except AttnbenchError as e:  # e.g. no finished run: the report still gets written
        _say(f"evaluation skipped: {e}")
