"""Stride-1 SAME convolutions (NHWC x, HWIO kernel) with interchangeable implementations.

`get_conv_fn(name)` gives the function that `models.build_model` hands to every `Conv`:
- 'xla': `lax.conv_general_dilated`, differentiated by JAX (XLA convolutions both ways);
- 'matmul': the same forward, with a `jax.custom_vjp` backward pass built for XLA:CPU, which
  computes the kernel gradient as a convolution whose window is the whole image, at 0.2-0.3 of
  matmul speed for 100-250 channels (measured here, 2-core AMD EPYC, jaxlib 0.12):
  - dx is XLA's convolution of dy with the flipped, in/out-swapped kernel (as fast as the forward);
  - dkernel is 3 matmuls over every pixel, one per kernel row: the row patches (3 taps along W)
    of whichever of x and dy has fewer channels, times the other shifted by one row, so it writes
    3x the smaller tensor instead of a 9x im2col (measured 1.2-1.3x faster than the full im2col
    for 60-150 channels); with a handful of channels, or outputs in multiples of 16 (see
    `_xla_kernel_grad_is_faster`), XLA's own kernel gradient was faster and is kept;
  - 1x1 kernels are plain matmuls both ways;
- 'winograd': 3x3 kernels by Winograd F(4x4, 3x3) (a quarter of the multiply-adds, as 36 batched
  matmuls between linear tile transforms): the backward pass always works in the transformed
  domain, the forward pass too in training, but in inference only with many channels
  (`WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT`; XLA's forward is faster below); other kernels as
  'matmul';
- 'auto': on CPU, per layer, 'winograd' where it was measured faster (`winograd_is_faster`: float32
  3x3 with >= 32 channels in and out) and 'matmul' elsewhere; 'xla' on GPU/TPU (their convolution
  gradients are already fast).
All give the same values and gradients up to float rounding (tests/conv_test.py).

Under all of them, XLA itself picks the library that runs each convolution: `compiler_options()`
gives every program that runs the models oneDNN's convolutions on x86-64 CPUs (see there).
"""

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform as platform_lib
import time

import jax
import jax.numpy as jnp
from jax import lax

CONV_NAMES = ('xla', 'matmul', 'winograd', 'auto')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _check(x, kernel):
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'conv.py: expected NHWC x and HWIO kernel with matching channels, got '
                     f'{x.shape} and {kernel.shape}')


def _same_pads(k):
  lo = (k - 1) // 2
  return lo, k - 1 - lo


def conv2d_xla(x, kernel):
  """Stride-1, SAME (zero-padded) convolution of NHWC `x` with an HWIO kernel, by XLA."""
  _check(x, kernel)
  return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_DIMENSION_NUMBERS)


def _patches(x, kh, kw, flip):
  """(N, H, W, kh*kw*C) im2col of `x` for a SAME kernel: channel (i*kw + j)*C + c holds
  x[n, h + i - lo_h, w + j - lo_w, c] (the taps the forward pass reads), or with `flip`
  x[n, h + lo_h - i, w + lo_w - j, c] (the taps the input gradient reads); zero outside."""
  (lo_h, hi_h), (lo_w, hi_w) = _same_pads(kh), _same_pads(kw)
  n, h, w, c = x.shape
  if flip:  # tap (i, j) starts at (kh - 1 - i, kw - 1 - j) of x padded by hi before, lo after
    xp = jnp.pad(x, ((0, 0), (hi_h, lo_h), (hi_w, lo_w), (0, 0)))
    starts = [(kh - 1 - i, kw - 1 - j) for i in range(kh) for j in range(kw)]
  else:
    xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    starts = [(i, j) for i in range(kh) for j in range(kw)]
  taps = [lax.slice(xp, (0, a, b, 0), (n, a + h, b + w, c)) for a, b in starts]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _shift_rows(x, d):
  """x[n, h + d, w, c], zero outside the image."""
  if d == 0:
    return x
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (max(-d, 0), max(d, 0)), (0, 0), (0, 0)))
  return lax.slice(xp, (0, max(d, 0), 0, 0), (n, max(d, 0) + h, w, c))


def _acc_type(dtype):
  # Sums over every pixel of the batch: accumulate low-precision inputs in float32.
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def _input_grad(dy, kernel):
  """dx: the SAME correlation of dy with the spatially flipped, in/out-swapped kernel (XLA's
  convolution: no patches needed; XLA drops it where x needs no gradient, as for the image)."""
  kh, kw = kernel.shape[:2]
  (lo_h, hi_h), (lo_w, hi_w) = _same_pads(kh), _same_pads(kw)
  k_t = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  return lax.conv_general_dilated(dy, k_t, (1, 1), ((hi_h, lo_h), (hi_w, lo_w)),
                                  dimension_numbers=_DIMENSION_NUMBERS)


_MATMUL_CHUNK_ROWS = 8192  # pixels per product in _pixel_t_matmul (5 48x48 patches beat 1 and 25)


def _pixel_t_matmul(a, b):
  """sum over every pixel of a^T b: a (N, H, W, m), b (N, H, W, n) -> (m, n).

  A matmul with a long contraction and a small output, which XLA:CPU runs well below matmul
  speed as one product. Measured here it does better as a batch of products over chunks of
  whole samples (the fewest samples that make `_MATMUL_CHUNK_ROWS` pixels and divide N), summed,
  with the operand with fewer channels on the left: up to 1.4x for 60-200 channels."""
  n = a.shape[0]
  pixels = a.size // (n * a.shape[-1])
  group = next((g for g in range(1, n + 1) if n % g == 0 and g * pixels >= _MATMUL_CHUNK_ROWS), n)
  a3 = a.reshape(n // group, -1, a.shape[-1])
  b3 = b.reshape(n // group, -1, b.shape[-1])
  swap = b.shape[-1] < a.shape[-1]
  lhs, rhs = (b3, a3) if swap else (a3, b3)
  out = lax.dot_general(lhs, rhs, (((1,), (1,)), ((0,), (0,))),
                        preferred_element_type=_acc_type(a.dtype)).sum(0)
  return out.T if swap else out


def _kernel_grad(x, dy, kernel_shape):
  """dkernel as kh matmuls over every pixel, one per kernel row i, each with the kw taps of that
  row: the row patches (N, H, W, kw*C) of whichever of x and dy has fewer channels, against the
  other shifted by i - lo_h rows. That writes 3x the smaller tensor plus two row shifts instead of
  a full 9x im2col, and the kh matmuls are independent (XLA runs them concurrently)."""
  kh, kw, cin, cout = kernel_shape
  lo_h = _same_pads(kh)[0]
  rows = []
  if cin <= cout:
    # dk[i, j] = sum_q x[q + (0, j - lo_w)]^T dy[q - (i - lo_h, 0)]
    p = _patches(x, 1, kw, flip=False)
    for i in range(kh):
      rows.append(_pixel_t_matmul(p, _shift_rows(dy, lo_h - i)).reshape(kw, cin, cout))
  else:
    # dk[i, j] = sum_q x[q + (i - lo_h, 0)]^T dy[q - (0, j - lo_w)]
    p = _patches(dy, 1, kw, flip=True)
    for i in range(kh):
      dk_i = _pixel_t_matmul(_shift_rows(x, i - lo_h), p)  # (cin, kw*cout)
      rows.append(dk_i.reshape(cin, kw, cout).transpose(1, 0, 2))
  return jnp.stack(rows)


@jax.custom_vjp
def _conv_matmul_vjp(x, kernel):
  return conv2d_xla(x, kernel)


def _fwd(x, kernel):
  return conv2d_xla(x, kernel), (x, kernel)


def _xla_kernel_grad_is_faster(cin, cout):
  """Where XLA:CPU's own kernel gradient beat `_kernel_grad` here (batch 25 of 48x48, jaxlib 0.12,
  each shape timed alternately with the other route in one process): a handful of channels
  (cin * cout <= 256: 8 -> 8 3.0 against 3.6 ms, 14 -> 11 and 18 -> 14 even), or outputs in
  multiples of 16 from at least 8 inputs up to 64 x 64 (8 -> 64 8.1 against 14.7 ms, 16 -> 32 6.6
  against 10.8). Elsewhere `_kernel_grad` was faster: 32 -> 26 17 against 34 ms, 26 -> 22 and
  22 -> 18 1.3-1.5x, 3 -> 196 (the seed DCSCN's first layer) 23 against 47; a handful of outputs
  (the HR conv's 1 or 3); and from 62 -> 55 (1.3x) to 256 -> 128 (4x)."""
  if cout < 8:
    return False
  return cin * cout <= 256 or (cin >= 8 and cout % 16 == 0 and cin * cout <= 64 * 64)


def _bwd(res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  dx = _input_grad(dy, kernel)
  if _xla_kernel_grad_is_faster(*kernel.shape[2:]):
    dk = jax.vjp(lambda k: conv2d_xla(x, k), kernel)[1](dy)[0]
  else:
    dk = _kernel_grad(x, dy, kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_matmul_vjp.defvjp(_fwd, _bwd)


def _dot1x1(x, w):
  return lax.dot_general(x, w, (((3,), (0,)), ((), ())))


@jax.custom_vjp
def _conv1x1(x, w):
  """A 1x1 convolution (w: (cin, cout)) is a matmul over the pixels, and so are its gradients."""
  return _dot1x1(x, w)


def _fwd1x1(x, w):
  return _dot1x1(x, w), (x, w)


def _bwd1x1(res, dy):
  x, w = res
  dy = dy.astype(x.dtype)
  return _dot1x1(dy, w.T).astype(x.dtype), _pixel_t_matmul(x, dy).astype(w.dtype)


_conv1x1.defvjp(_fwd1x1, _bwd1x1)


def conv2d_matmul_vjp(x, kernel):
  """Same values as `conv2d_xla`; the gradients are computed as matmuls (see the module doc)."""
  _check(x, kernel)
  if kernel.shape[:2] == (1, 1):
    return _conv1x1(x, kernel[0, 0])
  return _conv_matmul_vjp(x, kernel)


# Winograd F(4x4, 3x3) (Lavin & Gray 2015, points 0, +-1, +-2, inf): a 3x3 SAME convolution on
# 6x6 input tiles at stride 4, as 36 independent matmuls (one per transformed tap) with 36/144 =
# 1/4 of the direct convolution's multiply-adds, plus linear transforms that only add and scale.
_WINO_TILE = 4  # output pixels per tile side
_WINO_ALPHA = _WINO_TILE + 2  # input pixels per tile side
_WINO_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # input transform
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # kernel transform
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
            (0, 1, -1, 8, -8, 1))  # output transform


def _lincomb(terms, coefs):
  """sum_k coefs[k] * terms[k] over the nonzero coefficients (the transforms are sparse, small ints)."""
  out = None
  for term, c in zip(terms, coefs):
    if c == 0:
      continue
    term = term if c == 1 else (-term if c == -1 else term * float(c))
    out = term if out is None else out + term
  return jnp.zeros_like(terms[0]) if out is None else out


def _strided_taps(x, axis, count, alpha=_WINO_ALPHA, m=_WINO_TILE):
  """alpha views of `x` along `axis`: view a holds elements a + m*t for t < count."""
  return [lax.slice_in_dim(x, a, a + (count - 1) * m + 1, m, axis) for a in range(alpha)]


def _wino_input(x, th, tw, before=1):
  """(36, N*th*tw, C): B^T d B of every 6x6 tile d of x zero-padded by `before` (top/left: 1 for
  SAME, 0 for VALID) and to 4*th + 2 x 4*tw + 2; rows first, each pass one fusion (stacking the
  six lincombs)."""
  n, h, w, c = x.shape
  m = _WINO_TILE
  xp = jnp.pad(x, ((0, 0), (before, th * m + 2 - h - before), (before, tw * m + 2 - w - before),
                   (0, 0)))
  rows = _strided_taps(xp, 1, th)
  vh = jnp.stack([_lincomb(rows, b) for b in _WINO_BT])  # (6i, N, th, W', C)
  cols = _strided_taps(vh, 3, tw)
  v = jnp.stack([_lincomb(cols, b) for b in _WINO_BT], axis=1)  # (6i, 6j, N, th, tw, C)
  return v.reshape(_WINO_ALPHA ** 2, n * th * tw, c)


def _wino_input_t(dv, shape, th, tw):
  """The adjoint of `_wino_input`: dx (N, H, W, C) from d(36, N*th*tw, C), adding the overlapping
  tiles (6 wide at stride 4: a tile's last 2 rows/columns are the next tile's first 2)."""
  n, h, w, c = shape
  m, alpha = _WINO_TILE, _WINO_ALPHA
  bt_cols = list(zip(*_WINO_BT))  # B^T's columns: the coefficients of tap a
  dv = dv.reshape(alpha, alpha, n, th, tw, c)

  def overlap_add(parts, axis):
    # parts[a]: tap a of each tile along `axis` (tiles at `axis`, the tap index is new): element
    # a + m*t of the padded axis; taps m.. land in the next tile's first alpha - m positions.
    core = jnp.stack(parts[:m], axis=axis + 1)  # (.., t, m, ..)
    tail = jnp.stack(parts[m:] + [jnp.zeros_like(parts[0])] * (2 * m - alpha), axis=axis + 1)
    pad = [(0, 0)] * core.ndim
    pad[axis] = (0, 1)
    core = jnp.pad(core, pad)
    pad[axis] = (1, 0)
    out = core + jnp.pad(tail, pad)  # (.., t + 1, m, ..)
    return out.reshape(out.shape[:axis] + (-1,) + out.shape[axis + 2:])

  # Columns: (6i, 6j, N, th, tw, C) -> (6i, N, th, 4*(tw+1), C).
  dvh = overlap_add([_lincomb([dv[:, j] for j in range(alpha)], bt_cols[b]) for b in range(alpha)], 3)
  # Rows: -> (N, 4*(th+1), 4*(tw+1), C).
  dxp = overlap_add([_lincomb([dvh[i] for i in range(alpha)], bt_cols[a]) for a in range(alpha)], 1)
  return dxp[:, 1:1 + h, 1:1 + w]


def _wino_output(mm, n, th, tw, h, w):
  """(N, H, W, Cout): A^T M A of every tile of mm (36, N*th*tw, Cout), cropped to H x W."""
  m, alpha = _WINO_TILE, _WINO_ALPHA
  cout = mm.shape[-1]
  mm = mm.reshape(alpha, alpha, n, th, tw, cout)
  taps = [[mm[i, j] for j in range(alpha)] for i in range(alpha)]
  rows = []
  for a_r in _WINO_AT:
    row = [_lincomb([taps[i][j] for i in range(alpha)], a_r) for j in range(alpha)]
    rows.append(jnp.stack([_lincomb(row, a_s) for a_s in _WINO_AT], axis=3))  # (N, th, tw, 4s, C)
  y = jnp.stack(rows, axis=2)  # (N, th, 4r, tw, 4s, Cout)
  return y.reshape(n, th * m, tw * m, cout)[:, :h, :w]


def _wino_output_t(dy, th, tw):
  """The adjoint of `_wino_output`: (36, N*th*tw, Cout) from dy (N, H, W, Cout)."""
  n, h, w, cout = dy.shape
  m, alpha = _WINO_TILE, _WINO_ALPHA
  dy = jnp.pad(dy, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0)))
  dy = dy.reshape(n, th, m, tw, m, cout)
  at_cols = list(zip(*_WINO_AT))  # A^T's columns: the coefficients of transformed tap i
  rows = [dy[:, :, r] for r in range(m)]  # (N, th, tw, 4s, Cout)
  dmh = [_lincomb(rows, at_cols[i]) for i in range(alpha)]
  dm = jnp.stack([jnp.stack([_lincomb([d[:, :, :, s] for s in range(m)], at_cols[j])
                             for j in range(alpha)]) for d in dmh])  # (6i, 6j, N, th, tw, Cout)
  return dm.reshape(alpha ** 2, n * th * tw, cout)


def _wino_kernel(kernel):
  """(36, Cin, Cout): G g G^T of the 3x3 kernel g (HWIO)."""
  g = jnp.asarray(_WINO_G, jnp.float32)
  return jnp.einsum('ia,jb,abco->ijco', g, g, kernel).reshape(_WINO_ALPHA ** 2, *kernel.shape[2:])


def _wino_kernel_t(du):
  """The adjoint of `_wino_kernel`: (3, 3, Cin, Cout) G^T dU G from dU (36, Cin, Cout)."""
  g = jnp.asarray(_WINO_G, jnp.float32)
  return jnp.einsum('ia,jb,ijco->abco', g, g, du.reshape(_WINO_ALPHA, _WINO_ALPHA, *du.shape[1:]))


def _bmm(a, b):
  """Batched matmul over the leading (transformed tap) axis: (T, P, K) x (T, K, N) -> (T, P, N)."""
  return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))


def _tiles(h, w):
  return -(-h // _WINO_TILE), -(-w // _WINO_TILE)


def _winograd_forward(x, kernel):
  n, h, w, _ = x.shape
  th, tw = _tiles(h, w)
  return _wino_output(_bmm(_wino_input(x, th, tw), _wino_kernel(kernel)), n, th, tw, h, w)


# Inference (no gradient) runs Winograd's forward pass only with at least this many input x output
# channels; below, XLA's own convolution. Forward-only on a 256x256 image here (jaxlib 0.12), XLA /
# Winograd: 32 -> 32 7.0 / 12.0 ms, 128 -> 32 28 / 49, 55 -> 48 18 / 24, 80 -> 70 40 / 48,
# 64 -> 128 53 / 55; above it Winograd: 103 -> 91 80 / 74, 134 -> 118 107 / 92, 128 -> 128 97 / 76,
# 196 -> 172 212 / 154. Training keeps Winograd's: on its batches of 48x48 patches the two
# forwards took the same time, and the seed DCSCN's step was slower with XLA's (best steps
# 2.9-3.0 s against 2.5).
WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT = 96 * 96


@jax.custom_vjp
def _conv_winograd(x, kernel):
  """float32 only (`conv2d_winograd` casts): the transforms' factors would not fit a narrower type.
  Without a gradient (inference), XLA's forward where faster
  (`WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT`)."""
  if kernel.shape[2] * kernel.shape[3] < WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT:
    return conv2d_xla(x, kernel)
  return _winograd_forward(x, kernel)


def _wino_fwd(x, kernel):
  return _winograd_forward(x, kernel), (x, kernel)


def _wino_bwd(res, dy):
  """Both gradients in the transformed domain, sharing dM = the output transform's adjoint of dy:
  dx = input-adjoint(dM U^T), dkernel = G^T (sum over tiles V^T dM) G; V is recomputed from x
  (cheaper to redo than to keep 2.25x every input alive until the backward pass)."""
  x, kernel = res
  n, h, w, _ = x.shape
  th, tw = _tiles(h, w)
  dm = _wino_output_t(dy, th, tw)
  dx = _wino_input_t(_bmm(dm, _wino_kernel(kernel).transpose(0, 2, 1)), x.shape, th, tw)
  du = lax.dot_general(_wino_input(x, th, tw), dm, (((1,), (1,)), ((0,), (0,))))  # (36, Cin, Cout)
  return dx, _wino_kernel_t(du)


_conv_winograd.defvjp(_wino_fwd, _wino_bwd)


def conv2d_winograd(x, kernel):
  """Same values as `conv2d_xla` up to float rounding (relative error ~1e-5 in float32, as the
  transforms scale by up to 8 and 1/24): 3x3 kernels by Winograd F(4x4, 3x3) (inference's
  forward pass only with many channels, see `_conv_winograd`), 1x1 as matmuls; other kernel
  sizes fall back to `conv2d_matmul_vjp`. Narrower dtypes (bfloat16) are computed in float32
  and rounded back: their 8-bit mantissa would lose ~10% through the transforms (measured), so
  there Winograd saves nothing (`winograd_is_faster` says no)."""
  _check(x, kernel)
  if x.dtype != kernel.dtype:
    raise TypeError(f'conv.py: x and kernel must have one dtype, got {x.dtype} and {kernel.dtype}')
  if kernel.shape[:2] != (3, 3):
    return conv2d_matmul_vjp(x, kernel)
  if x.dtype != jnp.float32:
    return _conv_winograd(x.astype(jnp.float32), kernel.astype(jnp.float32)).astype(x.dtype)
  return _conv_winograd(x, kernel)


def _winograd_forward_valid(x, kernel):
  """The VALID 3x3 convolution ((H - 2) x (W - 2) out) by Winograd F(4x4, 3x3): the tiles start at
  the input's first pixel instead of one before it, and nothing but the last tiles is padded."""
  n, h, w, _ = x.shape
  th, tw = _tiles(h - 2, w - 2)
  mm = _bmm(_wino_input(x, th, tw, before=0), _wino_kernel(kernel))
  return _wino_output(mm, n, th, tw, h - 2, w - 2)


def conv2d_valid(x, kernel, like=conv2d_xla):
  """The VALID convolution (no padding: each side smaller by the kernel's radius), for tiled
  inference (forward only, differentiable by autodiff). Winograd's forward where the SAME
  convolution `like` would take it (`conv2d_winograd`, or `conv2d_cpu` where `winograd_is_faster`)
  and the layer is wide enough for its forward (`WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT`); else
  XLA's (any other `like` included). Narrower dtypes with `like=conv2d_winograd` compute in
  float32, as that does, so tiles equal the padded model's output."""
  _check(x, kernel)
  if like is conv2d_winograd and x.dtype != jnp.float32:  # as conv2d_winograd: float32 inside
    return conv2d_valid(x.astype(jnp.float32), kernel.astype(jnp.float32), like).astype(x.dtype)
  kh, kw, cin, cout = kernel.shape
  wino = like is conv2d_winograd or (like is conv2d_cpu and winograd_is_faster(kernel.shape, x.dtype))
  if (wino and (kh, kw) == (3, 3) and x.dtype == jnp.float32
      and cin * cout >= WINOGRAD_FORWARD_MIN_CHANNELS_PRODUCT):
    return _winograd_forward_valid(x, kernel)
  return lax.conv_general_dilated(x, kernel, (1, 1), 'VALID', dimension_numbers=_DIMENSION_NUMBERS)


_WINO_MIN_CHANNELS = 32


def winograd_is_faster(kernel_shape, dtype):
  """Where Winograd beat the 'matmul' conv here (forward plus backward, batch 25 of 48x48, 2-core
  AMD EPYC, jaxlib 0.12): 3x3 kernels with at least 32 input and output channels, 1.3x (48 -> 48)
  to 2.2x (196 -> 172). With fewer channels (the first layer, a 256 -> 12 upsampler, 26 -> 22) its
  transforms cost more than the matmuls save. float32 only: in bfloat16 the transforms' factors
  (up to 8 and 1/24) would cost several bits of an 8-bit mantissa."""
  kh, kw, cin, cout = kernel_shape
  return ((kh, kw) == (3, 3) and min(cin, cout) >= _WINO_MIN_CHANNELS
          and jnp.dtype(dtype) == jnp.float32)


def conv2d_cpu(x, kernel):
  """The CPU choice per layer: `conv2d_winograd` where `winograd_is_faster`, else
  `conv2d_matmul_vjp`."""
  if winograd_is_faster(kernel.shape, x.dtype):
    return conv2d_winograd(x, kernel)
  return conv2d_matmul_vjp(x, kernel)


def get_conv_fn(name='auto', backend=None):
  """The convolution called `name` (one of CONV_NAMES); 'auto' picks by `backend` (default JAX's)."""
  if name == 'auto':
    if (backend or jax.default_backend()) == 'cpu':
      return conv2d_cpu
    name = 'xla'
  if name == 'xla':
    return conv2d_xla
  if name == 'matmul':
    return conv2d_matmul_vjp
  if name == 'winograd':
    return conv2d_winograd
  raise ValueError(f'conv.py: convolution {name!r} must be one of {list(CONV_NAMES)}')


# XLA:CPU (jaxlib 0.12) runs convolutions with YNNPACK by default. oneDNN's (the library PyTorch
# uses on CPU, reached through XLA's oneDNN custom calls) ran this project's few-channel layers far
# faster: alternating in one process, the compact DCSCN's train step (batch 25 of 48x48) 154 ms
# against 235, its 256x256 forward 42 against 51, a 288x288 tile 49 against 64; ESPCN-SU's step
# 1.50 s against 1.67 and the seed DCSCN's 2.26 s against 2.39, their forwards the same; the
# values the same to float rounding. YNNPACK keeps what else it runs by default (dots, including
# Winograd's products, and reductions): per program, as jax.jit's compiler options.
ONEDNN_CPU_OPTIONS = {
    'xla_cpu_experimental_onednn_custom_call': True,
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def compiler_options(platform=None, machine=None):
  """jax.jit compiler options for a program that runs the models' convolutions on `platform`
  (default: JAX's default backend): `ONEDNN_CPU_OPTIONS` on x86-64 CPUs (`machine`, default this
  host's: oneDNN's custom calls are built for x86), none elsewhere."""
  platform = platform or jax.default_backend()
  machine = (machine or platform_lib.machine()).lower()
  if platform == 'cpu' and machine in ('x86_64', 'amd64'):
    return dict(ONEDNN_CPU_OPTIONS)
  return {}


def measure_matmul_gflops(n=2048, repeats=5, dtype=jnp.float32, precision=None):
  """GFLOP/s of a jitted n x n @ n x n matmul on the default device (best of `repeats`), at JAX's
  default `precision` (on GPUs float32 may then run as TF32) unless one is given."""
  # Random operands: an accelerator multiplies zeros or ones faster than real data.
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), dtype)
  f = jax.jit(functools.partial(jnp.matmul, precision=precision))
  jax.block_until_ready(f(a, b))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best / 1e9


@functools.cache
def keep_freed_memory(max_bytes=2 ** 31 - 1):
  """Makes glibc keep freed memory for reuse instead of returning it to the kernel (process-wide).

  XLA:CPU allocates its large buffers afresh on every call; glibc serves those by mmap and unmaps
  them on free, so every train step page-faults its activations in again. Measured here: a 315 MB
  elementwise op ran at 4 GB/s that way and 22 GB/s with freed memory kept, and the seed DCSCN's
  train step took 4.6 s instead of 4.2 s. One heap (arena), no mmap and trimming only above
  `max_bytes` keep the pages; the cost is that threads share one malloc lock (the 2-thread patch
  generator ran 14% slower, still far ahead of training) and that the process keeps its peak heap.
  Call it once, early (before JAX's backend starts); returns False where glibc's mallopt is missing."""
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, int(min(max_bytes, 2 ** 31 - 1)))))


def runs_on_cpu_only(platforms=None):
  """Whether JAX will run on the CPU alone, decided without starting its backend: the first of
  `platforms` (default: `jax_platforms`, JAX_PLATFORMS) where set, else whether any accelerator
  plugin is installed (the `jax_plugins` namespace or entry points, libtpu,
  PJRT_NAMES_AND_LIBRARY_PATHS), as JAX finds them."""
  if platforms is None:
    platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if os.environ.get('PJRT_NAMES_AND_LIBRARY_PATHS') or importlib.util.find_spec('libtpu'):
    return False
  if any(True for _ in importlib.metadata.entry_points(group='jax_plugins')):
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top (a namespace package, if any)
  except ImportError:
    return True
  return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory_on_cpu():
  """`keep_freed_memory()` where JAX runs on the CPU alone (main.py, the training loop, the upscale
  command, the web page and the bench call it first), before the backend starts: called after it
  (as this project did until it was measured), the compact model's 256x256 forward took 0.08 s
  instead of 0.056 in every one of 5 processes each way (presumably the backend's threads had
  their own malloc arenas by then). Without it at all, the shipped
  model's upscale of a 1024x1024 image took 2.5 s instead of 2.0 s (one measurement, before
  pixel_shuffle's barrier), 3.5-4 s of the 20 s run spent by the kernel faulting pages in. The web
  page's process then keeps its peak heap (below 2 GB) between jobs."""
  if runs_on_cpu_only():
    return keep_freed_memory()
  return False
