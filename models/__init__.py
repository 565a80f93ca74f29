"""raytron.models: the architecture zoo as plain single-device PyTorch (the numerical reference).

Never imports raytron.parallelism: parallelism is applied from outside.
"""

from .config import ModelConfig
from .flops import flops_per_token, param_counts
from .moe import MoE
from .registry import FLAVORS, build, get_config, list_flavors
from .transformer import Transformer

__all__ = ["ModelConfig", "MoE", "Transformer", "FLAVORS", "build", "get_config", "list_flavors",
           "flops_per_token", "param_counts"]
