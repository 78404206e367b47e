"""ddnet: the DDNet model, its loss, CT data, optimizations and trainer.

Importing the package loads no torch (the command line's help stays fast): take the
model from `ddnet.model`, the trainer from `ddnet.trainer`, the config from `ddnet.config`.
"""

from ddnet.config import TrainConfig

__all__ = ["TrainConfig"]
__version__ = "0.1.0"
