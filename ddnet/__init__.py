"""ddnet: the DDNet model, its loss, CT data, optimizations and trainer."""

from ddnet.config import TrainConfig
from ddnet.model import DDNet

__all__ = ["DDNet", "TrainConfig"]
__version__ = "0.1.0"
