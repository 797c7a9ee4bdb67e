"""The README's first command: the compact DCSCN for 600 steps on the embedded default images (minutes on CPU)."""

from configs import dcscn_compact


def get_config(arg=None):
  config = dcscn_compact.get_config(arg)
  config.train.num_steps = 600
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  return config
