"""`python -m attnbench.sweep RUN_DIR`: a sweep's child process, training the run RUN_DIR/run.json
describes (resuming from its checkpoint). The sweep starts it (processes.child_command), under torchrun
when a run spans several GPUs.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from ..checkpoint import latest_checkpoint
from ..errors import AttnbenchError
from ..preemption import EXIT_PREEMPTED, Preempted
from ..trainer import train
from .manifest import RUN_FILE
from .processes import _die_with_parent


def _run_main(run_dir: str) -> int:
    """Child entry point: train the run described by RUN_DIR/run.json (resuming from its checkpoint)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C forwarded by the sweep: stop cleanly
    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        print(f"attnbench: error: {run_dir / RUN_FILE} is missing or unreadable ({e})", file=sys.stderr)
        return 2
    cfg = spec["config"]
    cfg["train"]["out_dir"] = str(run_dir)
    resume = latest_checkpoint(run_dir) is not None
    cfg["train"]["resume"] = resume
    try:
        train(cfg)
    except AttnbenchError as e:
        print(f"attnbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Preempted as e:
        print(f"attnbench: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m attnbench.sweep",
                                description="train one planned sweep run (the sweep's child process)")
    p.add_argument("run_dir", help="run folder holding run.json")  # positional: torchrun would eat an option
    return _run_main(p.parse_args(argv).run_dir)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
