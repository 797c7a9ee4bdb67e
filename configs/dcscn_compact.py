"""The DCSCN paper's compact model c-DCSCN: 7 layers of 32 to 8 filters (power law, gamma 1.2), PReLU."""

from configs import dcscn


def get_config(arg=None):
  config = dcscn.get_config(arg)
  m = config.model
  m.channels = 1  # the paper trains and measures on the Y channel
  m.layers = 7
  m.first_filters = 32
  m.last_filters = 8
  m.filter_decay = 'power'
  m.gamma = 1.2
  m.recon_a = 24
  m.recon_b1 = 8
  m.recon_b2 = 8
  m.upsampler_filters = 8
  m.final_bias = False
  m.activation = 'prelu'
  m.skip_interpolation = 'bicubic'
  config.train.batch_size = 20
  config.train.learning_rate = 2e-3
  return config
