"""attnbench: fair, verified comparisons of sequence mixers in parameter-matched small GPTs."""
from .config import GPTConfig, ModelConfig, RunConfig
from .resolve import load_config
from .errors import AttnbenchError, ConfigError
from .model import GPT

__version__ = "0.1.0"


def train(config=None, overrides=None) -> dict:
    """Train one run: `attnbench.train("configs/shakespeare_char.toml", overrides={"max_iters": 100})`.

    Returns the run summary (also written to <out_dir>/summary.json).
    """
    from .trainer import train as _train

    return _train(config, overrides)


__all__ = ["GPT", "GPTConfig", "ModelConfig", "RunConfig", "load_config", "train", "AttnbenchError", "ConfigError"]
