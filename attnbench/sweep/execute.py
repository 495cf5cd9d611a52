"""A sweep from start to end: plan, check, train (resumably), benchmark, report (`run_sweep`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write_text
from ..report import build_report
from .bench_phase import _BenchPhase, check_bench_options
from .launchers import Launcher, make_launcher
from .eval_phase import check_eval, run_eval_phase
from .manifest import _clear_stale, _folder_lock, _Manifest, _write_run_file, run_state
from .plan import PlannedRun, plan
from .processes import Slot, _interruptible, _say
from .spec import Sweep, add_overrides, load_sweep, set_mixers


def run_sweep(sweep: Sweep | str | Path, out: str | Path | None = None, devices: str | None = None,
              jobs_per_device: int | None = None, nproc_per_node: int | None = None, data_dir: str | None = None,
              bench: bool = True, report: bool = True, dry_run: bool = False, status_interval: float = 30.0,
              overrides: list[str] | None = None, cuda_mps: bool | None = None, launcher: str | None = None,
              launcher_options: dict | None = None, mixers: list[str] | None = None) -> dict:
    """Plan, train (resumably), benchmark, evaluate at the [eval] lengths (when the sweep file asks) and report. Returns the manifest (sweep.json's content).

    `mixers`: the command line's --mixers (names, comma lists or `all`) instead of the sweep file's list.
    `launcher`: 'local' (child processes here) or 'slurm' (a Slurm job per run; `launcher_options` are
    the command line's --partition, --time, ... over the sweep file's [launcher] table).

    Raises KeyboardInterrupt after a clean stop on Ctrl-C/SIGTERM, AttnbenchError on bad input. Runs
    that fail are recorded as failed (their log's tail is printed); the other runs go on.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if mixers:
        set_mixers(sweep, mixers)
    if overrides:
        add_overrides(sweep, overrides)
    out = Path(out or Path("out") / sweep.name)
    jobs = jobs_per_device or sweep.jobs_per_device
    nproc = nproc_per_node or sweep.nproc_per_node
    runs = plan(sweep, out, data_dir=data_dir)
    for r in runs:
        ga = r.config["train"]["gradient_accumulation_steps"]
        if nproc > 1 and ga % nproc:
            raise ConfigError(f"--nproc_per_node {nproc}: train.gradient_accumulation_steps={ga} must be a multiple of "
                              f"it (set it in [overrides]; accumulation is split across processes)")
    if bench:
        check_bench_options(sweep.bench, sweep.path)
    check_eval(sweep, runs)
    launch, slots = make_launcher(launcher, sweep, devices, jobs, nproc, launcher_options)
    graphed = any(r.config["train"].get("cuda_graph") for r in runs)
    train_devices = launch.devices()
    if graphed and any(not d.startswith("cuda") for d in train_devices):
        raise ConfigError(f"{sweep.path}: train.cuda_graph = true needs CUDA GPUs, but the sweep would run on "
                          f"{', '.join(train_devices)}; pass --set train.cuda_graph=false "
                          f"(or, for `attnbench run`, --preset bakeoff-quick on a CPU)")
    if graphed and nproc > 1:
        raise ConfigError(f"{sweep.path}: train.cuda_graph = true does not run under torchrun (--nproc_per_node "
                          f"{nproc}); pass --set train.cuda_graph=false")
    if cuda_mps is not None:
        sweep.cuda_mps = cuda_mps
    if not dry_run:
        launch.check(sweep, runs, out)  # e.g. sbatch, the partition, options Slurm refuses: before any file
    with _folder_lock(out):
        return _execute(sweep, out, runs, launch, slots, bench, report, dry_run, status_interval)


def _execute(sweep: Sweep, out: Path, runs: list[PlannedRun], launch: Launcher, slots: list[Slot], bench: bool,
             report: bool, dry_run: bool, status_interval: float) -> dict:
    man = _Manifest(out, sweep, runs)
    atomic_write_text(out / "sweep.toml", sweep.text)  # the sweep file as run, next to its results
    todo: list[PlannedRun] = []
    states = {}
    elsewhere = launch.in_flight(man, runs)  # still training (a Slurm job of an earlier sweep): left alone
    for r in runs:
        rd = out / "runs" / r.run_id
        state, step = run_state(rd)
        states[r.run_id] = (state, step)
        if state == "done":
            man.data["runs"][r.run_id]["status"] = "done"
            continue
        todo.append(r)
        if r.run_id in elsewhere:
            continue
        if state == "stale" and not dry_run:
            _clear_stale(rd)
        rd.mkdir(parents=True, exist_ok=True)
        _write_run_file(rd, r, sweep)
        man.data["runs"][r.run_id]["status"] = "partial" if state == "resume" else "pending"
    man.save()
    n_done = len(runs) - len(todo)
    _say(f"{sweep.name}: {len(runs)} runs ({len(sweep.mixers)} mixers x {len(runs) // len(sweep.mixers)}), "
         f"{n_done} done, {sum(states[r.run_id][0] == 'resume' for r in todo)} to resume, "
         f"{sum(states[r.run_id][0] != 'resume' for r in todo)} to start -> {out}"
         + ("" if launch.name == "local" else f" ({launch.describe()})"))
    for r in runs:
        st, step = states[r.run_id]
        m = f", {r.match['n_params'] / 1e6:.2f}M params ({100 * r.match['deviation']:+.1f}%)" if r.match else ""
        what = {"done": "done", "resume": f"resume from step {step}", "new": "new", "stale": "restart (no checkpoint)"}[st]
        if r.run_id in elsewhere:
            what = f"training in {elsewhere[r.run_id]}"
        _say(f"  {r.run_id}: {what}{m}")
    if dry_run:
        for line in launch.dry_run(out, todo):
            print(line)
        return man.data

    benches = _BenchPhase(sweep, out, runs, slots, man) if bench and sweep.bench.enabled else None
    with _interruptible():
        try:
            if benches is not None and todo and launch.prestarts_bench:
                benches.prestart()  # the first bench child starts up while the runs train (on a GPU)
            failed = launch.train(sweep, out, todo, man, status_interval, n_done, len(runs))
            if benches is not None:
                benches.run()
            run_eval_phase(sweep, out, slots)
        finally:
            if benches is not None:
                benches.stop()
    if report:
        path = build_report(out)
        man.data["report"] = str(path.relative_to(out)) if path.is_relative_to(out) else str(path)
        man.save()
        _say(f"report: {path}")
    if failed:
        _say(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {out / 'logs'}; "
             "run the sweep again to retry them")
    return man.data
