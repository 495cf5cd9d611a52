"""`attnbench report DIR`: report.md and PNG figures from a results folder, from its files alone.

Input (see attnbench.sweep): `DIR/runs/<run>/{config.json, metrics.jsonl, summary.json, run.json}` and
`DIR/bench/*.jsonl`; DIR may also be a folder of run folders, or one run folder. When DIR/sweep.json
exists only the runs it plans are reported (others in runs/ are listed as not part of the sweep).
Nothing else is needed: no checkpoints, no dataset, no GPU; the mixers need not even be installed.

Output, in DIR/report/ (or --out):
  report.md                 parameter table, bake-off table, the kernels behind the figures (which backend ran
                            each op, in training and in each benchmark), figures (the throughput one says where
                            each mixer overtakes softmax), skipped runs, notes
  loss_vs_step.png          training and validation loss against steps
  loss_vs_time.png          the same against training wall time
  ppl_vs_flops.png          validation perplexity against cumulative training FLOPs (log-log)
  val_vs_train.png          validation loss against training loss at each evaluation (the generalisation gap)
  lr_sensitivity.png        best validation loss against learning rate (when several were swept)
  decode_latency.png        decode ms/token against prompt length (latency benchmark)
  memory_vs_context.png     peak training memory against context length (memory benchmark)
  throughput_vs_context.png training tokens/s against context length (throughput benchmark)
  recall_vs_width.png       MQAR runs: accuracy against width, one panel per (L, K) (report/recall.py)
  recall_vs_state.png       MQAR runs: accuracy against decode-state bytes per sequence
  loss_vs_position.png      validation loss against position far past the training length (runs evaluated
                            by `attnbench eval`: the "Length generalisation" section)
A folder of MQAR runs (task.kind = "mqar") gets the "Recall (MQAR)" section (table and the two recall
figures) in place of the language-modelling tables and curves; a folder with both kinds gets both.

Aggregation: a run's score is its best validation loss (the lowest of its evaluations: the checkpoint
one would keep, as nanoGPT keeps the best-val checkpoint; small models on small data overfit, and a
final-only score then ranks how fast a mixer memorises, not how well it models); the final validation
loss stays beside it, so the overfitting shows. A mixer's best learning rate is the one with the
lowest mean score over its seeds; the bake-off shows mean +- sample standard deviation over the seeds
at that learning rate (just the value for one seed). Curves show every seed at the best learning rate.
Speed columns come from the throughput benchmark at the training context when there is one (runs
measured alone on their device); otherwise from the training runs, flagged when several runs shared a
device (their tokens/s then depends on the neighbours). One colour per mixer in every figure
(MIXER_COLORS). A run folder that cannot be read (bad JSON, no summary: unfinished) is listed as
skipped with the reason; missing benchmark data omits those figures and columns with a note.

Modules, each with one job:
  load.py         read a results folder: RunResult, Results, load_run, load_results, benchmark rows
  colors.py       one colour and one place per mixer (MIXER_COLORS, MIXER_ORDER)
  tables.py       aggregation and table text: by_mixer, best_lr, the bake-off, parameters, settings, kernels
  figures.py      the PNG figures (matplotlib) and the curves behind them
  wandb_table.py  the bake-off table to W&B (optional)
  recall.py       the Recall (MQAR) section: best run per (mixer, L, K, width), its table and figures
  lengthgen.py    the length-generalisation section and its figures, from each run's eval/lengthgen.jsonl
  markdown.py     build_report: report.md from all of the above; bakeoff_section reads its table back
  cli.py          `attnbench report`
"""
from .cli import register_cli
from .colors import MIXER_COLORS, MIXER_ORDER, mixer_color
from .load import Results, RunResult, load_results, load_run
from .markdown import bakeoff_section, build_report, lengthgen_table
from .tables import BakeoffRow, bakeoff, bakeoff_markdown, best_lr, by_mixer, crossover_text

__all__ = ["BakeoffRow", "MIXER_COLORS", "MIXER_ORDER", "Results", "RunResult", "bakeoff", "bakeoff_markdown",
           "bakeoff_section", "best_lr", "build_report", "by_mixer", "crossover_text", "lengthgen_table", "load_results",
           "load_run", "mixer_color", "register_cli"]
