"""Tiled inference: equals the whole-image result for any tile size, over 1 or 4 devices, jit or
pmap, with TTA, for every channel layout; alpha filling; memory-free helpers."""

import functools

import jax
import numpy as np
import pytest

from configs import test as test_config
from w2x_jax import inference
from w2x_jax import models

TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(scale=2, channels=3, skip='bilinear', seed=1):
  cfg = test_config.get_config(f'scale={scale}').model
  cfg.channels = channels
  cfg.skip_interpolation = skip
  model = models.build_model(cfg)
  x = np.zeros((1, 8, 8, channels), np.float32)
  params = jax.jit(model.init)(jax.random.key(seed), x)['params']
  # A small residual beside the skip, as a trained model has: outputs mostly inside [0, 1] (so
  # clipping hides little) while the learned path still changes them.
  params = jax.tree.map(np.asarray, params)
  params['final']['kernel'] = params['final']['kernel'] * 0.05
  return cfg, model, params


def _image(h, w, c, seed=0):
  return np.random.default_rng(seed).random((h, w, c), dtype=np.float32)


def _raw(cfg, model, params, image):
  """The model alone (not clipped) on the image edge-padded by the margin, cropped."""
  m, s = models.receptive_margin(cfg), cfg.scale
  padded = np.pad(image, ((m, m), (m, m), (0, 0)), mode='edge')
  y = np.asarray(model.apply({'params': params}, padded[None]))[0]
  return y[s * m:y.shape[0] - s * m, s * m:y.shape[1] - s * m]


def _luma(rgb):
  return np.clip(rgb @ np.array(inference.LUMA, np.float32), 0, 1)


def _upscaler(cfg, model, params, **kw):
  return inference.Upscaler(params, cfg, model=model, **kw)


@pytest.mark.parametrize('tile_size', [13, 16, 23, 64])
def test_tiled_equals_whole(tile_size):
  cfg, model, params = _model()
  up = _upscaler(cfg, model, params, tile_size=tile_size, batch_size=4)
  margin = inference.tile_margin(cfg, 3)
  assert margin == models.receptive_margin(cfg) == 6  # from the config: 3 layers + 3
  for shape in [(11, 17), (1, 9), (9, 1), (1, 1), (25, 30)]:
    image = _image(*shape, 3)
    want = inference.upscale_whole(params, cfg, image, model=model)
    got = up(image)
    assert got.shape == (2 * shape[0], 2 * shape[1], 3)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= TOL, (tile_size, shape)
    assert got.min() >= 0 and got.max() <= 1


class _CountingModel:
  """Counts traces: the tile function calls apply once per trace (RGB, no TTA)."""

  def __init__(self, model):
    self.model, self.traces = model, 0

  def apply(self, *args):
    self.traces += 1
    return self.model.apply(*args)


def test_one_compilation_per_tile_shape():
  cfg, model, params = _model()
  counting = _CountingModel(model)
  up = inference.Upscaler(params, cfg, model=counting, tile_size=16, batch_size=4)
  for shape in [(7, 9), (21, 5), (30, 31), (1, 40)]:
    up(_image(*shape, 3))
  assert up.tile_side(7, 9, 3) == up.tile_side(30, 31, 3) == 16
  assert counting.traces == 1


def test_tile_side_halves_for_small_images_and_rejects_tiny_tiles():
  cfg, model, params = _model()
  up = _upscaler(cfg, model, params)
  assert up.tile_size == inference.DEFAULT_TILE_SIZE == 320
  sides = list(range(320, 95, -32))  # 320, 288, ..., 96: inference.TILE_SIDES of them
  assert len(sides) == inference.TILE_SIDES
  # One tile holds the image: the smallest side that does, halved while half does.
  assert up.tile_side(10, 3, 3) == 24  # 10 + 2 * 6 fits in 96 / 4, not in 12
  assert up.tile_side(300, 3, 3) == 320  # 300 + 2 * 6 > 288
  assert up.tile_side(200, 150, 3) == 224  # not 320: 2x the pixels
  assert up.tile_side(150, 50, 3) == 192 and up.tile_side(100, 116, 3) == 128
  # Larger than one tile: the side that computes the fewest pixels.
  assert up.tile_side(488, 488, 3) == 256  # 2x2 tiles of 256 hold it exactly (core 244)
  assert up.tile_side(616, 616, 3) == 320  # 2x2 of 320 (core 308), not 3x3 of 288
  assert up.tile_side(1024, 1024, 3) == 224  # 5x5 of 224^2 (1.25 M) < 4x4 of 320^2 (1.64 M)
  assert up.num_tiles(1024, 1024, 3) == 25
  for h, w in [(700, 500), (1080, 1920), (257, 3000)]:
    costs = {s: up._computed_pixels(h, w, 6, s) for s in sides}  # pylint: disable=protected-access
    assert costs[up.tile_side(h, w, 3)] == min(costs.values())
  up = _upscaler(cfg, model, params, tile_size=250)  # 250, 224, 192, ..., 32
  assert up.tile_side(230, 3, 3) == 250  # 230 + 2 * 6 > 224
  # 6 tiles of 64^2: fewer pixels than 2 of 250^2 or 224^2 (and tied with 15 of 32^2: the larger)
  assert up.tile_side(300, 3, 3) == 64
  # Not within half a step of the tile size (257: 224, not 256); a tenth of a large one as the step.
  assert _upscaler(cfg, model, params, tile_size=257).tile_side(230, 3, 3) == 257
  assert _upscaler(cfg, model, params, tile_size=1024).tile_side(512, 512, 3) == 576  # step 96
  # Every choice still gives the whole-image result (the tiling is exact for any side).
  image = _image(300, 3, 3)
  np.testing.assert_allclose(up(image), inference.upscale_whole(params, cfg, image, model=model), atol=1e-5)
  with pytest.raises(ValueError, match='margin'):
    _upscaler(cfg, model, params, tile_size=12)(_image(4, 4, 3))
  assert inference.margin_overhead(cfg, 256) == pytest.approx(1 - (244 / 256) ** 2)


def test_four_devices_equal_one_and_pmap():
  assert jax.local_device_count() == 4
  cfg, model, params = _model()
  image = _image(29, 23, 3)
  kw = dict(tile_size=20, batch_size=4)
  one = _upscaler(cfg, model, params, devices=jax.local_devices()[:1], **kw)(image)
  four = _upscaler(cfg, model, params, **kw)(image)
  pmapped = _upscaler(cfg, model, params, use_pmap=True, **kw)(image)
  np.testing.assert_array_equal(four, one)
  np.testing.assert_array_equal(pmapped, one)
  # A batch size that is not a multiple of the devices is rounded up; the result is the same.
  odd = _upscaler(cfg, model, params, tile_size=20, batch_size=3)
  assert odd.batch_size == 4
  np.testing.assert_array_equal(odd(image), one)


def test_upscale_array_wrapper_and_progress():
  cfg, model, params = _model()
  image = _image(12, 30, 3)
  calls = []
  got = inference.upscale_array(params, cfg, image, tile_size=16, batch_size=2,
                                progress=lambda done, total: calls.append((done, total)))
  want = inference.upscale_whole(params, cfg, image, model=model)
  assert np.abs(got - want).max() <= TOL
  total = calls[-1][1]
  assert calls[-1] == (total, total) and total == 3 * 8
  assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_tta_equals_whole_tta():
  cfg, model, params = _model()
  image = _image(10, 15, 3)
  got = _upscaler(cfg, model, params, tile_size=16, batch_size=4)(image, tta=True)
  want = inference.upscale_whole(params, cfg, image, model=model, tta=True)
  plain = inference.upscale_whole(params, cfg, image, model=model)
  assert np.abs(got - want).max() <= TOL
  assert np.abs(got - plain).max() > 1e-3  # TTA does change the result


@pytest.mark.parametrize('channels', [1, 2, 4])
def test_other_channel_layouts_on_rgb_model(channels):
  cfg, model, params = _model()
  image = _image(9, 14, channels)
  got = _upscaler(cfg, model, params, tile_size=16, batch_size=4)(image)
  want = inference.upscale_whole(params, cfg, image, model=model)
  assert got.shape == (18, 28, channels)
  assert np.abs(got - want).max() <= TOL
  # Gray (and alpha) through an RGB model: luma of the model on three equal channels.
  if channels != 4:
    luma = _luma(_raw(cfg, model, params, np.repeat(image[..., :1], 3, -1)))
    assert np.abs(got[..., 0] - luma).max() <= TOL
  else:
    colour = np.clip(_raw(cfg, model, params, image[..., :3]), 0, 1)
    assert np.abs(got[..., :3] - colour).max() <= TOL
  if channels in (2, 4):
    alpha = _luma(_raw(cfg, model, params, np.repeat(image[..., -1:], 3, -1)))
    assert np.abs(got[..., -1] - alpha).max() <= TOL


@pytest.mark.parametrize('channels', [1, 3])
def test_y_model(channels):
  cfg, model, params = _model(channels=1, skip='bicubic')
  image = _image(11, 7, channels)
  up = _upscaler(cfg, model, params, tile_size=16, batch_size=4)
  assert up.margin(channels) == 6
  got = up(image)
  want = inference.upscale_whole(params, cfg, image, model=model)
  assert got.shape == (22, 14, channels)
  assert np.abs(got - want).max() <= TOL
  if channels == 3:  # chroma is the bicubic of CbCr: a gray image stays gray
    gray = up(np.repeat(image[..., :1], 3, -1))
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 1e-5


def test_scale_one_model_and_quantized_output():
  cfg, model, params = _model(scale=1)
  image = _image(13, 10, 3)
  up = _upscaler(cfg, model, params, tile_size=16, batch_size=4)
  got = up(image)
  assert got.shape == image.shape
  assert np.abs(got - inference.upscale_whole(params, cfg, image, model=model)).max() <= TOL
  q8 = up(image, out_dtype=np.uint8)
  assert q8.dtype == np.uint8
  assert np.abs(q8.astype(int) - inference.quantize(got, np.uint8)).max() <= 1
  q16 = up(image, out_dtype=np.uint16)
  assert q16.dtype == np.uint16
  assert np.abs(q16.astype(int) - inference.quantize(got, np.uint16)).max() <= 1


def test_fill_transparent():
  rng = np.random.default_rng(3)
  colour = rng.random((40, 30, 3), dtype=np.float32)
  alpha = np.zeros((40, 30), np.float32)
  alpha[10:20, 5:15] = 1.0
  alpha[30, 25] = 0.5
  filled = inference.fill_transparent(colour, alpha, iterations=3)
  visible = alpha > 0
  np.testing.assert_array_equal(filled[visible], colour[visible])
  # A hidden pixel next to one visible pixel takes its colour.
  np.testing.assert_allclose(filled[31, 26], colour[30, 25], atol=1e-6)
  # Pixels farther than `iterations` get the mean visible colour.
  np.testing.assert_allclose(filled[0, 29], colour[visible].mean(0), atol=1e-5)
  # Strips with halos give the same result as one strip.
  strips = inference.fill_transparent(colour, alpha, iterations=3, strip=7)
  np.testing.assert_allclose(strips, filled, atol=1e-6)
  assert inference.fill_transparent(colour, np.ones((40, 30))) is colour
  # Nearly transparent pixels (1/255: their colour barely shows) are filled too; it had bled.
  faint = np.where(alpha > 0, alpha, 1 / 255).astype(np.float32)
  np.testing.assert_allclose(inference.fill_transparent(colour, faint, iterations=3), filled,
                             atol=1e-6)


def test_upscale_image_alpha_paths():
  cfg, model, params = _model()
  up = _upscaler(cfg, model, params, tile_size=16, batch_size=4)
  rgba = _image(9, 11, 4)
  rgba[..., 3] = 0.75
  out = inference.upscale_image(up, rgba)
  assert out.shape == (18, 22, 4)
  np.testing.assert_array_equal(out[..., 3], 0.75)  # constant alpha: not run through the model
  np.testing.assert_allclose(out[..., :3], up(rgba[..., :3]), atol=TOL)
  rgba[2:5, 2:5, 3] = 0.0
  rgba[2:5, 2:5, :3] = 1.0  # hidden white: must not leak into the visible result
  out = inference.upscale_image(up, rgba, out_dtype=np.uint8)
  assert out.dtype == np.uint8 and out.shape == (18, 22, 4)
  filled = inference.fill_transparent(rgba[..., :3], rgba[..., 3], iterations=up.margin(4) + 2)
  want = inference.upscale_whole(params, cfg, np.concatenate([filled, rgba[..., 3:]], -1),
                                 model=model)
  assert np.abs(out.astype(int) - inference.quantize(want, np.uint8)).max() <= 1
  # Alpha through another model of the scale (the shipped one without denoising): colour from
  # this one, alpha from that one, progress over both runs.
  cfg_b, model_b, params_b = _model(seed=5)
  filled = inference.fill_transparent(rgba[..., :3], rgba[..., 3], iterations=up.margin(4) + 2)
  up_b = _upscaler(cfg_b, model_b, params_b, tile_size=16, batch_size=4)
  seen = []
  out = inference.upscale_image(up, rgba, alpha_upscaler=up_b,
                                progress=lambda done, total: seen.append((done, total)))
  np.testing.assert_allclose(out[..., :3], up(filled), atol=TOL)
  np.testing.assert_allclose(out[..., 3], up_b(rgba[..., 3:])[..., 0], atol=TOL)
  assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
  # Scale 1: alpha is kept as it is.
  cfg1, model1, params1 = _model(scale=1)
  up1 = _upscaler(cfg1, model1, params1, tile_size=16, batch_size=4)
  la = _image(6, 5, 2)
  out = inference.upscale_image(up1, la)
  np.testing.assert_array_equal(out[..., 1], la[..., 1])


def test_tiles_run_the_unpadded_model_with_the_same_params():
  """The tiler runs its model with `valid=True` (no work on the margin past what the layers
  still need), keeping the padded one for reference; both give the same tiles."""
  cfg, model, params = _model()
  up = _upscaler(cfg, model, params, tile_size=32)
  assert up.model is model and not model.valid and up.tile_model.valid
  image = _image(40, 21, 3, seed=4)
  padded = _upscaler(cfg, model, params, tile_size=32)
  padded.tile_model = model
  np.testing.assert_allclose(up(image), padded(image), rtol=0, atol=TOL)


def test_input_and_output_dtypes_and_non_finite_pixels():
  """Integer arrays are read over their range, NaN as 0 and infinities clipped (the output stays
  finite, as the clean image's with that pixel at 0 or 1), float outputs of any width."""
  cfg, model, params = _model()
  image = _image(14, 11, 3)
  up = _upscaler(cfg, model, params, tile_size=16, batch_size=2)
  want = up(image)
  as_uint8 = np.round(image * 255).astype(np.uint8)
  np.testing.assert_allclose(up(as_uint8), up(as_uint8.astype(np.float32) / 255), atol=1e-6)
  bad = image.copy()
  bad[5, 5, 0], bad[2, 7, 1], bad[9, 3, 2] = np.nan, np.inf, -np.inf
  clean = image.copy()
  clean[5, 5, 0], clean[2, 7, 1], clean[9, 3, 2] = 0.0, 1.0, 0.0
  got = up(bad)
  assert np.isfinite(got).all() and np.abs(got - up(clean)).max() <= TOL
  assert np.isnan(bad[5, 5, 0])  # the caller's array is left as it was
  assert up(image, out_dtype=np.float64).dtype == np.float64
  np.testing.assert_allclose(up(image, out_dtype=np.float16), want, atol=1e-3)
  for dtype in (np.complex64, np.int8, np.int32):
    with pytest.raises(ValueError, match=f'out_dtype {np.dtype(dtype)}: must be a float or unsigned'):
      up(image, out_dtype=dtype)
  for bad_arg in (dict(batch_size=-1), dict(batch_size=0), dict(tile_size=0)):
    with pytest.raises(ValueError, match=f'{next(iter(bad_arg))}=.*: must be a positive integer'):
      inference.Upscaler(params, cfg, model=model, **bad_arg)
  with pytest.raises(ValueError, match='expected a float or unsigned integer image'):
    up(image.astype(np.complex64))
  with pytest.raises(ValueError, match='image dtype int16: signed integers'):
    up(as_uint8.astype(np.int16))
