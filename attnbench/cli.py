"""The `attnbench` command: one subcommand per stage (prepare, train, sample, ...)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import evaluate, params_cli, report, run, sample, sweep
from .bench import cli as bench_cli
from .data import prepare
from .errors import AttnbenchError
from .preemption import EXIT_PREEMPTED, Preempted
from .trainer import train


def _train_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model from a TOML config",
                       description="attnbench train CONFIG [--key=value ...]  e.g. --max_iters=2 --model.n_layer=4; "
                                   "--resume continues the run in --out_dir")
    p.add_argument("config", help="TOML file, or a bundled config's name, e.g. shakespeare_char or cpu_tiny")

    def run_train(a: argparse.Namespace) -> int:
        train(a.config, a.overrides)
        return 0

    p.set_defaults(func=run_train, takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare.register_cli(sub)
    _train_cli(sub)
    sample.register_cli(sub)
    for mod in (params_cli, bench_cli, sweep, report, evaluate, run):
        mod.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `--key=value` overrides (nanoGPT style) go to the config, not to argparse; `--resume` is `--resume=true`
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        bad = [r for r in rest if not r.startswith("--")]
        if bad:
            parser.error(f"unexpected argument {bad[0]!r}; settings are written --key=value")
    args.overrides = [r if "=" in r else f"{r}=true" for r in rest]
    try:
        return int(args.func(args) or 0)
    except AttnbenchError as e:
        print(f"attnbench: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"attnbench: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("attnbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
