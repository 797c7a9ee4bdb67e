"""Models: param counts (hand formulas), shapes, pixel shuffle, selection unit, skip, margin, flops."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import dcscn, dcscn_compact, dcscn_paper, espcn_su
from configs import test as test_config
from w2x_jax import models

SEED_FILTERS = [196, 172, 152, 134, 118, 103, 91, 80, 70, 62, 55, 48]
COMPACT_FILTERS = [32, 26, 22, 18, 14, 11, 8]  # int(24 * (1 - (i/6)^(1/1.2)) + 8)
PAPER_FILTERS = [196, 166, 148, 133, 120, 108, 97, 86, 76, 66, 57, 48]  # int(148 * (1 - (i/11)^(1/1.5)) + 48)


def _cfg(module, scale=2, **overrides):
  cfg = module.get_config(f'scale={scale}').model
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _tiny_espcn(scale=2, **overrides):
  overrides = {'filters': (4, 6, 5), **overrides}
  return _cfg(espcn_su, scale, **overrides)


def _shapes(cfg, side=12):
  model = models.build_model(cfg)
  x = jax.ShapeDtypeStruct((1, side, side, cfg.channels), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  return params, jax.eval_shape(model.apply, {'params': params}, x)


def _init(cfg, side, seed=0):
  model = models.build_model(cfg)
  x = jnp.zeros((1, side, side, cfg.channels), jnp.float32)
  return model, jax.jit(model.init)(jax.random.key(seed), x)['params']


def dcscn_count(filters, channels, scale, a, b1, b2, up, final_bias, prelu):
  """DCSCN params by hand: conv k*k*cin*cout + cout (bias), PReLU one alpha per channel."""
  n, cin = 0, channels
  for f in filters:
    n += 9 * cin * f + f
    cin = f
  t = sum(filters)
  n += t * a + a + t * b1 + b1 + 9 * b1 * b2 + b2
  n += 9 * (a + b2) * up * scale ** 2 + up * scale ** 2
  n += 9 * up * channels + (channels if final_bias else 0)
  if prelu:
    n += t + a + b1 + b2 + up
  return n


def espcn_count(filters, channels, scale):
  n, cin = 0, channels
  for f in filters:
    n += 9 * cin * f + f + f * f + f  # conv3x3 and the selection unit's conv1x1
    cin = f
  return n + 9 * cin * channels * scale ** 2 + channels * scale ** 2


def test_feature_filters():
  assert models.feature_filters(_cfg(dcscn)) == SEED_FILTERS
  assert models.feature_filters(_cfg(dcscn_compact)) == COMPACT_FILTERS
  assert models.feature_filters(_cfg(dcscn_paper)) == PAPER_FILTERS
  assert models.feature_filters(_cfg(dcscn, layers=1)) == [196]


def test_param_counts_of_presets():
  params, _ = _shapes(_cfg(dcscn))
  assert models.count_params(params) == 1_889_974
  assert dcscn_count(SEED_FILTERS, 3, 2, 128, 64, 128, 32, False, False) == 1_889_974
  params, _ = _shapes(_cfg(dcscn_compact))
  assert models.count_params(params) == dcscn_count(COMPACT_FILTERS, 1, 2, 24, 8, 8, 8, False, True)
  params, _ = _shapes(_cfg(dcscn_paper))
  assert models.count_params(params) == dcscn_count(PAPER_FILTERS, 1, 2, 64, 32, 32, 32, False, True)
  params, _ = _shapes(_cfg(espcn_su))
  assert models.count_params(params) == espcn_count([64, 64, 128, 128, 256, 256], 3, 2) == 1_345_996


@pytest.mark.parametrize('scale', [1, 3])
def test_param_counts_variants(scale):
  cfg = _cfg(test_config, scale, channels=1, final_bias=True, activation='prelu')
  params, _ = _shapes(cfg)
  assert models.count_params(params) == dcscn_count([8, 6, 4], 1, scale, 8, 4, 4, 4, True, True)
  assert params['feature_0_act']['alpha'].shape == (8,)  # PReLU: one alpha per channel
  assert params['upsampler_act']['alpha'].shape == (4,)  # after the shuffle
  params, _ = _shapes(_tiny_espcn(scale, channels=1))
  assert models.count_params(params) == espcn_count([4, 6, 5], 1, scale)


@pytest.mark.parametrize('scale', [1, 2, 3, 4])
@pytest.mark.parametrize('channels', [1, 3])
def test_output_shapes(scale, channels):
  for cfg in (_cfg(test_config, scale, channels=channels),
              _tiny_espcn(scale, channels=channels, skip_interpolation='bicubic')):
    _, y = _shapes(cfg, side=5)
    assert y.shape == (1, 5 * scale, 5 * scale, channels)
    assert y.dtype == jnp.float32


def _depth_to_space_reference(x, s):
  n, h, w, cs = x.shape
  c = cs // (s * s)
  out = np.zeros((n, h * s, w * s, c), x.dtype)
  for i in range(h):
    for j in range(w):
      for ch in range(c):
        for dy in range(s):
          for dx in range(s):
            out[:, i * s + dy, j * s + dx, ch] = x[:, i, j, ch * s * s + dy * s + dx]
  return out


def _depth_to_space_jnp(x, s):
  n, h, w, cs = x.shape
  return x.reshape(n, h, w, cs // (s * s), s, s).transpose(0, 1, 4, 2, 5, 3).reshape(n, h * s, w * s, -1)


@pytest.mark.parametrize('scale', [1, 2, 3])
def test_pixel_shuffle_matches_reference(scale):
  x = np.random.default_rng(scale).random((2, 3, 4, 2 * scale * scale)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(models.pixel_shuffle(jnp.asarray(x), scale)),
                                _depth_to_space_reference(x, scale))
  with pytest.raises(ValueError, match='divisible'):
    models.pixel_shuffle(jnp.zeros((1, 2, 2, 5)), 2)
  # Its input is materialized before the transpose (forward pass only); derivatives unchanged.
  shuffle = lambda v: models.pixel_shuffle(v, scale)
  assert 'optimization_barrier' in jax.jit(shuffle).lower(jnp.asarray(x)).as_text()
  t = np.random.default_rng(9).random(x.shape).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jvp(shuffle, (x,), (t,))[1]),
                                _depth_to_space_reference(t, scale))
  g = np.random.default_rng(8).random(_depth_to_space_reference(x, scale).shape).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.vjp(shuffle, x)[1](g)[0]),
                                np.asarray(jax.vjp(lambda v: _depth_to_space_jnp(v, scale), x)[1](g)[0]))


def _torch_bilinear_reference(x, s):
  """PyTorch's F.interpolate(mode='bilinear', align_corners=False) for an upscale, in numpy."""
  def axis(n):
    src = np.maximum((np.arange(n * s) + 0.5) / s - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, src - i0
  y0, y1, fy = axis(x.shape[1])
  x0, x1, fx = axis(x.shape[2])
  fy, fx = fy[None, :, None, None], fx[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
  bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
  return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_skip_interpolation(scale):
  x = np.random.default_rng(0).random((1, 7, 6, 2)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(models.upsample(jnp.asarray(x), scale, 'bilinear')),
                             _torch_bilinear_reference(x, scale), atol=1e-6)
  # Bicubic is Pillow's (a = -0.5) away from the two outermost LR pixels (edge replication there).
  cubic = np.asarray(models.upsample(jnp.asarray(x), scale, 'bicubic'))[0, :, :, 0]
  pil = np.asarray(Image.fromarray(x[0, :, :, 0], mode='F').resize(
      (6 * scale, 7 * scale), Image.Resampling.BICUBIC))
  b = 2 * scale
  np.testing.assert_allclose(cubic[b:-b, b:-b], pil[b:-b, b:-b], atol=1e-5)
  # A constant image stays constant (edge replication keeps the weights summing to 1).
  ones = models.upsample(jnp.ones((1, 3, 3, 1)), scale, 'bicubic')
  np.testing.assert_allclose(np.asarray(ones), 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(models.upsample(jnp.asarray(x), 1, 'bicubic')), x)


def test_dcscn_is_residual_over_bilinear():
  cfg = _cfg(test_config, 2)
  model, params = _init(cfg, 6)
  x = jnp.asarray(np.random.default_rng(1).random((1, 6, 6, 3)), jnp.float32)
  params = {**params, 'final': {'kernel': jnp.zeros_like(params['final']['kernel'])}}
  y = jax.jit(model.apply)({'params': params}, x)
  np.testing.assert_allclose(np.asarray(y), _torch_bilinear_reference(np.asarray(x), 2), atol=1e-6)


def test_selection_unit_math():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
  w = rng.normal(size=(5, 5)).astype(np.float32)
  b = rng.normal(size=(5,)).astype(np.float32)
  params = {'conv': {'kernel': w.reshape(1, 1, 5, 5), 'bias': b}}
  gate = 1 / (1 + np.exp(-(np.maximum(h, 0) @ w + b)))
  unit = models.SelectionUnit('relu', multiply=True)
  np.testing.assert_allclose(np.asarray(unit.apply({'params': params}, h)), h * gate,
                             rtol=1e-5, atol=1e-6)
  unit = models.SelectionUnit('relu', multiply=False)  # the seed's variant: the gate alone
  np.testing.assert_allclose(np.asarray(unit.apply({'params': params}, h)), gate,
                             rtol=1e-5, atol=1e-6)
  unit = models.SelectionUnit('none', multiply=True)
  gate = 1 / (1 + np.exp(-(h @ w + b)))
  np.testing.assert_allclose(np.asarray(unit.apply({'params': params}, h)), h * gate,
                             rtol=1e-5, atol=1e-6)


def _changed_lr_extent(cfg, side, centre, seed=0):
  """(min, max) LR row and column of the output pixels that a one-pixel input change moves."""
  model, params = _init(cfg, side, seed)
  rng = np.random.default_rng(seed)
  x = rng.random((1, side, side, cfg.channels)).astype(np.float32)
  x2 = x.copy()
  x2[0, centre, centre, :] += 0.5
  apply = jax.jit(model.apply)
  diff = np.abs(np.asarray(apply({'params': params}, x2)) - np.asarray(apply({'params': params}, x)))
  rows, cols = np.nonzero(diff[0].max(axis=-1) > 0)
  s = cfg.scale
  return (rows.min() // s, rows.max() // s), (cols.min() // s, cols.max() // s)


@pytest.mark.parametrize('cfg,expected', [
    (_cfg(test_config, 2), 6),
    (_cfg(test_config, 1, skip_interpolation='bicubic', activation='prelu'), 6),
    (_tiny_espcn(3), 4),
    (_tiny_espcn(2, filters=(), skip_interpolation='bicubic'), 2),  # the skip dominates
    (_tiny_espcn(3, filters=(), skip_interpolation='bilinear'), 1),
])
def test_receptive_margin_is_exact(cfg, expected):
  margin = models.receptive_margin(cfg)
  assert margin == expected
  side = 2 * margin + 5
  centre = side // 2
  rows, cols = _changed_lr_extent(cfg, side, centre)
  # Nothing changes beyond the margin, and something changes at it (the margin is tight).
  assert rows == (centre - margin, centre + margin)
  assert cols == (centre - margin, centre + margin)


def test_receptive_margin_of_presets():
  assert models.receptive_margin(_cfg(dcscn)) == 15
  assert models.receptive_margin(_cfg(dcscn_compact)) == 10
  assert models.receptive_margin(_cfg(espcn_su)) == 7


@pytest.mark.parametrize('scale', [1, 2, 3])
def test_flops_per_output_pixel(scale):
  # Independent count from the params: LR kernels' MACs / s^2, plus DCSCN's HR 'final' conv.
  for cfg, hr_layer in ((_cfg(test_config, scale), 'final'), (_tiny_espcn(scale), None)):
    params, _ = _shapes(cfg)
    lr = sum(int(np.prod(p['kernel'].shape)) for name, p in params.items()
             if 'kernel' in p and name != hr_layer)
    lr += sum(int(np.prod(p['conv']['kernel'].shape)) for p in params.values() if 'conv' in p)
    hr = int(np.prod(params[hr_layer]['kernel'].shape)) if hr_layer else 0
    assert models.flops_per_output_pixel(cfg) == pytest.approx(2 * (lr / scale ** 2 + hr))


def test_conv_fn_routes_every_conv():
  calls = []

  def counting_conv(x, kernel):
    calls.append(kernel.shape)
    return models.conv2d(x, kernel)

  for cfg in (_cfg(test_config, 2), _tiny_espcn(2)):
    calls.clear()
    model = models.build_model(cfg, conv_fn=counting_conv)
    x = jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
    kernels = [l.shape for l in jax.tree_util.tree_leaves(params) if l.ndim == 4]
    if cfg.name == 'dcscn' and cfg.upsampler_filters <= models.FINAL_BEFORE_SHUFFLE_MAX:
      k = params['final']['kernel'].shape  # run before the shuffle, as its subpixel kernel
      kernels[kernels.index(k)] = k[:2] + (k[2] * 4, k[3] * 4)
    if cfg.name == 'dcscn' and model.recon_from_parts:  # one 1x1 conv per feature layer
      kernels.remove(params['recon_a']['kernel'].shape)
      kernels.remove(params['recon_b1']['kernel'].shape)
      kernels += [(1, 1, f, cfg.recon_a + cfg.recon_b1) for f in models.feature_filters(cfg)]
    assert sorted(calls) == sorted(kernels)


def test_bfloat16_compute():
  cfg = _cfg(test_config, 2)
  model, params = _init(cfg, 6)
  x = jnp.asarray(np.random.default_rng(3).random((1, 6, 6, 3)), jnp.float32)
  y32 = model.apply({'params': params}, x)
  cfg.dtype = 'bfloat16'
  y16 = jax.jit(models.build_model(cfg).apply)({'params': params}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.05)


@pytest.mark.parametrize('field,value', [
    ('name', 'srcnn'), ('activation', 'gelu'), ('skip_interpolation', 'nearest')])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    models.build_model(_cfg(test_config, 2, **{field: value}))


def test_bad_espcn_and_decay_raise():
  with pytest.raises(ValueError, match='selection_activation'):
    models.build_model(_tiny_espcn(2, selection_activation='tanh'))
  with pytest.raises(ValueError, match='filter_decay'):
    models.feature_filters(_cfg(dcscn, filter_decay='linear'))


def test_plain_config_dict_works():
  cfg = ml_collections.ConfigDict(dict(
      name='espcn_su', scale=2, channels=3, filters=(4,), activation='relu',
      selection_activation='relu', selection_multiply=False, skip_interpolation='none'))
  _, y = _shapes(cfg, side=4)
  assert y.shape == (1, 8, 8, 3)


def test_activations():
  x = jnp.asarray([[-2.0, -1.0, 3.0]])
  alpha = jnp.asarray([0.1, 0.2, 0.3])
  y = models.Activation('prelu').apply({'params': {'alpha': alpha}}, x)
  np.testing.assert_allclose(np.asarray(y), [[-0.2, -0.2, 3.0]], rtol=1e-6)
  y = models.Activation('leaky_relu').apply({}, x)
  np.testing.assert_allclose(np.asarray(y), [[-0.2, -0.1, 3.0]], rtol=1e-6)
  y = models.Activation('selu').apply({}, x)
  np.testing.assert_allclose(np.asarray(y)[0, 2], 1.0507009873554805 * 3.0, rtol=1e-6)


@pytest.mark.parametrize('scale', [1, 2, 3])
def test_subpixel_kernel_equals_conv_after_shuffle(scale):
  rng = np.random.default_rng(scale)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 3 * scale * scale)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32)
  want = models.conv2d(models.pixel_shuffle(x, scale), kernel)  # zero padding at HR edges too
  got = models.pixel_shuffle(models.conv2d(x, models.subpixel_kernel(kernel, scale)), scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _assert_same_values_and_grads(model, other, params, x, value_atol):
  """Two variants of one model give the same values and gradients at perturbed `params`
  (`value_atol` None: 1e-5 of the largest output)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape),
                                  params)
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)
  want = np.asarray(other.apply({'params': params}, x))
  atol = 1e-5 * np.abs(want).max() if value_atol is None else value_atol
  np.testing.assert_allclose(np.asarray(model.apply({'params': params}, x)), want, atol=atol)
  for g, h in zip(jax.tree_util.tree_leaves(jax.grad(loss(model))(params)),
                  jax.tree_util.tree_leaves(jax.grad(loss(other))(params))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(h).max()))


@pytest.mark.parametrize('scale', [2, 3])
def test_dcscn_final_conv_before_the_shuffle_is_the_same_model(scale):
  """Few upsampler filters (the compact model's 8): the HR conv runs before the shuffle, with the
  same params, values and gradients (PReLU's alphas stay one per shuffled channel)."""
  cfg = _cfg(dcscn_compact, scale, final_bias=True)
  assert cfg.upsampler_filters <= models.FINAL_BEFORE_SHUFFLE_MAX < _cfg(dcscn).upsampler_filters
  model = models.build_model(cfg)
  hr_model = model.clone(final_before_shuffle=False)
  x = jnp.asarray(np.random.default_rng(0).random((2, 9, 11, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert (jax.tree_util.tree_map(jnp.shape, params)
          == jax.tree_util.tree_map(jnp.shape, hr_model.init(jax.random.PRNGKey(0), x)['params']))
  assert params['upsampler_act']['alpha'].shape == (8,) and params['final']['kernel'].shape == (3, 3, 8, 1)
  _assert_same_values_and_grads(model, hr_model, params, x, value_atol=1e-5)


@pytest.mark.parametrize('conv_name', ['xla', 'auto'])
def test_dcscn_reconstruction_from_parts_is_the_same_model(conv_name):
  """recon_a and recon_b1 computed as a sum over the feature layers (no concatenated tensor): the
  same params (and their fresh init), values and gradients as the 1x1 convs of the concatenation."""
  cfg = _cfg(dcscn_compact, 2, conv=conv_name)
  model = models.build_model(cfg)
  assert model.recon_from_parts == (jax.default_backend() == 'cpu')  # 131 channels
  model = model.clone(recon_from_parts=True)
  assert models.recon_from_parts(models.feature_filters(cfg), backend='cpu')
  assert not models.recon_from_parts(models.feature_filters(_cfg(dcscn)), backend='cpu')  # 1281
  assert not models.recon_from_parts(models.feature_filters(cfg), backend='gpu')
  concat_model = model.clone(recon_from_parts=False)
  x = jnp.asarray(np.random.default_rng(0).random((2, 9, 11, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  concat_params = concat_model.init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(concat_params)
  for p, q in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(concat_params)):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
  assert params['recon_a']['kernel'].shape == (1, 1, sum(models.feature_filters(cfg)), cfg.recon_a)
  _assert_same_values_and_grads(model, concat_model, params, x, value_atol=None)


@pytest.mark.parametrize('from_parts', [True, False])
def test_dcscn_reconstruction_is_recon_a_and_recon_b1_of_the_concatenation(from_parts):
  """Either path's one product with both kernels gives recon_a and recon_b1 as the two 1x1 convs
  of the concatenated features (each kernel's columns go to its own output)."""
  cfg = _cfg(dcscn_compact, 2, conv='xla', activation='selu')  # no params in the activations
  model = models.build_model(cfg).clone(recon_from_parts=from_parts)
  x = jnp.asarray(np.random.default_rng(1).random((2, 7, 6, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # nonzero biases
  _, state = model.apply({'params': params}, x, capture_intermediates=True)
  got = {k: v['__call__'][0] for k, v in state['intermediates'].items() if k != '__call__'}
  features = jnp.concatenate([got[f'feature_{i}_act'] for i in range(len(models.feature_filters(cfg)))], -1)
  for name in ('recon_a', 'recon_b1'):
    want = jax.nn.selu(features @ params[name]['kernel'][0, 0] + params[name]['bias'])
    np.testing.assert_allclose(np.asarray(got[f'{name}_act']), np.asarray(want), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('make_cfg,shape', [
    (lambda: _cfg(dcscn), (1, 34, 37)),  # the seed's: Winograd layers, HR conv after the shuffle
    (lambda: _cfg(dcscn_compact, final_bias=True), (2, 24, 23)),  # HR conv before the shuffle
    (lambda: _cfg(dcscn_compact, 3), (1, 25, 25)),
    (lambda: _cfg(dcscn_compact, 1), (1, 24, 22)),  # a denoiser (scale 1)
    (lambda: _cfg(espcn_su, skip_interpolation='bicubic'), (1, 18, 20)),
    (lambda: _tiny_espcn(2, filters=(), skip_interpolation='bicubic'), (1, 6, 7)),  # skip > body
])
def test_valid_model_is_the_centre_of_the_same_model(make_cfg, shape):
  """`valid=True` (tiles): the same params; the output is the padded model's centre, all but the
  receptive margin, where zero padding cannot reach."""
  cfg = make_cfg()
  model, valid = models.build_model(cfg), models.build_model(cfg, valid=True)
  x = jnp.asarray(np.random.default_rng(0).random(shape + (cfg.channels,)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert (jax.tree_util.tree_map(jnp.shape, params)
          == jax.tree_util.tree_map(jnp.shape, valid.init(jax.random.PRNGKey(0), x)['params']))
  params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # nonzero biases reach the edges
  m, s = models.receptive_margin(cfg), cfg.scale
  want = model.apply({'params': params}, x)[:, s * m:s * (shape[1] - m), s * m:s * (shape[2] - m)]
  got = valid.apply({'params': params}, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                             atol=2e-5 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match='valid=True needs inputs over'):
    valid.apply({'params': params}, x[:, :2 * m, :2 * m])
