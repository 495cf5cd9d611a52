import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # Triton kernels (where triton is installed) run under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# attnbench after TRITON_INTERPRET: triton.jit reads it when a kernel is defined, i.e. on import

from attnbench.data import prepare_text  # noqa: E402
from attnbench.ops.backend import fla_available  # noqa: E402
from attnbench.ops import fla_configs  # noqa: E402

if torch.cuda.is_available():  # saved FLA autotuner choices go in before any test module imports FLA
    fla_available()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)




def pytest_sessionfinish(session, exitstatus):
    """ATTNBENCH_SAVE_FLA_CONFIGS=FILE: save the choices FLA's autotuners made during the GPU tests, so a
    later run with the file installed (attnbench/ops/fla_configs.py) compiles one configuration per kernel
    instead of timing them all (seconds to a minute per test on a fresh GPU)."""
    path = os.environ.get("ATTNBENCH_SAVE_FLA_CONFIGS")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if path and worker:  # each pytest-xdist worker tuned its own files' kernels: one file per worker
        path = str(Path(path).with_name(f"{Path(path).stem}-{worker}{Path(path).suffix}"))
    if path:
        print(f"\nFLA autotuner choices saved to {path}: {fla_configs.save_live(Path(path))}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run fastest on one intra-op thread: a second only adds sync overhead, badly so on a
    busy 2-core machine. Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _synthetic_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """Text with real structure (words, lines, speakers) so a tiny model can learn something quickly."""
    rng = random.Random(seed)
    words = ["the", "king", "and", "queen", "of", "my", "lord", "thou", "art", "good", "sir", "what", "is",
             "love", "death", "night", "day", "come", "go", "we", "shall", "not", "be", "to", "he", "she"]
    speakers = ["ROMEO:", "JULIET:", "KING:", "QUEEN:"]
    out, size = [], 0
    while size < n_chars:
        line = rng.choice(speakers) + "\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared char-level dataset named 'tiny' in a session-wide data dir."""
    d = tmp_path_factory.mktemp("data")
    src = d / "tiny.txt"
    src.write_text(_synthetic_text())
    prepare_text(src, "tiny", tokenizer="char", data_dir=d, verbose=False)
    return d


def tiny_run_config(data_dir: Path, out_dir: Path, **over) -> dict:
    """A run that trains in about a second on the CPU."""
    cfg = {
        "data": {"dataset": "tiny", "data_dir": str(data_dir)},
        "model": {"mixer": "softmax", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0},
        "optim": {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2},
        "train": {"out_dir": str(out_dir), "batch_size": 8, "max_iters": 20, "eval_interval": 10,
                  "eval_batch_size": 64, "log_interval": 1, "device": "cpu", "progress": False},
    }
    for k, v in over.items():
        sec, key = k.split(".", 1)
        if key.startswith("mixer_args."):  # mixer_args.KEY, or mixer_args.MIXER.KEY (a hybrid layer's own)
            *path, last = key.split(".")[1:]
            table = cfg[sec].setdefault("mixer_args", {})
            for p in path:
                table = table.setdefault(p, {})
            table[last] = v
        else:
            cfg.setdefault(sec, {})[key] = v
    return cfg
