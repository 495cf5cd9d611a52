"""attnbench: fair, verified comparisons of sequence mixers in parameter-matched small GPTs."""
from .config import GPTConfig, ModelConfig, RunConfig
from .resolve import load_config
from .errors import AttnbenchError, ConfigError
from .model import GPT
from .trainer import train

__version__ = "0.1.0"


__all__ = ["GPT", "GPTConfig", "ModelConfig", "RunConfig", "load_config", "train", "AttnbenchError", "ConfigError"]
