"""Overlap-tiled inference: any image size, fixed tile and batch shapes, spread over local devices.

An image is cut into square tiles of `tile_size` low-resolution pixels that overlap by the model's
receptive margin; borders are replicated (edge padding), so every tile's valid centre equals the
same pixels of the whole-image result (the image edge-padded by the margin, run once, cropped).
Tiles go to the devices in batches of a fixed size, so one compilation per tile side serves every
image.
Only the output buffer and one or two batches of tiles are resident at a time.

Channels: the image may have 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels whatever the
model's: an RGB model sees gray as three equal channels and gives back luma; a Y-only model runs on
Y of YCbCr (BT.601, full range) while CbCr are upscaled bicubically; alpha is upscaled by the model
as a gray image. All of it happens per tile, inside the compiled function.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from w2x_jax import conv
from w2x_jax import models

# LR pixels per tile side, margins included: the largest tile; each image gets it or one of a few
# sides below it, whichever computes the fewest pixels (Upscaler.tile_side). Measured on 2 CPU
# cores (Winograd convolutions, the seed DCSCN, margin 15): per computed pixel tiles of 128-512 run
# at the same speed within this machine's ~10% noise, so the choice is about the overlap: 320 lets
# a 512x512 image take 4 tiles of 288 (1.27x its pixels computed) instead of 9 of 256 (2.25x).
# Peak memory grows with a tile's area (the DCSCN's 1281 concatenated channels): 4.0-5.0 GB at 320
# against 3.6 GB at 256 (padded tiles; unpadded, 3.46 GB at 256 against 3.36 padded).
DEFAULT_TILE_SIZE = 320
# The sides Upscaler.tile_side chooses from: at most TILE_SIDES, TILE_SIDE_STEP apart (a tenth of
# a larger tile size, rounded down to a multiple of it), each compiled when first needed.
TILE_SIDE_STEP = 32
TILE_SIDES = 8
TILE_COST_PIXELS = 32 * 32  # per-tile overhead in pixel-equivalents when choosing a tile side
CHROMA_MARGIN = 2  # bicubic CbCr reads 2 LR pixels each side
LUMA = (0.299, 0.587, 0.114)  # BT.601
DATA_AXIS = 'batch'


def tile_margin(model_cfg, channels=None):
  """LR pixels of overlap each tile needs: the model's margin (and the chroma upscaler's)."""
  margin = models.receptive_margin(model_cfg)
  if model_cfg.channels == 1 and channels in (3, 4):
    margin = max(margin, CHROMA_MARGIN)
  return margin


def margin_overhead(model_cfg, tile_size=DEFAULT_TILE_SIZE, channels=None):
  """Fraction of the computed pixels of a full tile that are margin (thrown away)."""
  margin = tile_margin(model_cfg, channels)
  if tile_size <= 2 * margin:
    raise ValueError(f'tile size {tile_size} must exceed twice the margin ({margin})')
  return 1.0 - ((tile_size - 2 * margin) / tile_size) ** 2


def _rgb_to_ycbcr(x):
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  y = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
  return y, jnp.concatenate([(b - y) / 1.772 + 0.5, (r - y) / 1.402 + 0.5], axis=-1)


def _ycbcr_to_rgb(y, cbcr):
  cb, cr = cbcr[..., 0:1] - 0.5, cbcr[..., 1:2] - 0.5
  r = y + 1.402 * cr
  b = y + 1.772 * cb
  g = (y - LUMA[0] * r - LUMA[2] * b) / LUMA[1]
  return jnp.concatenate([r, g, b], axis=-1)


def _luma(x):
  return x[..., 0:1] * LUMA[0] + x[..., 1:2] * LUMA[1] + x[..., 2:3] * LUMA[2]


def _dihedral(x, k):
  """The k-th (0..7) of the 8 flips and rotations of NHWC `x`; _undihedral inverts it."""
  if k >= 4:
    x = jnp.flip(x, axis=2)
  return jnp.rot90(x, k % 4, axes=(1, 2))


def _undihedral(x, k):
  x = jnp.rot90(x, -(k % 4), axes=(1, 2))
  return jnp.flip(x, axis=2) if k >= 4 else x


def make_tile_fn(model, model_cfg, channels, tta=False, out_dtype=np.float32, margin=0):
  """fn(params, x): (N, h, w, channels) in [0, 1] -> the central (N, (h - 2 margin)*s,
  (w - 2 margin)*s, channels) of the output, clipped to [0, 1] (or quantized when out_dtype is
  uint8/uint16). The model may be one built with `valid=True` (its output already smaller by its
  receptive margin, which `margin` must be at least; the tiler's, which skips most of the margin's
  work) or not (the reference). Pure; the caller jits it."""
  scale, model_channels = int(model_cfg.scale), int(model_cfg.channels)
  if channels not in (1, 2, 3, 4):
    raise ValueError(f'images need 1 to 4 channels, got {channels}')
  if model_channels not in (1, 3):
    raise ValueError(f'model.channels={model_channels} must be 1 or 3')

  def core(y, x):
    return models.center(y, *[(n - 2 * margin) * scale for n in x.shape[1:3]])

  def run(params, x):
    return core(model.apply({'params': params}, x).astype(jnp.float32), x)

  def gray(params, x):
    if model_channels == 1:
      return run(params, x)
    return _luma(run(params, jnp.repeat(x, 3, axis=-1)))

  def colour(params, x):
    if x.shape[-1] == 1:
      return gray(params, x)
    if model_channels == 3:
      return run(params, x)
    y, cbcr = _rgb_to_ycbcr(x)
    return _ycbcr_to_rgb(run(params, y), core(models.upsample(cbcr, scale, 'bicubic'), x))

  def once(params, x):
    if channels in (2, 4):  # alpha: the model upscales it as a gray image
      return jnp.concatenate([colour(params, x[..., :-1]), gray(params, x[..., -1:])], axis=-1)
    return colour(params, x)

  def fn(params, x):
    x = x.astype(jnp.float32)
    if tta:  # the 8 dihedral outputs averaged, then clipped once (as nunif's TTA)
      y = sum(_undihedral(once(params, _dihedral(x, k)), k) for k in range(8)) / 8.0
    else:
      y = once(params, x)
    y = jnp.clip(y, 0.0, 1.0)
    if _check_out_dtype(out_dtype).kind == 'f':
      return y  # float32; the paste into the output casts (float64 needs no x64 mode on)
    return jnp.round(y * np.iinfo(out_dtype).max).astype(out_dtype)

  return fn


def quantize(image, dtype):
  """float [0, 1] -> the integer dtype's full range (rounded); float32 passes through."""
  dtype = _check_out_dtype(dtype)
  if dtype.kind == 'f':
    return np.asarray(image, dtype)
  return np.rint(np.clip(image, 0.0, 1.0) * np.iinfo(dtype).max).astype(dtype)


def _starts(n, core):
  """Tile starts covering [0, n) with cores of `core` pixels; the last one ends at n."""
  if n <= core:
    return [0]
  return list(range(0, n - core, core)) + [n - core]


def _tile_count(height, width, core):
  return len(_starts(height, core)) * len(_starts(width, core))


def _crop(image, y, x, side):
  """image[y:y+side, x:x+side] with indices outside the image clamped (edge replication)."""
  h, w = image.shape[:2]
  if 0 <= y and y + side <= h and 0 <= x and x + side <= w:
    return image[y:y + side, x:x + side]
  rows = np.clip(np.arange(y, y + side), 0, h - 1)
  cols = np.clip(np.arange(x, x + side), 0, w - 1)
  return image[rows[:, None], cols[None, :]]


def _check_image(image):
  """The image as [0, 1] floats: unsigned integer (and bool) arrays scaled by their dtype's maximum
  (uint8 by 255), NaN read as 0 and infinities clipped (one NaN pixel would otherwise blank its
  whole receptive field, and further through Winograd's tiles). Float arrays without those pass
  uncopied."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4) or 0 in image.shape:
    raise ValueError(f'expected an HxWxC image with C in 1..4, got shape {image.shape}')
  if image.dtype.kind == 'b':
    return image.astype(np.float32)
  if image.dtype.kind == 'u':
    return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
  if image.dtype.kind == 'i':  # which value is black is a guess (0 or the minimum): as out_dtype
    raise ValueError(f'image dtype {image.dtype}: signed integers are not an image range; give '
                     'unsigned integers (uint8, uint16) or floats in [0, 1]')
  if image.dtype.kind != 'f':
    raise ValueError(f'expected a float or unsigned integer image, got dtype {image.dtype}')
  if not np.isfinite(image).all():
    image = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
  return image


def _check_out_dtype(dtype):
  dtype = np.dtype(dtype)
  if dtype.kind not in 'fu':  # signed: which value is black is a guess; the caller converts
    raise ValueError(f'out_dtype {dtype}: must be a float or unsigned integer type (float32, '
                     'uint8, uint16)')
  return dtype


class Upscaler:
  """Holds the params (placed on the devices), the mesh and the compiled per-batch functions.

  One compiled function per (channels, tile side, tta, out dtype): the batch size is fixed, so
  every image reuses it. Call it as `upscaler(image)`.
  """

  def __init__(self, params, model_cfg, *, model=None, tile_size=None, batch_size=None,
               devices=None, use_pmap=False):
    self.model_cfg = model_cfg
    self.scale = int(model_cfg.scale)
    self.model = model if model is not None else models.build_model(model_cfg)
    # Tiles run without padding (the same params): no work on the margin past what the layers
    # still need (the seed DCSCN's 288x288 tile: 1.34-1.51 s against 1.60-1.67 s padded).
    valid = hasattr(self.model, 'valid') and not self.model.valid
    self.tile_model = self.model.clone(valid=True) if valid else self.model
    self.devices = list(devices) if devices is not None else jax.local_devices()
    for name, value in (('tile_size', tile_size), ('batch_size', batch_size)):
      if value is not None and int(value) < 1:  # None is the default; 0 or less is a mistake
        raise ValueError(f'{name}={value}: must be a positive integer (or None for the default)')
    self.tile_size = int(tile_size or DEFAULT_TILE_SIZE)
    margin = self.margin(3)  # the widest: an RGB image's (a Y-only model adds the chroma's)
    if self.tile_size <= 2 * margin:
      raise ValueError(f'tile size {self.tile_size} must exceed twice the model margin ({margin}): '
                       f'at least {2 * margin + 1}')
    n = len(self.devices)
    # A multiple of the device count so that every device gets the same number of tiles.
    self.batch_size = -(-int(batch_size or n) // n) * n
    self.use_pmap = use_pmap
    self.mesh = jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=self.devices)
    self._data_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self._fns = {}

  def margin(self, channels):
    return tile_margin(self.model_cfg, channels)

  def tile_side(self, height, width, channels):
    """The tile side for one image, from at most TILE_SIDES shapes (each compiled once): the
    configured side and the multiples of a step below it (a tenth of it in multiples of
    TILE_SIDE_STEP; none within half a step of it), down to four margins. An image that one of
    them holds whole gets the smallest such, halved while half still holds it; a larger one gets
    whichever computes the fewest pixels (the last tiles of a row or column overlap their
    neighbours, so a side whose core divides the image better wastes less: 512x512 with the seed
    DCSCN takes 4 tiles of 288, 0.33 M pixels, instead of 4 of 320, 0.41 M)."""
    margin = self.margin(channels)
    side = self.tile_size
    step = max(TILE_SIDE_STEP, side // 10 // TILE_SIDE_STEP * TILE_SIDE_STEP)
    below = range((side - step // 2) // step * step, 4 * margin - 1, -step)
    sides = [side] + list(below)[:TILE_SIDES - 1]
    need = max(height, width) + 2 * margin
    if side >= need:
      side = min(s for s in sides if s >= need)
      while side // 2 > 2 * margin and side // 2 >= need:
        side //= 2
      return side
    return min(sides, key=lambda s: (self._computed_pixels(height, width, margin, s), -s))

  @staticmethod
  def _computed_pixels(height, width, margin, side):
    # Each tile also costs a dispatch, a crop and a paste: counted as TILE_COST_PIXELS more.
    return _tile_count(height, width, side - 2 * margin) * (side * side + TILE_COST_PIXELS)

  def num_tiles(self, height, width, channels):
    return _tile_count(height, width, self.tile_side(height, width, channels) - 2 * self.margin(channels))

  def batch_fn(self, channels, tta=False, out_dtype=np.float32):
    """The compiled fn(params, batch) for (batch_size, side, side, channels) numpy batches."""
    key = (channels, tta, np.dtype(out_dtype).name)
    if key not in self._fns:
      fn = make_tile_fn(self.tile_model, self.model_cfg, channels, tta, out_dtype,
                        self.margin(channels))
      if self.use_pmap:  # jax.pmap takes no compiler options: XLA's default convolutions
        pfn = jax.pmap(fn, in_axes=(None, 0), devices=self.devices)
        n = len(self.devices)

        def run(params, batch, pfn=pfn):
          out = pfn(params, batch.reshape((n, -1) + batch.shape[1:]))
          return out.reshape((-1,) + out.shape[2:])
        self._fns[key] = run
      else:
        jitted = jax.jit(fn, out_shardings=self._data_sharding,
                         compiler_options=conv.compiler_options(self.devices[0].platform))
        self._fns[key] = lambda params, batch: jitted(
            params, jax.device_put(batch, self._data_sharding))
    return self._fns[key]

  def __call__(self, image, *, tta=False, progress=None, out_dtype=np.float32, out=None):
    """Upscales an HxWxC float image in [0, 1] (unsigned integer arrays: over their dtype's
    range, see `_check_image`); returns (H*s, W*s, C) of `out_dtype` (floats clipped to [0, 1],
    or uint8/uint16 over their full range), written into `out` if given.
    `progress(done_tiles, total_tiles)` is called after each batch."""
    return self._run(_check_image(image), tta, progress, out_dtype, out)

  def _run(self, image, tta, progress, out_dtype, out):
    """`__call__` on an image `_check_image` has already given (one pass over it, not two)."""
    h, w, c = image.shape
    s = self.scale
    margin = self.margin(c)
    side = self.tile_side(h, w, c)
    core = side - 2 * margin
    positions = [(y, x) for y in _starts(h, core) for x in _starts(w, core)]
    if out is None:
      out = np.empty((h * s, w * s, c), out_dtype)
    elif out.shape != (h * s, w * s, c):
      raise ValueError(f'out has shape {out.shape}, expected {(h * s, w * s, c)}')
    fn = self.batch_fn(c, tta, out.dtype)
    bsz = self.batch_size

    def paste(pos, result):
      result = np.asarray(result)
      for (y, x), tile in zip(pos, result):
        th, tw = min(core, h - y), min(core, w - x)
        out[s * y:s * (y + th), s * x:s * (x + tw)] = tile[:s * th, :s * tw]

    pending = None
    for start in range(0, len(positions), bsz):
      pos = positions[start:start + bsz]
      batch = np.zeros((bsz, side, side, c), np.float32)  # unused slots stay zero
      for i, (y, x) in enumerate(pos):
        batch[i] = _crop(image, y - margin, x - margin, side)
      result = fn(self.params, batch)  # dispatched asynchronously: cut the next batch meanwhile
      if pending is not None:
        paste(*pending)
        if progress is not None:
          progress(start, len(positions))
      pending = (pos, result)
    paste(*pending)
    if progress is not None:
      progress(len(positions), len(positions))
    return out


def upscale_array(params, model_cfg, image, *, tile_size=None, batch_size=None, tta=False,
                  devices=None, use_pmap=False, progress=None):
  """HxWxC float32 in [0, 1] -> (H*s)x(W*s)xC float32 clipped to [0, 1], tiled (see Upscaler).

  Compiles anew on each call; keep an Upscaler to reuse one compilation over many images."""
  upscaler = Upscaler(params, model_cfg, tile_size=tile_size, batch_size=batch_size,
                      devices=devices, use_pmap=use_pmap)
  return upscaler(image, tta=tta, progress=progress)


def upscale_whole(params, model_cfg, image, *, tta=False, model=None):
  """The reference tiling must equal: the image edge-padded by the margin, run as one tile,
  cropped. Memory grows with the image: for tests and small images."""
  image = _check_image(image).astype(np.float32)
  h, w, c = image.shape
  margin = tile_margin(model_cfg, c)
  model = model if model is not None else models.build_model(model_cfg)
  padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode='edge')
  y = jax.jit(make_tile_fn(model, model_cfg, c, tta, margin=margin),
              compiler_options=conv.compiler_options())(params, padded[None])
  return np.asarray(y[0])


def _box3(x):
  """Sum over each pixel's 3x3 neighbourhood (zeros outside) of an (h, w, ...) array."""
  p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2))
  h, w = x.shape[:2]
  total = np.zeros_like(x)
  for dy in range(3):
    for dx in range(3):
      total += p[dy:dy + h, dx:dx + w]
  return total


# Pixels this transparent show at most 1.6% of their colour: it is replaced like a fully
# transparent one's (alpha 1/255 over random colour had bled that colour into visible edges).
HIDDEN_ALPHA = 4 / 255


def fill_transparent(colour, alpha, iterations=8, strip=256):
  """Colour under (nearly) transparent pixels (alpha <= HIDDEN_ALPHA), grown in from visible
  neighbours (mean of the visible 3x3 neighbours, `iterations` pixels deep; farther ones get the
  mean visible colour), so that the model does not smear arbitrary hidden colour into visible
  edges. Works in row strips (with a halo of `iterations` rows) to keep memory small; returns a
  new array or `colour` itself."""
  hidden = alpha <= HIDDEN_ALPHA + 1e-6
  if not hidden.any() or hidden.all():
    return colour
  h = colour.shape[0]
  visible_sum = np.zeros(colour.shape[-1], np.float64)
  count = 0
  for y in range(0, h, strip):
    v = ~hidden[y:y + strip]
    visible_sum += colour[y:y + strip][v].sum(0, dtype=np.float64)
    count += int(v.sum())
  mean = (visible_sum / count).astype(colour.dtype)
  out = colour.copy()
  for y in range(0, h, strip):
    top, bottom = max(0, y - iterations), min(h, y + strip + iterations)
    c = colour[top:bottom].copy()
    seen = ~hidden[top:bottom]
    for _ in range(iterations):
      if seen.all():
        break
      sums = _box3(c * seen[..., None])
      counts = _box3(seen.astype(c.dtype))
      grow = ~seen & (counts > 0)
      c[grow] = sums[grow] / counts[grow][:, None]
      seen |= grow
    c[~seen] = mean
    out[y:y + strip] = c[y - top:y - top + min(strip, h - y)]
  return out


def _two_runs(progress):
  """progress(done, total) split over two runs of one tile layout: (first's, second's)."""
  if progress is None:
    return None, None
  return (lambda done, total: progress(done, 2 * total),
          lambda done, total: progress(total + done, 2 * total))


def upscale_image(upscaler, image, *, tta=False, progress=None, out_dtype=np.float32,
                  fill_alpha=True, alpha_upscaler=None):
  """An image as people have them (1-4 channels; 2 and 4 carry alpha) through `upscaler`.

  Alpha: hidden colour is filled first (`fill_alpha`); a constant alpha is not run through the
  model (it is just repeated), nor is any alpha at scale 1 (denoising is for colour); with
  `alpha_upscaler` (of the same scale: a model without denoising, as waifu2x has it), alpha runs
  through that one instead (JPEG noise removal had erased dithered transparency)."""
  image = _check_image(image)
  h, w, c = image.shape
  if c in (1, 3):
    return upscaler._run(image, tta, progress, out_dtype, None)  # pylint: disable=protected-access
  s = upscaler.scale
  colour, alpha = image[..., :-1], image[..., -1]
  filled = colour
  if fill_alpha:
    filled = fill_transparent(colour, alpha, iterations=upscaler.margin(c) + 2)
  lo, hi = float(alpha.min()), float(alpha.max())
  if s > 1 and lo != hi and alpha_upscaler is not None and alpha_upscaler is not upscaler:
    if alpha_upscaler.scale != s:
      raise ValueError(f'alpha_upscaler: scale {alpha_upscaler.scale}, not the image\'s {s}')
    out = np.empty((h * s, w * s, c), out_dtype)
    first, second = _two_runs(progress)
    upscaler._run(filled, tta, first, out_dtype, out[..., :-1])  # pylint: disable=protected-access
    alpha_upscaler._run(alpha[..., None], tta, second, out_dtype, out[..., -1:])  # pylint: disable=protected-access
    return out
  if s > 1 and lo != hi:
    if filled is not colour:  # a new array: put alpha back beside it
      image = np.concatenate([filled, alpha[..., None]], axis=-1)
    return upscaler._run(image, tta, progress, out_dtype, None)  # pylint: disable=protected-access
  out = np.empty((h * s, w * s, c), out_dtype)
  upscaler._run(filled, tta, progress, out_dtype, out[..., :-1])  # pylint: disable=protected-access
  if lo == hi:
    out[..., -1] = quantize(np.float32(lo), out_dtype)
  else:  # scale 1: alpha kept as it is
    out[..., -1] = quantize(alpha, out_dtype)
  return out
