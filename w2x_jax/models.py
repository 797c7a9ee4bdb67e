"""Flax Linen models: DCSCN (the seed's and the paper's) and ESPCN with selection units.

Every model is called as `model.apply({'params': params}, x)` with `x` NHWC in [0, 1] and
`channels` channels; the output is `(N, H*s, W*s, channels)` float32, not clipped.

Conventions shared by both models:
- every convolution goes through `Conv`, which calls one function: the `conv_fn` given to
  `build_model`, else `conv.get_conv_fn(model_cfg.get('conv', 'auto'))` (on CPU, per layer:
  Winograd where it was measured faster, else XLA's convolution forward with a matmul backward
  pass), so a faster convolution can be swapped in without touching the architectures
  (`valid=True` models run their 3x3 convolutions by `conv.conv2d_valid`, which
  follows `conv_fn`'s choice of Winograd, else XLA's);
- convolutions are stride 1 with SAME (zero) padding (`valid=True`, for tiles: none, see
  `center`); params are float32, the convolutions compute
  in `model_cfg.get('dtype', 'float32')`; the interpolated-input skip and the final add are float32
  (the skip carries most of the signal, and bfloat16 rounds more coarsely than 8-bit pixels);
- `pixel_shuffle` uses PyTorch's channel order (input channel `c*s*s + dy*s + dx`), so the seed's
  PyTorch weights map over unchanged (after OIHW -> HWIO);
- the interpolated-input skip uses half-pixel centres (PyTorch's `align_corners=False`, Pillow) and
  edge replication: 'bilinear' equals PyTorch's `F.interpolate(mode='bilinear')` everywhere;
  'bicubic' is Keys' a = -0.5 (Pillow's, MATLAB's) and equals Pillow's BICUBIC except in the two
  outermost low-resolution pixels, where Pillow renormalises its truncated kernel instead. Edge
  replication is what tiled inference sees anyway (it pads the image by replicating its edges).
"""

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from w2x_jax import conv as conv_lib

MODEL_NAMES = ('dcscn', 'espcn_su')
ACTIVATIONS = ('selu', 'prelu', 'relu', 'leaky_relu')
SELECTION_ACTIVATIONS = ACTIVATIONS + ('none',)
INTERPOLATIONS = ('none', 'bilinear', 'bicubic')
LEAKY_SLOPE = 0.1  # waifu2x's LeakyReLU slope
PRELU_INIT = 0.1  # jiny2001's DCSCN initialises its per-channel PReLU alphas to 0.1
_INTERP_RADIUS = {'none': 0, 'bilinear': 1, 'bicubic': 2}  # LR pixels each side a skip sample reads
# DCSCN's final HR conv runs before the pixel shuffle (`Conv(shuffle=s)`) with at most this many
# upsampler filters. Measured on 2 CPU cores at 2x, 8 -> 1 channels: forward 4.6x faster (256x256:
# 8.8 -> 1.9 ms), forward + backward 2.4-2.8x; 8 -> 3: forward 3.2x, forward + backward at batch 25
# of 48x48 1.8x. With 32 (the seed's) the s*s-fold multiply-adds made it 1.3-1.7x slower.
FINAL_BEFORE_SHUFFLE_MAX = 16


conv2d = conv_lib.conv2d_xla  # stride-1, SAME (zero-padded), NHWC x, HWIO kernel


@jax.custom_jvp
def _materialized(x):
  """x, computed into its own buffer before its consumer reads it (forward pass only).

  Before a pixel shuffle: XLA:CPU otherwise fuses the producer (the upsampler's Winograd output
  transform, 16-36 reads per element) into the shuffle's transpose, which then ran at ~1 GB/s:
  110 ms of the seed DCSCN's 1.15 s 256x256 forward; the extra copy costs ~5 ms. The backward pass
  keeps XLA's fusion (no difference measured there)."""
  return jax.lax.optimization_barrier(x)


_materialized.defjvp(lambda primals, tangents: (_materialized(*primals), tangents[0]))


def pixel_shuffle(x, scale):
  """(N, H, W, C*s*s) -> (N, H*s, W*s, C), with PyTorch's order: channel c*s*s + dy*s + dx."""
  n, h, w, cs = x.shape
  if cs % (scale * scale):
    raise ValueError(f'models.py: pixel_shuffle needs channels divisible by {scale}^2, got {cs}')
  c = cs // (scale * scale)
  x = _materialized(x)
  x = x.reshape(n, h, w, c, scale, scale)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(n, h * scale, w * scale, c)


def center(x, height, width):
  """The central height x width pixels of NHWC `x` (as many cropped from each side)."""
  dy, dx = x.shape[1] - height, x.shape[2] - width
  if min(dy, dx) < 0 or dy % 2 or dx % 2:
    raise ValueError(f'models.py: cannot take the central {height}x{width} of {x.shape[1:3]}')
  return x[:, dy // 2:dy // 2 + height, dx // 2:dx // 2 + width]


def _margin(body, skip_interpolation, scale):
  """LR pixels each side an output pixel reads: the body's layers' and the skip's, whichever reach
  further (they run in parallel); the skip reads 1 (bilinear) or 2 (bicubic), none at scale 1."""
  return max(body, _INTERP_RADIUS[skip_interpolation] if scale > 1 else 0)


def _valid_output(body, x, scale, body_margin, skip_interpolation):
  """A `valid=True` model's output: the body's and the interpolated input's centre of
  (H - 2 margin) * s x (W - 2 margin) * s pixels, those whose receptive field the input holds."""
  margin = _margin(body_margin, skip_interpolation, scale)
  size = [(n - 2 * margin) * scale for n in x.shape[1:3]]
  if min(size) <= 0:
    raise ValueError(f'models.py: valid=True needs inputs over {2 * margin} pixels, '
                     f'got {x.shape[1:3]}')
  y = center(body.astype(jnp.float32), *size)
  if skip_interpolation != 'none':
    y = y + center(upsample(x.astype(jnp.float32), scale, skip_interpolation), *size)
  return y


def _cubic(t, a=-0.5):
  t = abs(t)
  if t <= 1:
    return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
  if t < 2:
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
  return 0.0


def _phase_taps(method, scale):
  """(scale, 2R+1) weights: output phase r of LR pixel k reads LR pixels k-R..k+R."""
  radius = _INTERP_RADIUS[method]
  kernel = (lambda t: max(0.0, 1.0 - abs(t))) if method == 'bilinear' else _cubic
  taps = np.zeros((scale, 2 * radius + 1))
  for r in range(scale):
    offset = (r + 0.5) / scale - 0.5  # half-pixel centres: where phase r samples, relative to k
    for j in range(-radius, radius + 1):
      taps[r, j + radius] = kernel(j - offset)
  return taps


def _upsample_axis(x, taps, axis):
  scale, width = taps.shape
  radius = (width - 1) // 2
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  xp = jnp.pad(x, pad, mode='edge')
  phases = []
  for r in range(scale):
    terms = [float(taps[r, j]) * jax.lax.slice_in_dim(xp, j, j + n, axis=axis)
             for j in range(width) if taps[r, j] != 0.0]
    phases.append(functools.reduce(jnp.add, terms))
  y = jnp.stack(phases, axis=axis + 1)  # (.., n, s, ..) -> (.., n*s, ..): index k*s + r
  return y.reshape(x.shape[:axis] + (n * scale,) + x.shape[axis + 1:])


def upsample(x, scale, method):
  """Upscales NHWC `x` by an integer factor: separable fixed taps, edge replication (see top)."""
  if method not in ('bilinear', 'bicubic'):
    raise ValueError(f'models.py: interpolation {method!r} must be one of bilinear, bicubic')
  if scale == 1:
    return x
  taps = _phase_taps(method, scale)
  return _upsample_axis(_upsample_axis(x, taps, 1), taps, 2)


def _kernel_init(activation):
  # SELU nets keep their self-normalisation with LeCun init; ReLU-like ones want He init.
  if activation in ('selu', 'none'):
    return nn.initializers.lecun_normal()
  return nn.initializers.he_normal()


class Conv(nn.Module):
  """The one convolution every layer uses: float32 params, computed in `dtype` by `conv_fn`.

  `shuffle` = s > 1: the 3x3 conv of pixel_shuffle(x, s), computed before the shuffle as
  pixel_shuffle(conv(x, subpixel_kernel)) with the same params (kernel (3, 3, C, O)); s*s times
  the multiply-adds, but for few channels far faster on CPU than the conv at high resolution
  (see DCSCN). `valid`: no padding, each side smaller by the kernel's radius
  (`conv.conv2d_valid`, Winograd's or XLA's as `conv_fn` would choose)."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  conv_fn: Callable = conv2d
  shuffle: int = 1
  valid: bool = False

  @nn.compact
  def __call__(self, x):
    k, s2 = self.kernel_size, self.shuffle * self.shuffle
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1] // s2, self.features),
                        jnp.float32)
    if self.shuffle > 1:
      if k != 3:
        raise ValueError(f'models.py: Conv(shuffle={self.shuffle}) needs a 3x3 kernel, got {k}x{k}')
      kernel = subpixel_kernel(kernel, self.shuffle)
    if self.valid and k > 1:
      y = conv_lib.conv2d_valid(x.astype(self.dtype), kernel.astype(self.dtype), self.conv_fn)
    else:
      y = self.conv_fn(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + jnp.repeat(bias, s2).astype(self.dtype)
    return pixel_shuffle(y, self.shuffle) if self.shuffle > 1 else y


class ConvParams(nn.Module):
  """A 1x1 Conv's params (kernel (1, 1, in_features, features), bias), returned, not applied."""
  features: int
  in_features: int
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', self.kernel_init, (1, 1, self.in_features, self.features),
                        jnp.float32)
    return kernel, self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)


def subpixel_kernel(kernel, scale):
  """The low-resolution 3x3 kernel (3, 3, C*s*s, O*s*s) of a high-resolution 3x3 kernel (3, 3, C, O)
  for inputs in pixel-shuffle order: pixel_shuffle(conv(x, K)) == conv(pixel_shuffle(x), kernel),
  SAME zero padding included (HR pixel s*i + a reads HR row s*i + a + dy, which is LR row
  i + (a + dy) // s, phase (a + dy) % s: never more than one LR row away)."""
  s = scale
  place = np.zeros((3, 3, s, s, 3, 3, s, s), np.float32)  # LR tap, input phase, HR tap, output phase
  for a in range(s):
    for b in range(s):
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          oy, py = divmod(a + dy, s)
          ox, px = divmod(b + dx, s)
          place[oy + 1, ox + 1, py, px, dy + 1, dx + 1, a, b] = 1.0
  c, o = kernel.shape[2:]
  lr = jnp.einsum('YXpqyxab,yxco->YXcpqoab', jnp.asarray(place, kernel.dtype), kernel)
  return lr.reshape(3, 3, c * s * s, o * s * s)


class Activation(nn.Module):
  """selu | relu | leaky_relu (slope 0.1) | prelu (one alpha per channel) | none.

  `repeat`: PReLU on channels that hold `repeat` consecutive copies of each of C channels (the
  pixel-shuffle order, C*s*s): C alphas, as on the shuffled tensor."""
  kind: str
  repeat: int = 1

  @nn.compact
  def __call__(self, x):
    if self.kind == 'selu':
      return nn.selu(x)
    if self.kind == 'relu':
      return nn.relu(x)
    if self.kind == 'leaky_relu':
      return nn.leaky_relu(x, LEAKY_SLOPE)
    if self.kind == 'prelu':
      alpha = self.param('alpha', nn.initializers.constant(PRELU_INIT),
                         (x.shape[-1] // self.repeat,), jnp.float32)
      return jnp.where(x >= 0, x, jnp.repeat(alpha, self.repeat).astype(x.dtype) * x)
    if self.kind == 'none':
      return x
    raise ValueError(f'models.py: activation {self.kind!r} must be one of {SELECTION_ACTIVATIONS}')


class SelectionUnit(nn.Module):
  """SelNet's selection unit, h * sigmoid(conv1x1(act(h))); `multiply=False` is the seed's variant,
  which returns the gate sigmoid(conv1x1(act(h))) alone (its code drops the multiplication)."""
  activation: str = 'relu'
  multiply: bool = True
  dtype: Any = jnp.float32
  conv_fn: Callable = conv2d

  @nn.compact
  def __call__(self, h):
    g = Activation(self.activation, name='act')(h)
    g = Conv(h.shape[-1], 1, kernel_init=_kernel_init(self.activation), dtype=self.dtype,
             conv_fn=self.conv_fn, name='conv')(g)
    g = nn.sigmoid(g)
    return h * g if self.multiply else g


class DCSCN(nn.Module):
  """DCSCN: conv3x3 feature layers (all outputs concatenated), network-in-network reconstruction
  (A = conv1x1, B = conv1x1 -> conv3x3), conv3x3 + pixel shuffle + conv3x3, plus the interpolated
  input. Each conv but the last is followed by the activation; after the upsampler conv the
  activation comes after the shuffle (PReLU: `upsampler_filters` alphas). That one is the seed's
  (docs/torch_baseline.py): the paper's code (jiny2001/dcscn-super-resolution) applies none
  between its depth_to_space and the final conv, and concatenates B before A (a permutation of the
  upsampler's input channels, the same model)."""
  scale: int
  channels: int
  filters: Sequence[int]
  recon_a: int
  recon_b1: int
  recon_b2: int
  upsampler_filters: int
  final_bias: bool = False
  activation: str = 'selu'
  skip_interpolation: str = 'bilinear'
  dtype: Any = jnp.float32
  conv_fn: Callable = conv2d
  final_before_shuffle: Any = None  # None: where upsampler_filters <= FINAL_BEFORE_SHUFFLE_MAX
  # True: the reconstruction's 1x1 convs per feature layer (same maths; build_model decides by
  # `recon_from_parts`); False: of the concatenated features.
  recon_from_parts: bool = False
  # True (tiled inference): no padding; each layer's output is 1 pixel per side smaller, the earlier
  # features are cropped to the last's size, and the output is the centre that does not depend
  # on the tile's edge: (H - 2 * receptive_margin) * s, the SAME output's values there.
  valid: bool = False

  def _recon_1x1(self, features):
    """recon_a and recon_b1 (1x1 convs of the concatenated features) as one sum over `features`
    (the feature layers' outputs, or their concatenation alone) of each times its rows of both
    kernels side by side. Given the layers, the concatenated tensor is never written (see
    `recon_from_parts` for where that is faster)."""
    total, init = sum(f.shape[-1] for f in features), _kernel_init(self.activation)
    a_kernel, a_bias = ConvParams(self.recon_a, total, init, name='recon_a')()
    b_kernel, b_bias = ConvParams(self.recon_b1, total, init, name='recon_b1')()
    kernel = jnp.concatenate([a_kernel, b_kernel], axis=-1).astype(self.dtype)
    r, start = 0, 0
    for f in features:
      c = f.shape[-1]
      r = r + self.conv_fn(f.astype(self.dtype), kernel[:, :, start:start + c])
      start += c
    r = r + jnp.concatenate([a_bias, b_bias]).astype(self.dtype)
    return r[..., :self.recon_a], r[..., self.recon_a:]

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, kernel_init=_kernel_init(self.activation), dtype=self.dtype,
                             conv_fn=self.conv_fn, valid=self.valid)
    act = functools.partial(Activation, self.activation)
    h, features = x, []
    for i, f in enumerate(self.filters):
      h = act(name=f'feature_{i}_act')(conv(f, 3, name=f'feature_{i}')(h))
      features.append(h)
    if self.valid:
      features = [center(f, *h.shape[1:3]) for f in features]
    # recon_a and recon_b1 read the same features: one product with both kernels side by side.
    a, b = self._recon_1x1(features if self.recon_from_parts else [jnp.concatenate(features, -1)])
    a = act(name='recon_a_act')(a)
    b = act(name='recon_b1_act')(b)
    b = act(name='recon_b2_act')(conv(self.recon_b2, 3, name='recon_b2')(b))
    h = jnp.concatenate([center(a, *b.shape[1:3]), b], axis=-1)
    h = conv(self.upsampler_filters * self.scale ** 2, 3, name='upsampler')(h)
    before = self.final_before_shuffle
    if before is None:
      before = self.upsampler_filters <= FINAL_BEFORE_SHUFFLE_MAX
    if before:  # the same maths at low resolution (same params)
      h = act(repeat=self.scale ** 2, name='upsampler_act')(h)
      h = Conv(self.channels, 3, use_bias=self.final_bias, dtype=self.dtype, conv_fn=self.conv_fn,
               shuffle=self.scale, valid=self.valid, name='final')(h)
    else:
      h = act(name='upsampler_act')(pixel_shuffle(h, self.scale))
      h = Conv(self.channels, 3, use_bias=self.final_bias, dtype=self.dtype, conv_fn=self.conv_fn,
               valid=self.valid, name='final')(h)
    if self.valid:  # features, reconstruction B, upsampler, final conv: a pixel each
      return _valid_output(h, x, self.scale, len(self.filters) + 3, self.skip_interpolation)
    return h.astype(jnp.float32) + upsample(x.astype(jnp.float32), self.scale,
                                            self.skip_interpolation)


class ESPCNSU(nn.Module):
  """The seed's ESPCN_7: conv3x3 + activation + selection unit per layer, then conv3x3 to
  channels*s^2 and pixel shuffle; optionally plus the interpolated input."""
  scale: int
  channels: int
  filters: Sequence[int] = (64, 64, 128, 128, 256, 256)
  activation: str = 'selu'
  selection_activation: str = 'relu'
  selection_multiply: bool = True
  skip_interpolation: str = 'none'
  dtype: Any = jnp.float32
  conv_fn: Callable = conv2d
  valid: bool = False  # as DCSCN's

  @nn.compact
  def __call__(self, x):
    h = x
    for i, f in enumerate(self.filters):
      h = Conv(f, 3, kernel_init=_kernel_init(self.activation), dtype=self.dtype,
               conv_fn=self.conv_fn, valid=self.valid, name=f'conv_{i}')(h)
      h = Activation(self.activation, name=f'conv_{i}_act')(h)
      h = SelectionUnit(self.selection_activation, self.selection_multiply, dtype=self.dtype,
                        conv_fn=self.conv_fn, name=f'select_{i}')(h)
    h = Conv(self.channels * self.scale ** 2, 3, dtype=self.dtype, conv_fn=self.conv_fn,
             valid=self.valid, name='upsampler')(h)
    h = pixel_shuffle(h, self.scale).astype(jnp.float32)
    if self.valid:
      return _valid_output(h, x, self.scale, len(self.filters) + 1, self.skip_interpolation)
    if self.skip_interpolation != 'none':
      h = h + upsample(x.astype(jnp.float32), self.scale, self.skip_interpolation)
    return h


def feature_filters(model_cfg):
  """DCSCN's per-layer filter counts: 'exp' (the seed's round(first*exp(-a*i))) or 'power'
  (the paper's int((first-last)*(1-x^(1/gamma)) + last), x = i/(L-1))."""
  layers, first, last = model_cfg.layers, model_cfg.first_filters, model_cfg.last_filters
  if layers < 1:
    raise ValueError(f'models.py: model.layers={layers} must be >= 1')
  if min(first, last) < 1:
    raise ValueError(f'models.py: model.first_filters={first} and last_filters={last} must be >= 1')
  if layers == 1:
    return [first]
  if model_cfg.filter_decay == 'exp':
    rate = math.log(first / last) / (layers - 1)
    return [round(first * math.exp(-rate * i)) for i in range(layers)]
  if model_cfg.filter_decay == 'power':
    if not 0 < model_cfg.gamma < math.inf:
      raise ValueError(f'models.py: model.gamma={model_cfg.gamma!r} must be a finite number > 0')
    return [int((first - last) * (1 - (i / (layers - 1)) ** (1 / model_cfg.gamma)) + last)
            for i in range(layers)]
  raise ValueError(f'models.py: model.filter_decay={model_cfg.filter_decay!r} must be exp or power')


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f'models.py: model.{field}={value!r} must be one of {list(allowed)}')


# DCSCN's reconstruction from the feature layers' parts (DCSCN._recon_1x1) up to this many
# concatenated channels, on CPU. Measured on 2 cores, each variant in its own process (best of
# 3): the compact model (131 channels) 256x256 forward 59 -> 56 ms (49 with its upsampler's forward
# by XLA, conv.WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT), its train step the same within noise
# (0.24-0.27 s); the seed DCSCN (1281) forward the same, but its train step slower (median 3.8 s
# against 2.8-3.1). Those baselines were two separate 1x1 convs; against the concatenation's one
# product with both kernels (the other path since), alternating in one process: the compact
# forward 52-64 ms from parts against 60-66, its train step the same within noise (0.23-0.29 s).
# Not measured on a GPU.
RECON_FROM_PARTS_MAX_CHANNELS = 256


def recon_from_parts(filters, backend=None):
  """Whether DCSCN computes its reconstruction's 1x1 convs per feature layer (see above)."""
  return (sum(filters) <= RECON_FROM_PARTS_MAX_CHANNELS
          and (backend or jax.default_backend()) == 'cpu')


def build_model(model_cfg, conv_fn=None, valid=False):
  """The Linen module that `model_cfg` describes; `conv_fn(x, kernel)` does every convolution
  (default: the one `model_cfg.conv` names, 'auto' where absent; see conv.py). `valid=True`: the
  same params, run without padding for tiles (see DCSCN.valid)."""
  _check_choice('name', model_cfg.name, MODEL_NAMES)
  if conv_fn is None:
    conv_name = model_cfg.get('conv', 'auto')
    _check_choice('conv', conv_name, conv_lib.CONV_NAMES)
    conv_fn = conv_lib.get_conv_fn(conv_name)
  _check_choice('activation', model_cfg.activation, ACTIVATIONS)
  if model_cfg.scale < 1:
    raise ValueError(f'models.py: model.scale={model_cfg.scale} must be >= 1')
  try:
    dtype = jnp.dtype(model_cfg.get('dtype', 'float32'))
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):  # int8 would train nothing
    raise ValueError(f'models.py: model.dtype={model_cfg.get("dtype")!r} must be a float type '
                     '(float32, bfloat16, float16)')
  if model_cfg.name == 'dcscn':
    _check_choice('skip_interpolation', model_cfg.skip_interpolation, ('bilinear', 'bicubic'))
    filters = tuple(feature_filters(model_cfg))
    for field in ('recon_a', 'recon_b1', 'recon_b2', 'upsampler_filters'):
      if model_cfg[field] < 1:
        raise ValueError(f'models.py: model.{field}={model_cfg[field]} must be >= 1')
    return DCSCN(scale=model_cfg.scale, channels=model_cfg.channels, filters=filters,
                 recon_a=model_cfg.recon_a, recon_b1=model_cfg.recon_b1,
                 recon_b2=model_cfg.recon_b2,
                 upsampler_filters=model_cfg.upsampler_filters, final_bias=model_cfg.final_bias,
                 activation=model_cfg.activation, skip_interpolation=model_cfg.skip_interpolation,
                 dtype=dtype, conv_fn=conv_fn, recon_from_parts=recon_from_parts(filters),
                 valid=valid)
  # () is allowed: the upsampler's conv alone. A tuple's items are not type-checked by
  # ml_collections' overrides: (64, 64.5) had reached Flax's init as a traceback.
  if any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in model_cfg.filters):
    raise ValueError(f'models.py: model.filters={tuple(model_cfg.filters)} must be counts >= 1')
  _check_choice('selection_activation', model_cfg.selection_activation, SELECTION_ACTIVATIONS)
  _check_choice('skip_interpolation', model_cfg.skip_interpolation, INTERPOLATIONS)
  return ESPCNSU(scale=model_cfg.scale, channels=model_cfg.channels,
                 filters=tuple(model_cfg.filters), activation=model_cfg.activation,
                 selection_activation=model_cfg.selection_activation,
                 selection_multiply=model_cfg.selection_multiply,
                 skip_interpolation=model_cfg.skip_interpolation, dtype=dtype, conv_fn=conv_fn,
                 valid=valid)


def receptive_margin(model_cfg):
  """LR pixels on each side that can influence an output pixel (tight for these models).

  Each LR conv3x3 adds 1 (conv1x1 0; DCSCN's reconstruction adds 1 through branch B); the final
  HR conv3x3 reaches 1 HR pixel = ceil(1/s) = 1 LR pixel; the skip reads 1 (bilinear) or 2
  (bicubic) LR pixels each side, 0 at scale 1, and runs in parallel, so it counts by max.
  """
  if model_cfg.name == 'dcscn':
    body = model_cfg.layers + 1 + 1 + 1  # features, reconstruction B, upsampler, final HR conv
  elif model_cfg.name == 'espcn_su':
    body = len(model_cfg.filters) + 1  # conv3x3 layers and the upsampler conv
  else:
    raise ValueError(f'models.py: model.name={model_cfg.name!r} must be one of {list(MODEL_NAMES)}')
  return _margin(body, model_cfg.skip_interpolation, model_cfg.scale)


def flops_per_output_pixel(model_cfg):
  """2 * multiply-adds of the convolutions per high-resolution output pixel (biases, activations
  and the skip not counted): LR convs divided by s^2, plus the HR conv."""
  s2, c = model_cfg.scale ** 2, model_cfg.channels
  if model_cfg.name == 'dcscn':
    filters = feature_filters(model_cfg)
    total = sum(filters)
    lr = sum(9 * cin * cout for cin, cout in zip([c] + filters[:-1], filters))
    lr += total * (model_cfg.recon_a + model_cfg.recon_b1)
    lr += 9 * model_cfg.recon_b1 * model_cfg.recon_b2
    lr += 9 * (model_cfg.recon_a + model_cfg.recon_b2) * model_cfg.upsampler_filters * s2
    hr = 9 * model_cfg.upsampler_filters * c
  elif model_cfg.name == 'espcn_su':
    filters = list(model_cfg.filters)
    lr = sum(9 * cin * cout + cout * cout for cin, cout in zip([c] + filters[:-1], filters))
    lr += 9 * (filters[-1] if filters else c) * c * s2
    hr = 0
  else:
    raise ValueError(f'models.py: model.name={model_cfg.name!r} must be one of {list(MODEL_NAMES)}')
  return 2.0 * (lr / s2 + hr)


def count_params(params):
  """Total number of scalars in a params pytree."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
