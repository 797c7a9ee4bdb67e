"""Convolutions: every implementation equals lax.conv_general_dilated and its jax.grad."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import espcn_su
from configs import test as test_config
from w2x_jax import conv
from w2x_jax import models

IMPLS = ('xla', 'matmul', 'winograd')


def _tolerances(impl, want):
  """(rtol, atol): Winograd F(4x4, 3x3) rounds differently, ~1e-5 of the largest magnitude."""
  if impl == 'winograd':
    return 1e-4, 3e-5 * float(np.max(np.abs(want)))
  return 1e-5, 1e-4


@pytest.fixture(params=['xla_dk', 'matmul_dk_per_sample', 'matmul_dk_one_product'])
def kernel_grad_path(request, monkeypatch):
  """Runs a test with each kernel-gradient route of the 'matmul' conv (chosen per channel count),
  the matmul route with a product per sample and with one product over the whole batch."""
  monkeypatch.setattr(conv, '_xla_kernel_grad_is_faster',
                      lambda cin, cout: request.param == 'xla_dk')
  monkeypatch.setattr(conv, '_MATMUL_CHUNK_ROWS', 1 if request.param.endswith('sample') else 10 ** 9)
  return request.param


@pytest.fixture(params=['winograd_forward', 'xla_forward'])
def winograd_forward(request, monkeypatch):
  """Runs a Winograd test with its inference forward pass computed both ways (chosen per channel
  count)."""
  monkeypatch.setattr(conv, 'WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT',
                      0 if request.param == 'winograd_forward' else 10 ** 9)
  return request.param


def _reference(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _data(x_shape, k_shape, dtype=jnp.float32, seed=0):
  kx, kk, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, x_shape, dtype)
  kernel = jax.random.normal(kk, k_shape, dtype)
  out_shape = x_shape[:3] + (k_shape[3],)
  cot = jax.random.normal(kc, out_shape, dtype)  # a generic cotangent
  return x, kernel, cot


def _value_and_grads(fn, x, kernel, cot):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y,) + vjp(cot)


# (x shape, kernel shape): 3x3 and 1x1, odd sizes, Cin < Cout and Cin > Cout (both dkernel paths),
# a non-square image, one sample, and a 5x5 / even kernel (SAME pads more after than before).
SHAPES = [
    ((2, 7, 5, 3), (3, 3, 3, 4)),
    ((2, 5, 7, 6), (3, 3, 6, 4)),
    ((1, 9, 9, 5), (3, 3, 5, 5)),
    ((3, 5, 3, 4), (1, 1, 4, 6)),
    ((2, 6, 5, 7), (1, 1, 7, 2)),
    ((1, 7, 6, 3), (5, 5, 3, 2)),
    ((2, 6, 7, 2), (2, 2, 2, 3)),
]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('x_shape,k_shape', SHAPES)
def test_values_and_grads_match_lax(impl, x_shape, k_shape, kernel_grad_path):
  if impl != 'matmul' and kernel_grad_path != 'xla_dk':
    pytest.skip('the route only concerns the matmul conv')
  fn = conv.get_conv_fn(impl)
  x, kernel, cot = _data(x_shape, k_shape)
  want = _value_and_grads(_reference, x, kernel, cot)
  got = jax.jit(lambda x, k, c: _value_and_grads(fn, x, k, c))(x, kernel, cot)
  for name, g, w in zip(('y', 'dx', 'dkernel'), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    rtol, atol = _tolerances(impl, w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize('x_shape', [(1, 1, 1, 3), (2, 4, 4, 3), (1, 8, 12, 3), (1, 11, 3, 3),
                                     (1, 17, 14, 3)])
def test_winograd_tiles_any_size(x_shape, winograd_forward):
  """Images smaller than, equal to, and between multiples of the 4x4 output tile (the padding
  of the last tiles must not leak into the output or the gradients)."""
  x, kernel, cot = _data(x_shape, (3, 3, 3, 5), seed=8)
  want = _value_and_grads(_reference, x, kernel, cot)
  got = jax.jit(lambda x, k, c: _value_and_grads(conv.conv2d_winograd, x, k, c))(x, kernel, cot)
  got += (jax.jit(conv.conv2d_winograd)(x, kernel),)  # inference: no gradient
  for name, g, w in zip(('y', 'dx', 'dkernel', 'y without gradient'), got, want + want[:1]):
    rtol, atol = _tolerances('winograd', w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize('impl', IMPLS)
def test_grad_of_scalar_loss_and_second_use(impl, kernel_grad_path):
  """jax.grad through a conv used twice (its input also feeds another op), as in the models."""
  if impl != 'matmul' and kernel_grad_path != 'xla_dk':
    pytest.skip('the route only concerns the matmul conv')
  fn = conv.get_conv_fn(impl)
  x, kernel, _ = _data((2, 5, 6, 4), (3, 3, 4, 4), seed=1)

  def loss(c):
    return lambda x, k: jnp.sum(jnp.tanh(c(jnp.sin(x), k)) * x[..., :1] + c(c(x, k), k) ** 2)

  want = jax.grad(loss(_reference), (0, 1))(x, kernel)
  got = jax.jit(jax.grad(loss(fn), (0, 1)))(x, kernel)
  for g, w in zip(got, want):
    rtol, atol = _tolerances(impl, w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=max(atol, 1e-3))


@pytest.mark.parametrize('impl', ('matmul', 'winograd'))
def test_vmap_over_batch(impl, kernel_grad_path):
  if impl == 'winograd' and kernel_grad_path != 'xla_dk':
    pytest.skip('the route only concerns the matmul conv')
  fn = conv.get_conv_fn(impl)
  x, kernel, _ = _data((3, 2, 5, 5, 3), (3, 3, 3, 4), seed=2)
  cot = jax.random.normal(jax.random.key(7), (3, 2, 5, 5, 4))
  per = jax.vmap(lambda x, c: _value_and_grads(fn, x, kernel, c))(x, cot)
  ref = jax.vmap(lambda x, c: _value_and_grads(_reference, x, kernel, c))(x, cot)
  for g, w in zip(per, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), *_tolerances(impl, w))


@pytest.mark.parametrize('impl', ('matmul', 'winograd'))
def test_bfloat16_inputs(impl, kernel_grad_path):
  if impl == 'winograd' and kernel_grad_path != 'xla_dk':
    pytest.skip('the route only concerns the matmul conv')
  fn = conv.get_conv_fn(impl)
  x, kernel, cot = _data((2, 6, 5, 8), (3, 3, 8, 6), jnp.bfloat16, seed=3)
  got = jax.jit(lambda x, k, c: _value_and_grads(fn, x, k, c))(x, kernel, cot)
  want = _value_and_grads(_reference, x.astype(jnp.float32), kernel.astype(jnp.float32),
                          cot.astype(jnp.float32))
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.02 * scale)


@pytest.mark.parametrize('impl', ('matmul', 'winograd'))
def test_data_parallel_sharding(impl, kernel_grad_path):
  """The batch sharded over every device (conftest: 4 CPU devices) gives the same gradients."""
  if impl == 'winograd' and kernel_grad_path != 'xla_dk':
    pytest.skip('the route only concerns the matmul conv')
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  fn = conv.get_conv_fn(impl)
  x, kernel, cot = _data((2 * len(devices), 5, 6, 3), (3, 3, 3, 5), seed=4)
  x = jax.device_put(x, NamedSharding(mesh, P('data')))
  cot = jax.device_put(cot, NamedSharding(mesh, P('data')))
  kernel = jax.device_put(kernel, NamedSharding(mesh, P()))
  got = jax.jit(lambda x, k, c: _value_and_grads(fn, x, k, c))(x, kernel, cot)
  want = _value_and_grads(_reference, *(np.asarray(a) for a in (x, kernel, cot)))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), *_tolerances(impl, w))


def test_kernel_grad_route_by_channels():
  xla_is_faster = conv._xla_kernel_grad_is_faster  # pylint: disable=protected-access
  for cin, cout in [(8, 8), (14, 11), (18, 14), (16, 32), (8, 64), (64, 64)]:
    assert xla_is_faster(cin, cout), (cin, cout)
  # the compact DCSCN's wider layers, the seed DCSCN's first, an HR conv, wide layers
  for cin, cout in [(32, 26), (26, 22), (22, 18), (3, 196), (32, 3), (62, 55), (152, 134),
                    (256, 128)]:
    assert not xla_is_faster(cin, cout), (cin, cout)


def test_winograd_forward_route_by_channels(monkeypatch):
  """Inference runs Winograd's forward pass with many channels and XLA's below; training (under
  a gradient) always Winograd's."""
  calls = []
  real_forward = conv._winograd_forward  # pylint: disable=protected-access
  monkeypatch.setattr(conv, '_winograd_forward',
                      lambda x, k: calls.append(k.shape) or real_forward(x, k))
  for cin, cout in ((128, 96), (32, 32), (128, 32)):
    x, kernel, cot = _data((1, 4, 4, cin), (3, 3, cin, cout))
    conv.conv2d_winograd(x, kernel)
  assert calls == [(3, 3, 128, 96)]
  calls.clear()
  jax.vjp(conv.conv2d_winograd, x, kernel)[1](cot)
  assert calls == [(3, 3, 128, 32)]


def test_winograd_rejects_mixed_dtypes():
  with pytest.raises(TypeError, match='one dtype'):
    conv.conv2d_winograd(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2), jnp.bfloat16))


def test_winograd_route_by_channels_and_dtype():
  assert conv.winograd_is_faster((3, 3, 196, 172), jnp.float32)
  assert conv.winograd_is_faster((3, 3, 32, 32), jnp.float32)
  assert not conv.winograd_is_faster((3, 3, 3, 196), jnp.float32)  # the first layer
  assert not conv.winograd_is_faster((3, 3, 256, 12), jnp.float32)  # ESPCN-SU's upsampler
  assert not conv.winograd_is_faster((1, 1, 196, 172), jnp.float32)
  assert not conv.winograd_is_faster((3, 3, 196, 172), jnp.bfloat16)


def test_cpu_conv_picks_per_layer(monkeypatch):
  """conv2d_cpu: Winograd where winograd_is_faster, the matmul conv elsewhere."""
  calls = []
  monkeypatch.setattr(conv, 'conv2d_winograd', lambda x, k: calls.append('winograd') or x)
  monkeypatch.setattr(conv, 'conv2d_matmul_vjp', lambda x, k: calls.append('matmul') or x)
  conv.conv2d_cpu(jnp.zeros((1, 4, 4, 32)), jnp.zeros((3, 3, 32, 32)))
  conv.conv2d_cpu(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 32)))
  conv.conv2d_cpu(jnp.zeros((1, 4, 4, 32), jnp.bfloat16), jnp.zeros((3, 3, 32, 32), jnp.bfloat16))
  assert calls == ['winograd', 'matmul', 'matmul']


def test_get_conv_fn_names():
  assert conv.get_conv_fn('xla') is conv.conv2d_xla
  assert conv.get_conv_fn('matmul') is conv.conv2d_matmul_vjp
  assert conv.get_conv_fn('winograd') is conv.conv2d_winograd
  assert conv.get_conv_fn('auto', backend='cpu') is conv.conv2d_cpu
  assert conv.get_conv_fn('auto', backend='gpu') is conv.conv2d_xla
  with pytest.raises(ValueError, match='conv.py'):
    conv.get_conv_fn('fft')


def _tiny_espcn():
  cfg = espcn_su.get_config('scale=2').model
  cfg.filters = (4, 6, 5)
  return cfg


@pytest.mark.parametrize('make_cfg', [lambda: test_config.get_config('scale=2').model, _tiny_espcn],
                         ids=['dcscn', 'espcn_su'])
def test_models_agree_across_convs(make_cfg, monkeypatch):
  cfg = make_cfg()
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.random((2, 7, 6, cfg.channels)), jnp.float32)
  target = jnp.asarray(rng.random((2, 14, 12, cfg.channels)), jnp.float32)
  shapes = jax.eval_shape(models.build_model(cfg).init, jax.random.key(0), x)['params']
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)

  def output_and_grads(impl):
    cfg.conv = impl
    model = models.build_model(cfg)

    def loss(p):
      y = model.apply({'params': p}, x)
      return jnp.mean(jnp.abs(y - target)), y

    grads, y = jax.jit(jax.grad(loss, has_aux=True))(params)
    return y, grads

  y0, g0 = output_and_grads('xla')
  for route in (True, False):  # both kernel-gradient routes of the matmul conv
    monkeypatch.setattr(conv, '_xla_kernel_grad_is_faster', lambda cin, cout, route=route: route)
    y1, g1 = output_and_grads('matmul')
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  y1, g1 = output_and_grads('winograd')
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_build_model_defaults_to_auto_and_rejects_unknown():
  cfg = test_config.get_config('scale=2').model
  if 'conv' in cfg:
    del cfg['conv']  # configs written before the field existed (exported models' config.json)
  model = models.build_model(cfg)
  assert model.conv_fn is conv.get_conv_fn('auto')
  cfg.conv = 'fft'
  with pytest.raises(ValueError, match='model.conv'):
    models.build_model(cfg)


def test_measure_matmul_gflops():
  assert conv.measure_matmul_gflops(n=128, repeats=2) > 0


def test_seed_dcscn_runs_its_wide_layers_as_winograd_on_cpu(monkeypatch):
  """configs/dcscn.py with model.conv='auto' on CPU: the 3x3 layers with >= 32 channels in and out
  (11 feature layers, reconstruction B's conv3x3, the upsampler) go through Winograd; the first
  layer (3 channels in), the final HR conv (3 out) and the reconstruction's 1x1 convs (one product
  for recon_a and recon_b1) through the matmul conv."""
  from configs import dcscn  # pylint: disable=g-import-not-at-top
  calls = []
  winograd, matmul = conv.conv2d_winograd, conv.conv2d_matmul_vjp
  monkeypatch.setattr(conv, 'conv2d_winograd', lambda x, k: calls.append('winograd') or winograd(x, k))
  monkeypatch.setattr(conv, 'conv2d_matmul_vjp', lambda x, k: calls.append('matmul') or matmul(x, k))
  cfg = dcscn.get_config('scale=2').model
  model = models.build_model(cfg, conv_fn=conv.get_conv_fn('auto', backend='cpu'))
  jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert calls.count('winograd') == 13 and calls.count('matmul') == 3, calls


def test_keep_freed_memory_on_cpu_only(monkeypatch):
  assert conv.runs_on_cpu_only() == (os.environ['JAX_PLATFORMS'] == 'cpu')  # conftest.py's default
  assert conv.runs_on_cpu_only('cpu') and not conv.runs_on_cpu_only('cuda,cpu')
  assert isinstance(conv.runs_on_cpu_only(''), bool)  # from the installed plugins
  calls = []
  monkeypatch.setattr(conv, 'keep_freed_memory', lambda: calls.append(1) or True)
  monkeypatch.setattr(conv, 'runs_on_cpu_only', lambda: True)
  assert conv.keep_freed_memory_on_cpu() and calls == [1]
  monkeypatch.setattr(conv, 'runs_on_cpu_only', lambda: False)
  assert not conv.keep_freed_memory_on_cpu() and calls == [1]


@pytest.mark.parametrize('x_shape', [(1, 3, 3, 8), (2, 6, 7, 8), (1, 13, 11, 8), (1, 17, 20, 8)])
@pytest.mark.parametrize('like', ['xla', 'winograd', 'auto'])
def test_conv2d_valid_matches_xla_valid(x_shape, like, monkeypatch):
  """The VALID convolution of tiled inference: Winograd's forward (tiles from the first pixel,
  the last ones padded) where the SAME convolution `like` would take it, else XLA's; both equal
  XLA's VALID convolution, any size down to one output pixel."""
  monkeypatch.setattr(conv, 'WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT', 0)
  monkeypatch.setattr(conv, '_WINO_MIN_CHANNELS', 8)
  calls = []
  real = conv._winograd_forward_valid  # pylint: disable=protected-access
  monkeypatch.setattr(conv, '_winograd_forward_valid', lambda x, k: calls.append(1) or real(x, k))
  x, kernel, _ = _data(x_shape, (3, 3, 8, 9), seed=3)
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = conv.conv2d_valid(x, kernel, conv.get_conv_fn(like, backend='cpu'))
  assert got.shape == (x_shape[0], x_shape[1] - 2, x_shape[2] - 2, 9)
  rtol, atol = _tolerances('winograd', want)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)
  assert len(calls) == (like != 'xla')
  calls.clear()
  conv.conv2d_valid(x, kernel[:1, :1], conv.conv2d_winograd)  # 1x1: nothing to pad, XLA's
  assert not calls


def test_conv2d_valid_in_bfloat16_follows_the_padded_conv():
  """bfloat16 with the 'winograd' conv computes in float32 (as `conv2d_winograd` does), so tiles
  equal the padded model; the XLA route stays in bfloat16, as `conv2d_xla` does."""
  x, kernel, _ = _data((1, 9, 10, 4), (3, 3, 4, 5), dtype=jnp.bfloat16, seed=5)
  for like in (conv.conv2d_winograd, conv.conv2d_xla):
    want = like(x, kernel)[:, 1:-1, 1:-1]
    got = conv.conv2d_valid(x, kernel, like)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_compiler_options_give_onednn_convolutions_on_x86_cpus_only():
  assert conv.compiler_options('cpu', 'x86_64') == conv.ONEDNN_CPU_OPTIONS
  assert conv.compiler_options('cpu', 'AMD64') == conv.ONEDNN_CPU_OPTIONS
  assert conv.compiler_options('cpu', 'aarch64') == {}
  assert conv.compiler_options('gpu', 'x86_64') == {}
  assert conv.compiler_options('tpu', 'x86_64') == {}


@pytest.mark.parametrize('preset', ['dcscn_compact', 'espcn_su'])
def test_onednn_options_give_the_same_values_and_grads(preset):
  """The models' programs compiled with `conv.compiler_options()` (oneDNN's convolutions on an
  x86-64 CPU) give XLA's default values and gradients to float rounding."""
  import importlib  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f'configs.{preset}').get_config().model
  if preset == 'espcn_su':
    cfg.filters = (16, 32)  # its layer kinds, fewer channels: quick to compile
  model = models.build_model(cfg)
  x = jnp.asarray(np.random.default_rng(0).random((2, 20, 20, cfg.channels)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']

  def loss(p):
    return jnp.mean(model.apply({'params': p}, x) ** 2)

  plain = jax.jit(jax.value_and_grad(loss))
  options = conv.compiler_options('cpu', 'x86_64')
  onednn = jax.jit(jax.value_and_grad(loss), compiler_options=options)
  if jax.default_backend() == 'cpu' and conv.compiler_options():
    assert '__onednn$convolution' in onednn.lower(params).compile().as_text()
  (v0, g0), (v1, g1) = plain(params), onednn(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
