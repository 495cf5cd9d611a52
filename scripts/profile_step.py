"""Where does a training step spend its time? One table per mixer from torch.profiler.

    python scripts/profile_step.py [--mixers a,b] [--variants eager,graph,blocks,blocks+graph] [--steps 5] [--out FILE]

Builds each mixer's model from configs/<mixer>.toml (the bake-off shapes) and, for each variant (eager, or
torch.compile with scope blocks|model and an optional mode, as train.compile_scope / compile_mode, e.g.
blocks:reduce-overhead; a "+graph" suffix, or "graph" alone for eager, captures the whole step in one CUDA
graph as train.cuda_graph does), runs warm-up steps, times 20 full training steps (forward, backward,
AdamW; bf16 autocast), then profiles a few and prints the top operators by self device time, grouped
into: matmuls, attention kernels, FLA/Triton kernels, elementwise/other, plus the count of kernel
launches per step. A graph's kernels are profiled from one eager step (a replay is one launch), so
for "+graph" variants the wall time is the replayed step's and the breakdown is the eager step's.
"""
from __future__ import annotations

import argparse
import time

import torch

from attnbench import GPT, mixers
from attnbench.resolve import load_config
from attnbench.bench.timing import precision
from attnbench.bench.training_step import train_step
from attnbench.graphed_step import GraphedStep, make_graph_safe
from attnbench.trainer import compile_model, make_optimizer


def kernel_group(name: str) -> str:
    """The kind of a kernel (or aten op) by its name: matmul, attention(sdpa), fla/triton, elementwise/other."""
    k = name.lower()
    return ("matmul" if any(s in k for s in ("gemm", "matmul", "mm", "cutlass", "sm90_xmma", "nvjet")) else
            "attention(sdpa)" if any(s in k for s in ("flash", "fmha", "attention")) else
            "fla/triton" if any(s in k for s in ("chunk", "fused_recurrent", "triton", "parallel_nsa", "causal_conv")) else
            "elementwise/other")


def profile_mixer(name: str, steps: int, variant: str = "eager") -> str:
    cfg = load_config("configs/shakespeare_char.toml" if name == "softmax" else f"configs/{name}.toml")
    cfg.model.vocab_size = 65
    torch.manual_seed(0)
    model = GPT(cfg.model).cuda()
    opt = make_optimizer(model, cfg, "cuda")
    torch._dynamo.reset()
    base, graphed = (variant[:-len("+graph")], True) if variant.endswith("+graph") else (variant, variant == "graph")
    if base in ("eager", "graph"):
        run = model
    else:
        scope, _, mode = base.partition(":")
        run = compile_model(model, scope, mode or "default")
    if graphed:
        make_graph_safe(opt, "cuda")
    prec = precision("autocast", "cuda", inference=False)  # fp32 weights, bf16 autocast: as training
    step = GraphedStep(lambda a, b: train_step(run, opt, a, b, prec, "cuda", zero_grad=False,
                                               autocast_cache=not graphed),
                       lambda: opt.zero_grad(set_to_none=True), enabled=graphed, label=f"{name} {variant}")
    B, T = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(0, 65, (B, T), device="cuda")
    y = torch.randint(0, 65, (B, T), device="cuda")
    for _ in range(5):
        step(x, y)
    if graphed and not step.captured:
        raise RuntimeError(f"the step was not captured: {step.reason}")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        step(x, y)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 20 * 1000
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            # a replay is one launch: profile the same step run eagerly on the same tensors instead
            step.step(x, y) if graphed else step(x, y)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    launches = sum(e.count for e in events) / steps
    groups: dict[str, float] = {}
    for e in events:
        g = kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_device_time_total / steps / 1000
    lines = [f"## {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, B={B}, T={T}, "
             f"{variant}): {ms:.2f} ms/step wall, {total:.2f} ms device time, {launches:.0f} kernels/step"]
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {g:20s} {v:7.2f} ms  {100 * v / total:5.1f}%")
    lines.append("  top kernels:")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
        lines.append(f"    {e.self_device_time_total / steps / 1000:7.3f} ms  x{e.count // steps:<4d} {e.key[:90]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixers", default=",".join(mixers.available()))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="eager",
                    help="comma-separated: eager, graph, blocks, blocks+graph, model, blocks:reduce-overhead, ...")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = []
    for name in a.mixers.split(","):
        for variant in a.variants.split(","):
            try:
                text = profile_mixer(name, a.steps, variant)
            except Exception as e:  # keep profiling the others; report the failure
                text = f"## {name} ({variant}): failed: {type(e).__name__}: {e}"
            print(text, flush=True)
            out.append(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
