"""In-memory patch generator: (low-resolution, high-resolution) training pairs made as waifu2x makes them.

Images are loaded once as uint8 RGB. Every training sample is a pure function of (seed, step, position in
the global batch): it picks an image (weighted by area, so every pixel is equally likely to be seen),
one of the 8 flips/90-degree rotations, a random region, a downscaling filter and JPEG noise. Nothing is
written to disk. `PatchGenerator` runs `make_batch` in background threads (Pillow releases the GIL), or
in worker processes that read the images from shared memory (`data.num_workers`: the threads of one
process stop scaling at a few cores, too few to feed an accelerator), and hands batches to the
training loop in step order.

Noise levels (waifu2x's art models): -1 none; 0: one JPEG at quality 85-95; 1: 65-85; 2 and 3: 27-70
once (60%), twice (30%) or three times (10%) with falling quality. Levels 2 and 3 differ only in how
often a pair is degraded at all (`nr_rate`: 0.65 for levels 0-2, 1.0 for level 3).
"""

import bisect
import concurrent.futures
import importlib.util
import io
import itertools
import math
import multiprocessing
import multiprocessing.connection
from multiprocessing import shared_memory
import os
import pathlib
import queue
import signal
import sys
import threading
import time
import weakref

from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from w2x_jax import image_io
from w2x_jax import processes

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
NOISE_LEVELS = (-1, 0, 1, 2, 3)
FILTERS = {
    'box': Image.Resampling.BOX,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
}
# Real photographs (colour and grey) shipped inside scikit-image's wheel; synthetic images, tiny ones
# and retina.jpg (mostly black, and so large that area weighting would make it a third of all samples)
# are left out.
DEFAULT_IMAGE_FILES = (
    'astronaut.png', 'brick.png', 'camera.png', 'chelsea.png', 'coffee.png', 'coins.png', 'grass.png',
    'gravel.png', 'hubble_deep_field.jpg', 'ihc.png', 'moon.png', 'motorcycle_left.png',
    'motorcycle_right.png', 'page.png', 'rocket.jpg', 'text.png')
# Low-resolution pixels of context degraded around a patch and then cropped away: more than the widest
# filter's reach (lanczos, 3 pixels), and the patch's offset in the region takes 16 values so that its
# phase against the 8x8 JPEG blocks (16x16 with 4:2:0 chroma) varies as it does in real images.
_CONTEXT_MIN = 4
_PHASES = 16
# The 8 flips and 90-degree rotations as (quarter turns counter-clockwise, then a left-right flip),
# numpy's views (np.rot90, [:, ::-1]) to place the crop, and the Pillow transpose that does the
# same to pixels (in C, without the GIL, faster than copying a rotated numpy view).
_DIHEDRAL = {(0, False): None, (0, True): Image.Transpose.FLIP_LEFT_RIGHT,
             (1, False): Image.Transpose.ROTATE_90, (1, True): Image.Transpose.TRANSVERSE,
             (2, False): Image.Transpose.ROTATE_180, (2, True): Image.Transpose.FLIP_TOP_BOTTOM,
             (3, False): Image.Transpose.ROTATE_270, (3, True): Image.Transpose.TRANSPOSE}


class DataError(ValueError):
  """A fatal data problem, explained in one line that names the folder or file and the reason."""


def min_image_size(patch_size, scale):
  """The smallest image side that holds one high-resolution patch."""
  return patch_size * scale


def noise_nr_rate(noise_level, nr_rate):
  """The probability that a pair gets JPEG noise; -1 picks the level's default (0.65, or 1.0 for level 3)."""
  if noise_level not in NOISE_LEVELS:
    raise DataError(f'noise level {noise_level}: must be one of {NOISE_LEVELS}')
  if noise_level == -1:
    return 0.0
  if nr_rate < 0:
    return 1.0 if noise_level == 3 else 0.65
  if not nr_rate <= 1:  # (NaN too: it had made every draw clean)
    raise DataError(f'nr_rate={nr_rate!r}: must be in [0, 1], or -1 for the level default')
  return float(nr_rate)


def check_data_config(data_cfg, scale):
  """DataError naming the field (nr_rate=..., filter_weights.NAME=...) where the pairs cannot be
  made as `data_cfg` asks."""
  noise_nr_rate(data_cfg.noise_level, data_cfg.nr_rate)
  if scale > 1:
    _filter_table(data_cfg.filter_weights)


def _filter_table(filter_weights):
  """(names, cumulative weights) of the filters with positive weight; `filter_weights` maps name -> weight."""
  names, cumulative, total = [], [], 0.0
  for name, weight in sorted(dict(filter_weights.items()).items()):
    if name not in FILTERS:
      raise DataError(f'filter_weights.{name}: unknown filter, expected some of {sorted(FILTERS)}')
    if not 0 <= weight < math.inf:
      raise DataError(f'filter_weights.{name}={weight!r}: must be a finite weight >= 0')
    if weight > 0:
      total += float(weight)
      names.append(name)
      cumulative.append(total)
  if not names:
    raise DataError(f'filter_weights={dict(filter_weights.items())}: at least one must be positive')
  return names, cumulative


# ---------------------------------------------------------------------------------------------------
# Loading


def _to_rgb_uint8(image):
  """HxWx3 uint8 from any Pillow mode: grey expanded, transparency composited over white (the
  colour under transparent pixels, often black or an editor's leftovers, is not art to learn),
  16- and 32-bit scaled down, float [0, 1] scaled up (NaN as 0)."""
  if image.mode.startswith('I') or image.mode == 'F':
    if image.mode == 'F':
      values = np.nan_to_num(np.asarray(image, np.float64)) * 255.0  # float images hold [0, 1], as image_io reads them
    else:  # 16 or 32 bits: white -> 255
      raw, white = image_io.integer_pixels(image)
      values = raw * (255.0 / white)
      if isinstance(image.info.get('transparency'), int):  # a tRNS grey: transparent, so white
        values[raw == image.info['transparency']] = 255.0
    grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if image.mode in ('P', 'PA', 'LA', 'La', 'RGBa') or (
      image.mode in ('1', 'L', 'RGB') and 'transparency' in image.info):
    image = image.convert('RGBA')  # (a palette's transparency would warn on a direct conversion)
  if image.mode == 'RGBA':
    white = Image.new('RGBA', image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, np.uint8)


def _read_image(path):
  """(array, None) or (None, reason)."""
  try:
    with image_io.open_image(path) as image:
      image.load()
      return _to_rgb_uint8(image), None
  except Exception as error:  # pylint: disable=broad-except; any undecodable file is skipped
    return None, f'{type(error).__name__}: {error}'


def _load_files(paths, names, min_size, num_threads):
  """Reads `paths` (in order), warning about and skipping unreadable and too-small ones."""
  # The user's own files: no decompression-bomb limit (Pillow's 179 MP had skipped large ones as
  # unreadable); set around the pool, as it is Pillow's global.
  with image_io.pixel_limit(None), concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(_read_image, paths))
  images = []
  for name, (image, reason) in zip(names, results):
    if image is None:
      logging.warning('Skipping %s: unreadable (%s)', name, reason)
    elif min(image.shape[:2]) < min_size:
      logging.warning('Skipping %s: %dx%d is smaller than one patch (%dx%d)', name, image.shape[1],
                      image.shape[0], min_size, min_size)
    else:
      images.append(image)
  return images


def load_images(folder, min_size, *, num_threads=4):
  """Every image under `folder` (recursive, linked folders followed once each, hidden folders
  skipped) as uint8 HxWx3, sorted by relative path.

  Files that cannot be decoded, images with a side below `min_size` and subfolders that cannot
  be listed are skipped with a warning; a missing folder or one with no usable image raises
  DataError.
  """
  root = pathlib.Path(folder)
  if not root.exists():
    raise DataError(f'{folder}: no such folder')
  if not root.is_dir():
    raise DataError(f'{folder}: not a folder')
  # Linked subfolders followed (pathlib's rglob leaves them out), hidden ones not.
  relative = sorted(
      pathlib.Path(os.path.relpath(os.path.join(d, name), root)).as_posix()
      for d, files in image_io.walk_folder(root, _warn_unlistable) for name in files
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
      and os.path.isfile(os.path.join(d, name)))
  if not relative:
    raise DataError(f'{folder}: no image files ({", ".join(e[1:] for e in IMAGE_EXTENSIONS)})')
  images = _load_files([root / r for r in relative], [str(root / r) for r in relative], min_size,
                       num_threads)
  if not images:
    raise DataError(f'{folder}: none of its {len(relative)} image files is readable and at least '
                    f'{min_size}x{min_size} pixels')
  megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
  logging.info('Loaded %d images (%.1f megapixels) from %s; %d skipped', len(images), megapixels, folder,
               len(relative) - len(images))
  return images


def _warn_unlistable(error):
  # A subfolder the run cannot list (its rights): said, not a silent gap in the training set.
  logging.warning('%s: cannot list it (%s); its images are left out', error.filename,
                  error.strerror or error)


def default_image_dir():
  """scikit-image's `data` package folder, found without importing scikit-image (or its fetchers)."""
  spec = importlib.util.find_spec('skimage')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('default training data: scikit-image is not installed (pip install scikit-image), '
                    'or give a training folder')
  return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def load_default_images(min_size, *, num_threads=4):
  """The embedded default training set: the real photographs in scikit-image's wheel (no network)."""
  folder = default_image_dir()
  present = [name for name in DEFAULT_IMAGE_FILES if os.path.isfile(os.path.join(folder, name))]
  for name in sorted(set(DEFAULT_IMAGE_FILES) - set(present)):
    logging.warning('Default training data: %s missing from %s', name, folder)
  images = _load_files([os.path.join(folder, n) for n in present],
                       [os.path.join(folder, n) for n in present], min_size, num_threads)
  if not images:
    raise DataError(f'{folder}: none of the default photographs is readable and at least '
                    f'{min_size}x{min_size} pixels')
  logging.info('Using the embedded default training data: %d photographs from %s (%s)', len(images),
               folder, ', '.join(present))
  return images


def synthetic_flat_images(count, seed, size=256):
  """`count` drawings of flat colour (HxWx3 uint8, `size` a side) as anime-style art has them and
  photographs lack: fills of saturated and extreme colours (channels often 0 or 255), shapes with
  hard or anti-aliased edges, some outlined in dark lines. The same for the same seed; trained
  beside photographs, they keep a model's flat fills flat and their colours where they were."""
  rng = np.random.default_rng(seed)

  def colour():
    if rng.random() < 0.6:  # extreme: each channel 0, 255 or a round step between
      return tuple(int(v) for v in rng.choice([0, 0, 64, 128, 192, 255, 255], 3))
    return tuple(int(v) for v in rng.integers(0, 256, 3))
  images = []
  for _ in range(count):
    smooth = rng.random() < 0.7  # drawn at 4x and reduced: anti-aliased edges; else hard ones
    factor = 4 if smooth else 1
    canvas = Image.new('RGB', (size * factor, size * factor), colour())
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 10))):
      box = np.sort(rng.integers(-size // 4, size * 5 // 4, (2, 2)) * factor, axis=0)
      shape = [int(v) for v in box.T.ravel()]  # x0, x1, y0, y1 -> reordered below
      shape = [shape[0], shape[2], shape[1], shape[3]]
      outline = (tuple(int(v) for v in rng.integers(0, 60, 3)) if rng.random() < 0.5 else None)
      width = int(rng.integers(1, 4)) * factor
      kind = rng.integers(3)
      if kind == 0:
        draw.ellipse(shape, fill=colour(), outline=outline, width=width)
      elif kind == 1:
        draw.rectangle(shape, fill=colour(), outline=outline, width=width)
      else:
        points = [tuple(int(v) for v in p) for p in rng.integers(0, size * factor, (int(rng.integers(3, 7)), 2))]
        draw.polygon(points, fill=colour(), outline=outline, width=width)
    if smooth:
      canvas = canvas.resize((size, size), Image.Resampling.BOX)
    images.append(np.asarray(canvas, np.uint8))
  return images


# ---------------------------------------------------------------------------------------------------
# Degradation


def _jpeg(image, quality, subsampling):
  """A JPEG round trip of an RGB Pillow image, in memory."""
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=int(quality), subsampling=subsampling)
  buf.seek(0)
  decoded = Image.open(buf)
  decoded.load()
  return decoded


def _jpeg_qualities(noise_level, rng):
  """The qualities of the successive JPEG encodings for one pair (waifu2x's art-model schedule)."""
  if noise_level == 0:
    return [int(rng.integers(85, 96))]
  if noise_level == 1:
    return [int(rng.integers(65, 86))]
  # The first quality's range depends on how many encodings follow (as in waifu2x's
  # pairwise_transform_jpeg_scale), so that none goes below 27.
  times = rng.random()
  if times < 0.6:
    return [int(rng.integers(27, 71))]
  if times < 0.9:
    first = int(rng.integers(37, 71))
    return [first, first - int(rng.integers(5, 11))]
  # both later qualities count down from the first (as in waifu2x), so the third is the lowest
  first = int(rng.integers(52, 71))
  return [first, first - int(rng.integers(5, 16)), first - int(rng.integers(15, 26))]


def _region_along(length, patch, scale, rng):
  """(region start in high-resolution pixels, region length and patch offset in low-resolution
  pixels) along one axis of `length` high-resolution pixels.

  The patch starts anywhere in the image, uniformly (every pixel can be in a patch, none is
  favoured beyond what random crops of one size do); the region adds up to _CONTEXT_MIN + a random
  JPEG phase (0-15) low-resolution pixels before it and _CONTEXT_MIN after, and reaches whole 16-pixel
  blocks where the image allows. At the image's edges the region stops there, as real images do."""
  start = int(rng.integers(length - patch * scale + 1))
  before = min(start // scale, _CONTEXT_MIN + int(rng.integers(_PHASES)))
  region_start = start - before * scale
  wanted = -(-(before + patch + _CONTEXT_MIN) // _PHASES) * _PHASES
  return region_start, min(wanted, (length - region_start) // scale), before


def make_pair(image, rng, *, patch_size, scale, noise_level, nr_rate, filter_weights):
  """One training pair from `image` (uint8 HxWx3, both sides >= patch_size * scale).

  Returns (lr uint8 (p, p, 3), hr uint8 (p*s, p*s, 3)). A region larger than the patch is flipped or
  rotated, downscaled with a filter drawn from `filter_weights` (scale > 1), JPEG-degraded with
  probability `noise_nr_rate(noise_level, nr_rate)`, then cropped to the patch. The random draws that
  choose the crop and filter come before the noise draws, so the same `rng` state gives the same clean
  pair at every noise level.
  """
  p, s = patch_size, scale
  rate = noise_nr_rate(noise_level, nr_rate)
  if min(image.shape[:2]) < p * s:
    raise DataError(f'image of {image.shape[1]}x{image.shape[0]} is smaller than one patch ({p * s})')
  # One of the 8 flips/rotations, applied to the clean region before any degradation (JPEG's grid and
  # quantisation tables keep their real orientation). The crop is placed in the turned image (a numpy
  # view); its pixels are copied in the image's own orientation and turned by Pillow.
  k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
  view = np.rot90(image, k)
  if flip:
    view = view[:, ::-1]
  top, region_h, offset_y = _region_along(view.shape[0], p, s, rng)
  left, region_w, offset_x = _region_along(view.shape[1], p, s, rng)
  crop = view[top:top + region_h * s, left:left + region_w * s]
  region = Image.fromarray(np.ascontiguousarray(np.rot90(crop[:, ::-1] if flip else crop, -k)))
  if _DIHEDRAL[k, flip] is not None:
    region = region.transpose(_DIHEDRAL[k, flip])
  hr = np.asarray(region)[offset_y * s:(offset_y + p) * s, offset_x * s:(offset_x + p) * s]
  lr = region
  if s > 1:
    names, cumulative = _filter_table(filter_weights)
    name = names[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]
    lr = region.resize((region_w, region_h), FILTERS[name])
  if noise_level >= 0 and rng.random() < rate:
    qualities = _jpeg_qualities(noise_level, rng)
    # One chroma layout for every encoding of the pair, as waifu2x and nunif draw it (a re-saved
    # image keeps its subsampling).
    subsampling = 2 * int(rng.integers(2))  # 0: 4:4:4, 2: 4:2:0
    for quality in qualities:
      lr = _jpeg(lr, quality, subsampling=subsampling)
  lr = np.asarray(lr)[offset_y:offset_y + p, offset_x:offset_x + p]
  return np.ascontiguousarray(lr), np.ascontiguousarray(hr)


def make_batch(images, *, seed, step, indices, patch_size, scale, noise_level, nr_rate, filter_weights):
  """Samples `indices` (positions in the global batch) of the batch at `step`, as float32 in [0, 1].

  Sample i depends only on (seed, step, i): its generator is `np.random.default_rng([seed, step, i])`.
  It picks an image with probability proportional to its area (every pixel equally likely), then
  `make_pair`. Returns {'lr': (n, p, p, 3), 'hr': (n, p*s, p*s, 3)}.
  """
  return to_float(make_batch_uint8(images, seed=seed, step=step, indices=indices, patch_size=patch_size,
                                   scale=scale, noise_level=noise_level, nr_rate=nr_rate,
                                   filter_weights=filter_weights))


def make_batch_uint8(images, *, seed, step, indices, **pair_options):
  """`make_batch` before the conversion to float: {'lr', 'hr'} as uint8 (a quarter of the bytes)."""
  cumulative_area = list(itertools.accumulate(im.shape[0] * im.shape[1] for im in images))
  lrs, hrs = [], []
  for i in indices:
    rng = np.random.default_rng([seed, step, i])
    image = images[bisect.bisect_right(cumulative_area, rng.random() * cumulative_area[-1])]
    lr, hr = make_pair(image, rng, **pair_options)
    lrs.append(lr)
    hrs.append(hr)
  return {'lr': np.stack(lrs), 'hr': np.stack(hrs)}


def to_float(batch):
  """uint8 {'lr', 'hr'} -> float32 in [0, 1]."""
  inv = np.float32(1.0 / 255.0)
  return {key: value.astype(np.float32) * inv for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------
# Worker processes: the images in one shared-memory block, mapped (not copied) by every worker.

_WORKER_IMAGES = None  # in a worker process: the images, views into the shared block
SHM_DIR = '/dev/shm'  # where Linux keeps POSIX shared memory
SHM_PREFIX = 'w2x_'  # our blocks: w2x_<creator pid>_<random>


def shm_free_bytes():
  """Bytes free for shared memory (None where unknown: no /dev/shm, as on macOS)."""
  try:
    stat = os.statvfs(SHM_DIR)
  except (OSError, AttributeError):
    return None
  return stat.f_bavail * stat.f_frsize


def remove_stale_blocks():
  """Removes our blocks whose creator is gone: killed together with its resource tracker (say, by
  a SIGKILL to its process group), it could not unlink them, and they would hold memory until reboot."""
  try:
    names = os.listdir(SHM_DIR)
  except OSError:
    return
  for name in names:
    pid = name[len(SHM_PREFIX):].split('_', 1)[0]
    if name.startswith(SHM_PREFIX) and pid.isdigit() and not processes.pid_alive(int(pid)):
      try:
        os.remove(os.path.join(SHM_DIR, name))
        logging.warning('Removed %s, shared memory left by a killed training process', name)
      except OSError:
        pass


class SharedImages:
  """The images copied once into one shared-memory block; `spec` lets another process map them."""

  def __init__(self, images):
    remove_stale_blocks()
    offsets = [0] + list(itertools.accumulate(im.nbytes for im in images))
    free = shm_free_bytes()
    if free is not None and offsets[-1] > free:
      # Writing past a full /dev/shm kills the process with SIGBUS, so refuse before (Docker's
      # default is 64 MB).
      raise DataError(f'{SHM_DIR}: {free / 2 ** 20:.0f} MB free, the worker processes need '
                      f'{offsets[-1] / 2 ** 20:.0f} MB for the training images; enlarge it (docker run '
                      '--shm-size=...) or set config.data.num_workers=0 (threads)')
    self.block = shared_memory.SharedMemory(
        name=f'{SHM_PREFIX}{os.getpid()}_{os.urandom(4).hex()}', create=True, size=max(1, offsets[-1]))
    try:
      self.spec = (self.block.name, [(o, im.shape) for o, im in zip(offsets, images)])
      for (offset, shape), image in zip(self.spec[1], images):
        np.ndarray(shape, np.uint8, self.block.buf, offset)[...] = image
    except BaseException:
      self.close()
      raise

  def close(self):
    if self.block is not None:
      self.block.close()
      self.block.unlink()
      self.block = None


def _views(buffer, layout):
  views = [np.ndarray(shape, np.uint8, buffer, offset) for offset, shape in layout]
  for view in views:
    view.flags.writeable = False  # one block serves every worker: a stray write would reach all
  return views


def _exit_with_parent():
  """Exits this worker once the process that started it is gone (killed: it cannot close us)."""
  parent = multiprocessing.parent_process()
  multiprocessing.connection.wait([parent.sentinel])  # ready at once if it is already gone
  os._exit(0)


def _init_worker(spec):
  """Worker start: map the shared images; exit by itself should the training process die without
  closing the pool.

  SIGINT and SIGTERM aimed at the training run (a Ctrl-C, `timeout`, `kill -- -PGID`) are for the
  training process alone, which stops at a step boundary and then closes the pool: the worker
  leaves its process group. It was started with both signals blocked (see
  `PatchGenerator._produce`), so one sent during its start-up is pending: SIG_IGN discards it.
  SIGTERM then gets its default action back, which the executor uses to end the remaining workers
  should one of them die."""
  global _WORKER_IMAGES  # pylint: disable=global-statement
  os.setpgrp()
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  if hasattr(signal, 'pthread_sigmask'):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  threading.Thread(target=_exit_with_parent, daemon=True).start()
  name, layout = spec
  # The creator alone owns the block; Python 3.13+ can say so (3.12 registers it twice, harmlessly).
  kwargs = {'track': False} if sys.version_info >= (3, 13) else {}
  block = shared_memory.SharedMemory(name=name, **kwargs)
  _WORKER_IMAGES = (block, _views(block.buf, layout))


def _worker_make_batch(seed, step, indices, options):
  return make_batch_uint8(_WORKER_IMAGES[1], seed=seed, step=step, indices=indices, **options)


class _WorkerPool:
  """The worker processes and the shared images they read; `close()` is idempotent and also runs at
  interpreter exit (weakref.finalize in PatchGenerator) should nobody call it."""

  _JOIN_S = 10.0  # a worker finishes the batch in hand well within this; then it is killed

  def __init__(self, images, num_workers):
    self.shared = SharedImages(images)
    try:
      self.executor = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker,
          initargs=(self.shared.spec,))
    except BaseException:
      self.shared.close()
      raise

  def submit(self, *args):
    return self.executor.submit(_worker_make_batch, *args)

  def close(self):
    if self.executor is not None:
      # A worker finishes the batch in hand and exits; one that hangs is killed, not waited on.
      workers = list((getattr(self.executor, '_processes', None) or {}).values())
      if getattr(self.executor, '_broken', False):
        # A worker died: the executor's thread terminates and joins the rest, holding the lock that
        # shutdown() takes. No need to wait for that.
        for process in workers:
          process.kill()
      self.executor.shutdown(wait=False, cancel_futures=True)
      deadline = time.monotonic() + self._JOIN_S
      for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
          process.kill()
          process.join()
      self.executor.shutdown(wait=True)
      self.executor = None
    self.shared.close()


# ---------------------------------------------------------------------------------------------------
# Background producer


class PatchGenerator:
  """Iterates `(step, batch)` from `start_step` on, with this process's slice of each global batch.

  `data_cfg` is `config.data` (patch_size, noise_level, nr_rate, filter_weights, num_threads,
  num_workers, prefetch). Thread w of n makes the batches of steps start + w, start + w + n, ...
  into its own bounded queue and the consumer reads the queues in turn, so the order (and each batch,
  see `make_batch`) does not depend on the thread count. With `num_workers` > 0 the threads hand the
  work to that many processes (started with 'spawn': forking a process that runs JAX can deadlock)
  and only convert the results to float, so batches are the same either way. An error in a thread
  or worker is raised by the consumer. Close it (or use it as a context manager) to stop the threads
  and workers and free the shared memory.
  """

  _POLL_S = 0.05  # how often blocked threads check for close()

  def __init__(self, images, data_cfg, *, scale, batch_size, seed, start_step=0, process_index=0,
               process_count=1):
    if not images:
      raise DataError('PatchGenerator: no training images')
    if batch_size <= 0 or batch_size % process_count:
      raise DataError(f'batch size {batch_size}: must be a positive multiple of the process count '
                      f'({process_count})')
    if not 0 <= process_index < process_count:
      raise DataError(f'process index {process_index}: must be in [0, {process_count})')
    size = min_image_size(data_cfg.patch_size, scale)
    small = [i for i, im in enumerate(images) if min(im.shape[:2]) < size]
    if small:
      raise DataError(f'{len(small)} training images (first: #{small[0]}) are smaller than one '
                      f'{size}x{size} patch')
    check_data_config(data_cfg, scale)  # early, not in a worker
    per_process = batch_size // process_count
    self._images = list(images)
    self._indices = range(process_index * per_process, (process_index + 1) * per_process)
    self._options = dict(patch_size=data_cfg.patch_size, scale=scale, noise_level=data_cfg.noise_level,
                         nr_rate=data_cfg.nr_rate, filter_weights=dict(data_cfg.filter_weights.items()))
    self._seed = seed
    self._next_step = start_step
    self._start_step = start_step
    self._stop = threading.Event()
    num_threads = max(1, int(data_cfg.num_threads))
    num_workers = max(0, int(data_cfg.get('num_workers', 0)))
    # With workers, at least one thread per worker, each with a batch in flight (so about
    # num_workers batches are queued, whatever `prefetch` says).
    num_threads = max(num_threads, num_workers)
    depth = max(1, -(-int(data_cfg.prefetch) // num_threads))
    self._queues = [queue.Queue(maxsize=depth) for _ in range(num_threads)]
    self._threads = [threading.Thread(target=self._produce, args=(w,), name=f'PatchGenerator-{w}',
                                      daemon=True) for w in range(num_threads)]
    self._pool = _WorkerPool(self._images, num_workers) if num_workers else None
    self._release = weakref.finalize(self, self._pool.close) if self._pool else (lambda: None)
    for thread in self._threads:
      thread.start()

  def _produce(self, worker):
    if self._pool is not None and hasattr(signal, 'pthread_sigmask'):
      # Worker processes started from this thread inherit its signal mask: a Ctrl-C that reaches
      # the process group while they import cannot kill them. The main thread still gets it.
      signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    out = self._queues[worker]
    for step in itertools.count(self._start_step + worker, len(self._threads)):
      if self._stop.is_set():
        return
      try:
        item = (step, self._make(step), None)
      except concurrent.futures.CancelledError:
        return  # closing
      except BaseException as error:  # pylint: disable=broad-except; handed to the consumer
        if self._stop.is_set():
          return
        item = (step, None, error)
      while not self._stop.is_set():
        try:
          out.put(item, timeout=self._POLL_S)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def _make(self, step):
    if self._pool is None:
      return make_batch(self._images, seed=self._seed, step=step, indices=self._indices, **self._options)
    try:
      future = self._pool.submit(self._seed, step, self._indices, self._options)
      while True:
        try:
          return to_float(future.result(timeout=self._POLL_S))
        except concurrent.futures.TimeoutError:
          if self._stop.is_set():
            future.cancel()
            raise concurrent.futures.CancelledError from None
    except concurrent.futures.process.BrokenProcessPool as error:
      raise DataError(f'a patch worker process died ({error}); '
                      'config.data.num_workers=0 makes the patches in this process') from error

  def __iter__(self):
    return self

  def __next__(self):
    source = self._queues[(self._next_step - self._start_step) % len(self._queues)]
    while True:
      if self._stop.is_set():
        raise StopIteration
      try:
        step, batch, error = source.get(timeout=self._POLL_S)
        break
      except queue.Empty:
        continue
    if error is not None:
      self.close()
      raise error
    assert step == self._next_step, (step, self._next_step)
    self._next_step += 1
    return step, batch

  def close(self):
    """Stops and joins the producer threads (they poll, so this returns within about _POLL_S), then
    the worker processes (each finishes the batch in hand), and frees the shared images."""
    self._stop.set()
    for thread in self._threads:
      if thread is not threading.current_thread():
        thread.join()
    self._release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
