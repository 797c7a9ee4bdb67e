"""The seed's DCSCN: 12 layers of 196 to 48 filters (exponential decay), SELU, RGB; 1,889,974 params at 2x."""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  m = config.model
  m.name = 'dcscn'
  m.channels = 3
  m.layers = 12
  m.first_filters = 196
  m.last_filters = 48
  m.filter_decay = 'exp'  # exp (the seed) | power (the paper, with gamma)
  m.gamma = 1.5
  m.recon_a = 128  # branch A: conv1x1
  m.recon_b1 = 64  # branch B: conv1x1 ...
  m.recon_b2 = 128  # ... then conv3x3
  m.upsampler_filters = 32
  m.final_bias = False
  m.activation = 'selu'  # selu | prelu | relu | leaky_relu
  m.skip_interpolation = 'bilinear'  # bilinear (the seed) | bicubic (the paper)
  return config
