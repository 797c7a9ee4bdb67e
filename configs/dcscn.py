"""The seed's DCSCN: 12 layers of 196 to 48 filters (exponential decay), SELU, RGB; 1,889,974 params at 2x.

It is the default model, so this is configs/default.py under the name people look for.
"""

from configs import default


def get_config(arg=None):
  return default.get_config(arg)
