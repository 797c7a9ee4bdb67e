"""The seed's ESPCN_7 with SelNet's selection units: six conv3x3 (64..256), SELU, unit, pixel shuffle."""

import ml_collections

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  m = config.model = ml_collections.ConfigDict(dict(
      scale=config.model.scale, conv=config.model.conv, dtype=config.model.dtype))
  m.name = 'espcn_su'
  m.channels = 3
  m.filters = (64, 64, 128, 128, 256, 256)
  m.activation = 'selu'
  m.selection_activation = 'relu'  # the activation inside the unit: h * sigmoid(conv1x1(act(h)))
  # The seed's code drops the multiplication (h -> sigmoid(conv1x1(act(h)))); True is SelNet's unit.
  m.selection_multiply = True
  m.skip_interpolation = 'none'  # none (the seed) | bilinear | bicubic: add the interpolated input
  # 1e-3 (the shared default) diverged on a GPU at batch 64 after ~800 steps: a loss spike, then
  # the output stuck (SELU + sigmoid gates); 3e-4 trained cleanly (README, "Reproducing the DCSCN paper").
  config.train.learning_rate = 3e-4
  return config
