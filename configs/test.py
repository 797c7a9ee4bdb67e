"""A tiny DCSCN that trains in seconds on CPU: for tests and smoke runs."""

from configs import dcscn


def get_config(arg=None):
  config = dcscn.get_config(arg)
  m = config.model
  m.layers = 3
  m.first_filters = 8
  m.last_filters = 4
  m.recon_a = 8
  m.recon_b1 = 4
  m.recon_b2 = 4
  m.upsampler_filters = 4
  config.data.patch_size = 12
  config.data.val_count = 1
  config.data.val_max_side = 48
  config.data.num_threads = 1
  config.data.prefetch = 2
  config.train.batch_size = 4
  config.train.num_steps = 4
  config.train.warmup_steps = 1
  config.train.log_every = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 2
  return config
