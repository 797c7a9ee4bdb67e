"""Training losses: `get_loss(name)` gives `fn(pred, target) -> scalar float32`.

Inputs are NHWC (any leading shape; the channel axis is last), computed in float32.

Normalisation: every loss is a mean over all elements (N*H*W*C). The weighted ones multiply
channel c by `C * w_c` with RGB weights w = (0.29891, 0.58661, 0.11448) (the grey-scale weights
waifu2x and the seed use; they sum to 1); 1-channel (Y) inputs get weight 1. So 'mse' is the
mean over pixels of sum_c w_c (p - t)^2, and a uniform error e gives e^2 for RGB and Y alike.

- 'mse': RGB-weighted squared error (above).
- 'l1': mean |p - t| (unweighted, as waifu2x's L1Criterion).
- 'huber': waifu2x's ClippedWeightedHuberCriterion (lib/ClippedWeightedHuberCriterion.lua, with
  train.lua's weights 3*w and delta 0.1): d = (clip(p, 0, 1) - t) * 3*w_c; 0.5 d^2 where |d| < 0.1,
  else 0.1 * (|d| - 0.05); mean over elements. The clip is straight-through (the gradient flows
  as if unclipped), as waifu2x's backward pass does, so out-of-range predictions are still pulled
  back; unlike waifu2x's hand-written backward, the gradient here is the true one of this value
  (it includes the extra factor 3*w_c).
- 'charbonnier': mean sqrt((p - t)^2 + eps^2), eps = 1e-3.
"""

import jax
import jax.numpy as jnp

LOSS_NAMES = ('l1', 'mse', 'huber', 'charbonnier')
RGB_WEIGHTS = (0.29891, 0.58661, 0.11448)
HUBER_DELTA = 0.1
CHARBONNIER_EPS = 1e-3


def channel_weights(channels):
  """Per-channel weights that average to 1: 3*RGB_WEIGHTS for RGB, ones otherwise."""
  if channels == 3:
    return jnp.asarray(RGB_WEIGHTS, jnp.float32) * 3.0
  return jnp.ones((channels,), jnp.float32)


def _f32(pred, target):
  pred, target = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f'losses.py: pred shape {pred.shape} != target shape {target.shape}')
  return pred, target


def mse(pred, target):
  pred, target = _f32(pred, target)
  return jnp.mean(channel_weights(pred.shape[-1]) * jnp.square(pred - target))


def l1(pred, target):
  pred, target = _f32(pred, target)
  return jnp.mean(jnp.abs(pred - target))


def huber(pred, target):
  pred, target = _f32(pred, target)
  clipped = pred + jax.lax.stop_gradient(jnp.clip(pred, 0.0, 1.0) - pred)  # straight-through
  d = jnp.abs((clipped - target) * channel_weights(pred.shape[-1]))
  loss = jnp.where(d < HUBER_DELTA, 0.5 * jnp.square(d), HUBER_DELTA * (d - 0.5 * HUBER_DELTA))
  return jnp.mean(loss)


def charbonnier(pred, target):
  pred, target = _f32(pred, target)
  return jnp.mean(jnp.sqrt(jnp.square(pred - target) + CHARBONNIER_EPS ** 2))


_LOSSES = {'l1': l1, 'mse': mse, 'huber': huber, 'charbonnier': charbonnier}


def get_loss(name):
  """The loss function `name` (one of LOSS_NAMES): fn(pred, target) -> scalar float32 mean."""
  if name not in _LOSSES:
    raise ValueError(f'losses.py: loss {name!r} must be one of {list(LOSS_NAMES)}')
  return _LOSSES[name]
