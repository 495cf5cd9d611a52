"""Optional: the bake-off table sent to Weights & Biases too, when the runs logged there."""
from __future__ import annotations

from .load import Results
from .tables import bakeoff


def log_bakeoff_to_wandb(res: Results) -> None:
    """With log.wandb_log=true in the runs and wandb installed: the bake-off table to W&B too (optional)."""
    cfgs = [r.config.get("log", {}) for r in res.runs]
    if not any(c.get("wandb_log") for c in cfgs):
        return
    try:
        import wandb  # optional dependency: imported only when the runs logged to W&B
    except ImportError:
        return
    try:
        rows = bakeoff(res)
        table = wandb.Table(columns=["mixer", "lr", "seeds", "val_loss", "val_loss_sd", "final_val_loss", "ppl", "bpc",
                                     "tokens_per_s", "ms_per_iter", "peak_mem_mb"])
        for r in rows:
            table.add_data(r.mixer, r.lr, r.n, r.val_loss[0], r.val_loss[1], r.final_val_loss[0], r.ppl[0],
                           r.bpc[0] if r.bpc else None, r.tokens_per_s, r.ms_per_iter, r.peak_mem_mb)
        run = wandb.init(project=cfgs[0].get("wandb_project", "attnbench"), name=f"{res.name}-report",
                         job_type="report", dir=str(res.root))
        run.log({"bakeoff": table})
        run.finish()
    except Exception as e:  # W&B is a mirror: the report on disk is the result
        print(f"W&B logging of the bake-off table failed ({e}); the report on disk is complete")

