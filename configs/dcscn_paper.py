"""The DCSCN paper's normal model: 12 layers of 196 to 48 filters (power law, gamma 1.5), A 64, B 32, PReLU."""

from configs import dcscn


def get_config(arg=None):
  config = dcscn.get_config(arg)
  m = config.model
  m.channels = 1  # the paper trains and measures on the Y channel
  m.filter_decay = 'power'
  m.gamma = 1.5
  m.recon_a = 64
  m.recon_b1 = 32
  m.recon_b2 = 32
  m.upsampler_filters = 32
  m.activation = 'prelu'
  m.skip_interpolation = 'bicubic'
  return config
