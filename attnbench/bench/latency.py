"""Inference latency: prefill a prompt, then decode token by token from the mixers' states.

For each prompt length P (batch 1 by default):
  prefill   one forward of the P prompt tokens into a fresh cache (the mixer's parallel/chunked path);
  decode    steps of one token per sequence continuing from that cache, the next token fed back on the
            device (greedy argmax, no host sync). Median of many steps after warm-up; CUDA events on
            the GPU, perf_counter on the CPU.
  graph     (CUDA, --cuda_graph) the same step captured once in a CUDA graph and replayed (the checks that
            it is graph-safe, the capture and the verification of replays: bench/decode_graph.py).

Decode must be the cached path: forward pre-hooks on every mixer check that each decode call hands
the mixers exactly one token per sequence; the row records it (`mixer_tokens_per_decode_step`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..ops.backend import record_backends
from .decode_graph import GRAPH_WARMUP, VERIFY_STEPS, graph_decode
from .rows import RowWriter, backend_summary, base_row, measured, print_table
from .shapes import BenchShape, bench_config, build_model
from .timing import Precision, is_oom, precision, time_calls

log = logging.getLogger("attnbench.bench")

HOOK_STEPS = 2  # decode steps run with the token-counting hooks (untimed)


@dataclass
class LatencyOptions:
    prompt_lens: list[int]
    batch: int = 1
    decode_steps: int = 100
    decode_warmup: int = 10
    prefill_repeats: int = 5
    prefill_warmup: int = 2
    cuda_graph: bool = False
    compile: bool = False  # torch.compile the captured decode step (CUDA graphs only)
    recompute_steps: int = 3  # uncached decoding, for comparison: each token re-runs the whole context
    dtype: str = "auto"

    @classmethod
    def defaults(cls, device: str) -> "LatencyOptions":
        if device == "cuda":
            return cls(prompt_lens=[128, 1024, 4096, 16384], cuda_graph=True)
        return cls(prompt_lens=[64, 256, 1024], decode_steps=20, decode_warmup=3, prefill_repeats=3, prefill_warmup=1)

    def decode_budget(self) -> int:
        """Tokens a cache must hold beyond the prompt for every step this benchmark takes."""
        n = HOOK_STEPS + self.decode_warmup + self.decode_steps + self.recompute_steps + 1
        if self.cuda_graph:  # (the screening steps run on a copy of the cache)
            n += GRAPH_WARMUP + VERIFY_STEPS + self.decode_warmup + self.decode_steps
        return n + 8


# ------------------------------------------------------------------ cached-path check


@contextlib.contextmanager
def count_mixer_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Record x.shape[1] of every mixer call while the block runs (one entry per layer per call)."""
    seen: list[int] = []
    hooks = [b.mixer.register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[1])))
             for b in model.blocks]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------ one prompt length


def random_prompt(vocab: int, batch: int, P: int, device: str) -> torch.Tensor:
    """The benchmark's prompt of P tokens (seeded by P, so every mixer sees the same one)."""
    g = torch.Generator().manual_seed(P)
    return torch.randint(0, vocab, (batch, P), generator=g).to(device)


def greedy_step(model: torch.nn.Module, cache: Any, tok: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One decode step from `cache`: reads `tok` [B, 1] and writes the greedy next token back into it on
    the device (no host sync), so the same call can be repeated, timed or captured in a CUDA graph."""

    def step() -> torch.Tensor:
        out = model(tok, cache=cache)[0]
        tok.copy_(out[:, -1].argmax(-1, keepdim=True))
        return out

    return step


def measure_prompt(model: torch.nn.Module, P: int, opts: LatencyOptions, device: str, prec: Precision,
                   base: dict, rows: list[dict] | None = None) -> list[dict]:
    """Rows for one prompt length: prefill, eager decode, and (CUDA, --cuda_graph) graph decode.
    Rows are appended to `rows` as they are measured, so a caller keeps them if a later stage raises."""
    B = opts.batch
    prompt = random_prompt(model.config.vocab_size, B, P, device)
    max_len = P + opts.decode_budget()
    common = dict(context=P, prompt_len=P, batch=B)
    rows = [] if rows is None else rows
    holder: dict[str, Any] = {}

    with torch.no_grad(), prec.context(device):
        def setup() -> None:
            holder.pop("cache", None), holder.pop("logits", None)
            holder["cache"] = model.new_cache(B, max_len, device=device)

        def prefill() -> None:
            holder["logits"] = model(prompt, cache=holder["cache"])[0]

        setup()
        with record_backends() as pre_ops, count_mixer_tokens(model) as pre_seen:
            prefill()
        warm = time_calls(prefill, opts.prefill_warmup, device, setup)  # noqa: F841 (compilation, autotuning)
        samples = time_calls(prefill, opts.prefill_repeats, device, setup)
        rows.append(measured(base, "prefill_ms", "ms", samples, **common, backend=backend_summary(pre_ops),
                             backend_ops=dict(pre_ops), mixer_tokens_per_prefill=max(pre_seen),
                             ms_per_prompt_token=(sorted(samples)[len(samples) // 2] / P) if samples else None))

        cache, logits = holder["cache"], holder["logits"]
        tok = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]: the static input of every decode step
        del holder["logits"], logits

        step = greedy_step(model, cache, tok)
        with record_backends() as dec_ops, count_mixer_tokens(model) as seen:
            for _ in range(HOOK_STEPS):
                step()
        per_step = max(seen) if seen else None
        if per_step != 1:
            log.warning("%s: decode step handed the mixers %s tokens per call (expected 1): not the cached path",
                        base["mixer"], per_step)
        for _ in range(opts.decode_warmup):
            step()
        samples = time_calls(step, opts.decode_steps, device)
        dec = dict(common, backend=backend_summary(dec_ops), backend_ops=dict(dec_ops),
                   mixer_tokens_per_decode_step=per_step)
        row = measured(base, "decode_ms_per_token", "ms/token", samples, mode="eager", cuda_graph=False, **dec)
        row["tokens_per_s"] = B * 1e3 / row["median"] if row["median"] else None
        rows.append(row)
        if opts.recompute_steps > 0:
            rows.append(measure_recompute(model, prompt, opts.recompute_steps, device, base, common))

    if opts.cuda_graph and device == "cuda":
        res = graph_decode(model, cache, tok, step, prec, opts.decode_warmup, opts.decode_steps, opts.compile)
        row = measured(base, "decode_ms_per_token", "ms/token", res.samples, mode="cuda_graph",
                       cuda_graph=res.samples is not None, cuda_graph_reason=res.reason,
                       graph_verify_rel_err=res.verify_err, compiled=res.compiled,
                       compile_error=res.compile_error, **dec)
        row["tokens_per_s"] = B * 1e3 / row["median"] if row["median"] else None
        rows.append(row)
    return rows


def measure_recompute(model: torch.nn.Module, prompt: torch.Tensor, steps: int, device: str, base: dict,
                      common: dict) -> dict:
    """Uncached decoding, for comparison: no cache or state, every new token re-runs the
    model over the whole context (prompt + tokens so far), as `generate(use_cache=False)` does."""
    ctx = prompt.clone()

    def step() -> None:
        nonlocal ctx
        nxt = model(ctx)[0][:, -1].argmax(-1, keepdim=True)
        ctx = torch.cat([ctx, nxt], dim=1)

    with record_backends() as ops:
        step()  # warm-up (kernel selection at this length)
    samples = time_calls(step, steps, device)
    row = measured(base, "decode_ms_per_token", "ms/token", samples, mode="recompute", cuda_graph=False,
                   **common, backend=backend_summary(ops), backend_ops=dict(ops),
                   mixer_tokens_per_decode_step=int(prompt.shape[1]) + 1)
    row["tokens_per_s"] = common["batch"] * 1e3 / row["median"] if row["median"] else None
    return row


# ------------------------------------------------------------------ the benchmark


def run(shapes: list[BenchShape], device: str, opts: LatencyOptions, writer: RowWriter) -> list[dict]:
    """Latency rows for every mixer and prompt length; prints a table. Errors become rows, never crashes."""
    out: list[dict] = []
    for shape in shapes:
        cfg = bench_config(shape.cfg, max(opts.prompt_lens) + opts.decode_budget())
        prec = precision(opts.dtype, device, inference=True)
        model, base = build_bench_model(shape, cfg, device, prec)
        for P in opts.prompt_lens:
            rows: list[dict] = []
            try:
                measure_prompt(model, P, opts, device, prec, base, rows)
            except Exception as e:  # noqa: BLE001 - one failing mixer must not end the benchmark
                if not is_oom(e) and prec.name == "bfloat16":
                    # bf16 weights are the fast inference setting; the mixers are tested under autocast
                    log.warning("%s: bf16 weights failed at prompt %d (%s); retrying under bf16 autocast",
                                shape.mixer, P, e)
                    prec = precision("autocast", device, inference=True)
                    del model
                    model, base = build_bench_model(shape, cfg, device, prec)
                    rows = []
                    try:
                        measure_prompt(model, P, opts, device, prec, base, rows)
                    except Exception as e2:  # noqa: BLE001
                        rows.append(_failed(base, P, opts.batch, e2, device, rows))
                else:
                    rows.append(_failed(base, P, opts.batch, e, device, rows))
            for r in rows:
                writer.emit(r)
                out.append(r)
            _progress(rows)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print_latency(out)
    return out


def build_bench_model(shape: BenchShape, cfg, device: str, prec: Precision) -> tuple[torch.nn.Module, dict]:
    """The eval-mode model in the precision's weights dtype, and the fields of its rows."""
    model = prec.prepare(build_model(cfg, device)).eval()
    return model, base_row("latency", shape, cfg, model.num_params(), device, prec)


def _failed(base: dict, P: int, B: int, e: BaseException, device: str, done: list[dict]) -> dict:
    """The row of the stage that raised (prefill, eager decode or graph decode, after those in `done`)."""
    oom = is_oom(e)
    log.error("%s prompt %d: %s: %s", base["mixer"], P, type(e).__name__, e, exc_info=not oom)
    if device == "cuda":
        torch.cuda.empty_cache()
    if not done:
        row = measured(base, "prefill_ms", "ms", None, context=P, prompt_len=P, batch=B)
    else:
        mode = "eager" if len(done) == 1 else "cuda_graph"
        row = measured(base, "decode_ms_per_token", "ms/token", None, context=P, prompt_len=P, batch=B, mode=mode,
                       cuda_graph=False)
    row.update(oom=oom, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return row


def _progress(rows: list[dict]) -> None:
    for r in rows:
        v = r["value"]
        what = r["metric"] + (f" [{r['mode']}]" if "mode" in r else "")
        extra = f" ({r['cuda_graph_reason']})" if r.get("cuda_graph_reason") else (f" ERROR {r['error']}" if r["error"] else "")
        print(f"latency {r['mixer']:>20} P={r['context']:<6} {what:<32} "
              f"{'-' if v is None else f'{v:.4g}'} {r['unit']}{extra}", flush=True)


def print_latency(rows: list[dict]) -> None:
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        t = table.setdefault((r["mixer"], r["context"]), {})
        if r["metric"] == "prefill_ms":
            t["prefill"], t["pre_be"] = r["value"], r.get("backend")
            if r.get("error"):
                t["note"] = "OOM" if r["oom"] else "error"
        elif r.get("mode") == "eager":
            t["eager"], t["dec_be"], t["tok"] = r["value"], r.get("backend"), r.get("mixer_tokens_per_decode_step")
        elif r.get("mode") == "recompute":
            t["recompute"] = r["value"]
        elif r.get("mode") == "cuda_graph":
            t["graph"] = r["value"]
            if not r["cuda_graph"]:
                t["note"] = "no graph: " + (r.get("cuda_graph_reason") or "")[:60]
    def speedup(t: dict) -> float | None:  # uncached over the best cached figure
        best = t.get("graph") or t.get("eager")
        return t["recompute"] / best if t.get("recompute") and best else None

    body = [[m, P, t.get("prefill"), t.get("eager"), t.get("graph"), t.get("recompute"), speedup(t), t.get("tok"),
             f"{t.get('pre_be', '-')}/{t.get('dec_be', '-')}", t.get("note", "")] for (m, P), t in table.items()]
    print_table("latency (batch %s; ms)" % (rows[0]["batch"] if rows else "-"),
                ["mixer", "prompt", "prefill ms", "decode ms/tok", "graph ms/tok", "uncached ms/tok", "x faster",
                 "tok/step", "backend pre/dec", "note"],
                body)
