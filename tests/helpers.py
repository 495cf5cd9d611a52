"""Test helpers shared by several test files."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; the absolute norm when ref is exactly zero (e.g. a gradient
    that is zero at T = 1)."""
    diff, norm = (a.double() - ref.double()).norm().item(), ref.double().norm().item()
    return diff / norm if norm > 0 else diff


def nsa_random_cache(L: int, T: int, device: str = "cpu", D: int = 64, block_size: int = 32, seed: int = 0):
    """A bf16 NSA decode cache of L positions (one sequence, one KV head), the first T random, and its block
    means: (kv `[2, 1, 1, L, D]`, kv_means `[2, 1, 1, ceil(L / BS), D]`)."""
    from attnbench.ops.nsa import nsa_cache_means

    torch.manual_seed(seed)
    kv = torch.zeros(2, 1, 1, L, D, dtype=torch.bfloat16, device=device)
    kv[:, :, :, :T] = torch.randn(2, 1, 1, T, D, device=device).bfloat16()
    return kv, nsa_cache_means(kv, block_size)


def fla_selection(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int) -> torch.Tensor:
    """The block_indices FLA's `parallel_nsa` computes internally, by the same calls
    (fla/ops/nsa/parallel.py), so a reference can be fed FLA's own selection (GPU tests only)."""
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.nsa.parallel import parallel_nsa_topk
    from fla.ops.utils.pooling import mean_pooling

    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        k_cmp = mean_pooling(k, block_size)
        _, lse = parallel_nsa_compression(q, k_cmp, k_cmp, k.shape[1], block_size=block_size, scale=scale)
        return parallel_nsa_topk(q=q, k=k_cmp, TK=k.shape[1], lse=lse, block_counts=block_counts,
                                 block_size=block_size, scale=scale)


class OpLog(TorchDispatchMode):
    """(op, output shapes) of every aten call; host syncs and data-dependent shapes are errors."""

    FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique_dim", "_unique2",
                 "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        assert name not in self.FORBIDDEN, f"{name}: a host sync or a data-dependent shape"
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def out_and_grads(fn, inputs: list[torch.Tensor], do: torch.Tensor, **kw) -> tuple[torch.Tensor, tuple]:
    """fn(*inputs) and the gradients of sum(o * do) with respect to every input (fresh leaf copies)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = fn(*xs, **kw)
    grads = torch.autograd.grad((o * do).sum(), xs)
    return o.detach(), grads


def record_fla_captures(monkeypatch) -> list:
    """Replace ops.fla_preload.capturing by a recorder: the returned list gets (mixer, phase) on entering
    a capture and "left" on leaving it."""
    import contextlib

    from attnbench.ops import fla_preload

    events: list = []

    @contextlib.contextmanager
    def capturing(mixer: str, phase: str):
        events.append((mixer, phase))
        yield
        events.append("left")

    monkeypatch.setattr(fla_preload, "capturing", capturing)
    return events


GPU_TESTS_KEY = ("tests", "gpu")  # preload/capture key of the GPU test sessions ("tests:gpu")
PRELOAD_MIN_FILES = 4  # a GPU test session preloads that key only when it runs GPU tests of this many files


def start_gpu_test_session(items: list, stack, cuda: bool | None = None) -> dict | None:
    """For a session that runs GPU tests on CUDA: compile the FLA kernels earlier GPU test sessions compiled,
    in threads (key "tests:gpu" of attnbench/fla_configs/<GPU>.preload.json; only for a broad run, GPU tests
    of PRELOAD_MIN_FILES files or more), and enter the FLA capture
    (ATTNBENCH_FLA_CAPTURE=DIR saves this session's kernels and autotuner choices; `stack` leaves it at the
    session's end). Returns the preload's {"kernels", "failed", "seconds"}, or None."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gpu_files = {str(getattr(item, "path", "")) for item in items if "gpu" in item.keywords}
    if not cuda or not gpu_files:
        return None
    from attnbench.ops import fla_preload

    # the key holds every GPU test file's kernels (658 on the H200): 56.5 s to compile in threads there,
    # which a run of one or two files (e.g. the NSA decode tests, no FLA kernel at all) would pay for nothing
    done = fla_preload.preload_for_run(*GPU_TESTS_KEY) if len(gpu_files) >= PRELOAD_MIN_FILES else None
    stack.enter_context(fla_preload.capturing(*GPU_TESTS_KEY))
    return done
