"""Losses against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2x_jax import losses

WR, WG, WB = 0.29891, 0.58661, 0.11448


def _pair(pred, target):
  return jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)


def test_mse_rgb_weighted():
  # Two pixels; errors (0.1, 0.2, 0.3) and (0.5, 0, 0): mean over pixels of sum_c w_c d_c^2.
  pred, target = _pair([[[[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]]]], np.zeros((1, 1, 2, 3)))
  px1 = WR * 0.01 + WG * 0.04 + WB * 0.09
  px2 = WR * 0.25
  assert float(losses.get_loss('mse')(pred, target)) == pytest.approx((px1 + px2) / 2, rel=1e-6)


def test_mse_y_and_uniform_error():
  pred, target = _pair([[[[0.1], [0.3]]]], np.zeros((1, 1, 2, 1)))
  assert float(losses.get_loss('mse')(pred, target)) == pytest.approx(0.05, rel=1e-6)
  # A uniform error e gives e^2 for RGB as for Y (the weights sum to 1).
  pred, target = _pair(np.full((1, 2, 2, 3), 0.2), np.zeros((1, 2, 2, 3)))
  assert float(losses.get_loss('mse')(pred, target)) == pytest.approx(0.04, rel=1e-5)


def test_l1_and_charbonnier():
  pred, target = _pair([[[[0.5, 0.2, 0.0]]]], [[[[0.2, 0.2, 0.1]]]])
  assert float(losses.get_loss('l1')(pred, target)) == pytest.approx((0.3 + 0.0 + 0.1) / 3, rel=1e-6)
  expected = (np.sqrt(0.09 + 1e-6) + 1e-3 + np.sqrt(0.01 + 1e-6)) / 3
  assert float(losses.get_loss('charbonnier')(pred, target)) == pytest.approx(expected, rel=1e-5)


def test_huber_waifu2x():
  # R: quadratic (|d| = 0.05 * 3WR < 0.1); G: clipped to 1, then linear; B: exact.
  pred, target = _pair([[[[0.55, 1.3, 0.2]]]], [[[[0.5, 0.9, 0.2]]]])
  d_r = 0.05 * 3 * WR
  d_g = 0.1 * 3 * WG
  expected = (0.5 * d_r ** 2 + 0.1 * (d_g - 0.05) + 0.0) / 3
  fn = losses.get_loss('huber')
  assert float(fn(pred, target)) == pytest.approx(expected, rel=1e-5)
  # The clip is straight-through: the clipped G still gets the linear part's gradient.
  grad = jax.grad(fn)(pred, target)
  np.testing.assert_allclose(np.asarray(grad)[0, 0, 0],
                             [d_r * 3 * WR / 3, 0.1 * 3 * WG / 3, 0.0], rtol=1e-5)
  # One channel: weight 1; below zero clips to 0.
  pred, target = _pair([[[[-0.5], [0.3]]]], [[[[0.0], [0.25]]]])
  assert float(fn(pred, target)) == pytest.approx((0.0 + 0.5 * 0.05 ** 2) / 2, rel=1e-5)


@pytest.mark.parametrize('name', losses.LOSS_NAMES)
def test_scalar_float32_and_jittable(name):
  fn = jax.jit(losses.get_loss(name))
  pred = jnp.full((2, 3, 3, 3), 0.5, jnp.bfloat16)
  out = fn(pred, jnp.zeros((2, 3, 3, 3), jnp.float32))
  assert out.shape == () and out.dtype == jnp.float32
  assert float(fn(pred, pred.astype(jnp.float32))) == pytest.approx(1e-3 if name == 'charbonnier' else 0.0)


def test_unknown_loss_raises():
  with pytest.raises(ValueError, match='l2'):
    losses.get_loss('l2')
  with pytest.raises(ValueError, match='shape'):
    losses.get_loss('l1')(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 1)))
