"""The upscale command: `python -m w2x_jax.upscale -i INPUT -o OUTPUT [options]`.

INPUT is an image, a folder (searched recursively for images; the tree is mirrored under OUTPUT)
or a text file (.txt) listing one path a line (relative to the list's folder; '#' starts a
comment), whose outputs all go into the folder OUTPUT. For a single image, OUTPUT is the output
file, or a folder (existing, or ending with '/') to write it into.

Models: without -m, `-n N` and `-s S` pick the shipped models in w2x_jax/weights/: scale 2x passes
use `scale2x_noiseN` for the first pass and `scale2x_noisenone` for the others (denoising only
once), and -s 1 uses `noiseN`; a factor the passes do not reach exactly (1.5, 3) takes the passes
past it and a Lanczos downscale. `-m` takes a shipped model's name or a checkpoint folder (an
exported model or a training workdir); that one model then does every pass (for -s as above;
without -s it runs once; a scale-1 model runs once and Lanczos does any resize), and -n is
ignored.

Every output is written to a temporary file beside it and renamed, so no partial file is ever
left. Files that cannot be read or written are reported and the others go on; the run ends with
"N done, M skipped, K failed" and exits 1 if any failed (2 on bad arguments).

With --coordinator_address, --num_processes and --process_id (or --distributed=auto on a cluster),
several processes (hosts) share the work: each takes every n-th file of the same sorted listing and
runs it on its own devices; the file errors are printed by the process that met them, the progress
bar (its own share) and the one summary of all by process 0, and every process exits 1 if any file
failed anywhere.
"""

import argparse
import math
import os
import signal
import sys
import warnings
import zlib

import jax
import numpy as np
from PIL import Image
import tqdm

from w2x_jax import compilation_cache
from w2x_jax import conv
from w2x_jax import distributed
from w2x_jax import image_io
from w2x_jax import inference

PROG = 'w2x_jax.upscale'
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
NOISE_LEVELS = (-1, 0, 1, 2, 3)
SCALES = (1, 2, 4, 8)  # the web page's choices
MAX_SCALE = 16
DEFAULT_NOISE = 0
DEFAULT_SCALE = 2
LIST_SUFFIXES = ('.txt',)
TILE_BAR_MIN = 16  # images of fewer tiles get no tile progress bar


# Shipped beside the defaults and picked with -m NAME: the reproductions of the DCSCN paper's protocol
# (Y channel, bicubic downscaling alone; the README gives their benchmark figures).
EXTRA_MODELS = ('paper_c_dcscn_y_scale2x', 'paper_espcn_su_scale2x')


def shipped_names(extra=False):
  """The default models (-n/-s pick among them), and with `extra` the EXTRA_MODELS too."""
  return tuple([f'scale2x_noise{"none" if n < 0 else n}' for n in NOISE_LEVELS]
               + [f'noise{n}' for n in NOISE_LEVELS if n >= 0]) + (EXTRA_MODELS if extra else ())


def shipped_model(noise, upscale):
  """The shipped model for one pass: a 2x one (`upscale`) or a scale-1 denoiser."""
  if upscale:
    return f'scale2x_noise{"none" if noise < 0 else noise}'
  return f'noise{noise}'


class ModelError(Exception):
  """A model that cannot be found or loaded: fatal for the run (one line)."""


class JobError(Exception):
  """One file that cannot be processed (one line, naming the file)."""


def load_model(name_or_path, weights_dir=None):
  """(model, params, config) of a checkpoint folder, or of a shipped model by name (looked up in
  `weights_dir`, by default WEIGHTS_DIR)."""
  from w2x_jax import checkpoint  # pylint: disable=g-import-not-at-top (orbax: only when needed)
  weights_dir = WEIGHTS_DIR if weights_dir is None else weights_dir
  if os.path.isdir(name_or_path):
    path = name_or_path
  elif name_or_path in shipped_names(extra=True):
    path = os.path.join(weights_dir, name_or_path)
    if not os.path.isdir(path):
      raise ModelError(f'shipped model {name_or_path!r} is not installed ({path}); '
                       'pass -m CHECKPOINT_DIR (an exported model folder or a training workdir)')
  else:
    raise ModelError(f'{name_or_path}: no such model folder, nor a shipped model name '
                     f'({", ".join(shipped_names(extra=True))})')
  try:
    return checkpoint.restore_model(path)
  except (checkpoint.CheckpointError, OSError, ValueError) as e:
    raise ModelError(f'{path}: cannot load the model: {e}') from e


def _image_suffixes():
  Image.init()
  return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _output_name(rel, fmt):
  return os.path.splitext(rel)[0] + image_io.SUFFIXES[fmt]


def list_jobs(input_path, output, fmt, errors=None):
  """[(source, destination)] for a file, a folder or a list file; `fmt` is the output format.
  Folders that cannot be listed are appended to `errors`, one line each; a list file that cannot
  be read raises OSError."""
  if os.path.isdir(input_path):
    jobs = []

    def cannot_list(e):
      if errors is not None:
        errors.append(f'{e.filename}: cannot list the folder: {e.strerror or e}')

    # The output tree is skipped where it lies inside the input.
    for src in image_io.list_files(input_path, _image_suffixes(), cannot_list, skip=[output]):
      rel = os.path.relpath(src, input_path)
      jobs.append((src, os.path.join(output, _output_name(rel, fmt))))
    return jobs
  if os.path.splitext(input_path)[1].lower() in LIST_SUFFIXES and os.path.isfile(input_path):
    base = os.path.dirname(input_path)
    jobs = []
    # -sig: a BOM (Notepad) is not a path; surrogateescape: bytes that are not UTF-8 stay the
    # file name's bytes.
    with open(input_path, encoding='utf-8-sig', errors='surrogateescape') as f:
      for line in f:
        line = line.strip()
        if line and not line.startswith('#'):
          src = os.path.join(base, os.path.expanduser(line))
          jobs.append((src, os.path.join(output, _output_name(os.path.basename(src), fmt))))
    return jobs
  if os.path.isdir(output) or output.endswith(os.sep):
    return [(input_path, os.path.join(output, _output_name(os.path.basename(input_path), fmt)))]
  return [(input_path, output)]


def target_size(height, width, args):
  """(height, width) asked by --width/--height (one alone keeps the aspect ratio), or None."""
  if not args.width and not args.height:
    return None
  if args.width and args.height:
    return args.height, args.width
  if args.width:
    return max(1, round(height * args.width / width)), args.width
  return args.height, max(1, round(width * args.height / height))


def resize(image, height, width):
  """High-quality (Lanczos) resize of float HxWxC; alpha is premultiplied so that hidden colour
  does not bleed into the visible edge."""
  image = np.asarray(image, np.float32)
  c = image.shape[-1]
  alpha = c in (2, 4)
  src = image.copy() if alpha else image
  if alpha:
    src[..., :-1] *= src[..., -1:]
  out = np.empty((height, width, c), np.float32)
  for i in range(c):
    channel = Image.fromarray(np.ascontiguousarray(src[..., i]))  # mode 'F'
    out[..., i] = np.asarray(channel.resize((width, height), Image.Resampling.LANCZOS))
  if alpha:  # divided by the alpha as resized, overshoot and all: clipped first, a flat fill's
    # edge had kept Lanczos's overshoot in its colour
    a = out[..., -1:]
    out[..., :-1] = np.where(a > 1e-4, out[..., :-1] / np.maximum(a, 1e-4), 0.0)
  return np.clip(out, 0.0, 1.0, out=out)


# A name's control characters as escapes: a newline in a file name had split its line in two.
_CONTROL_ESCAPES = {i: repr(chr(i))[1:-1] for i in [*range(32), 127]}


def _say(msg):
  """A line on stderr that does not break a progress bar (a file name's bytes that are not UTF-8,
  as os.walk or a list gives them, written as escapes of those bytes: caf\\xe9.png; its control
  characters too: new\\nline.png)."""
  try:
    raw = msg.encode('utf-8', 'surrogateescape')  # the names' own bytes back
  except UnicodeEncodeError:
    raw = msg.encode('utf-8', 'backslashreplace')
  text = raw.decode('utf-8', 'backslashreplace').translate(_CONTROL_ESCAPES)
  tqdm.tqdm.write(text, file=sys.stderr)


class Runner:
  """The models of a run: one Upscaler per model, shared by every file (one compilation per tile
  shape), loaded on first use."""

  def __init__(self, args, load_fn, upscalers=None):
    self.args = args
    self.load_fn = load_fn
    # `upscalers`: a dict shared with other Runners (the web server keeps one for its lifetime).
    self._upscalers = {} if upscalers is None else upscalers

  def upscaler(self, key):
    if key not in self._upscalers:
      model, params, config = self.load_fn(key)
      try:  # a tile size the margin does not fit: once for the run, not once per file
        upscaler = inference.Upscaler(params, config.model, model=model,
                                      tile_size=self.args.tile_size, batch_size=self.args.batch_size)
      except ValueError as e:
        raise ModelError(f'model {key}: --tile-size: {e}') from e
      self._upscalers[key] = upscaler
      if not self.args.quiet:
        margin = upscaler.margin(3)
        overhead = inference.margin_overhead(config.model, upscaler.tile_size)
        _say(f'{PROG}: model {key}: tiles of up to {upscaler.tile_size} px overlapping by {margin} px, '
            f'{overhead:.0%} of their input pixels on the overlap '
            '(--tile-size trades it for memory)')
    return self._upscalers[key]

  def scales(self, keys):
    """The scale of each pass's model."""
    return [self.upscaler(key).scale for key in keys]

  def passes(self, height, width):
    """([model key per pass], (height, width) to resize to at the end, or None)."""
    args = self.args
    target = target_size(height, width, args)
    if args.model:
      scale = self.upscaler(args.model).scale
      if target is None:
        target = _scale_target(height, width, args.scale, scale)
      if target is None:
        count = 1 if args.scale is None else _passes_for(args.scale, scale, args.model)
      else:
        count = max(1, _passes_to_reach(height, width, target, scale))
      return [args.model] * count, target
    noise = DEFAULT_NOISE if args.noise_level is None else args.noise_level
    if target is None:
      target = _scale_target(height, width, args.scale, 2)
    if target is None:
      count = round(math.log2(DEFAULT_SCALE if args.scale is None else args.scale))
    else:
      count = _passes_to_reach(height, width, target, 2)
    if count == 0:
      return ([shipped_model(noise, False)] if noise >= 0 else []), target
    return [shipped_model(noise, True)] + [shipped_model(-1, True)] * (count - 1), target


def _is_power(value, base):
  """Whether `value` is base ** n for an integer n >= 0."""
  if base == 1:
    return value == 1
  return value >= 1 and base ** round(math.log(value, base)) == value


def _scale_target(height, width, scale, model_scale):
  """The output size of a -s that passes of `model_scale` do not reach exactly (1.5, 3): they
  go past it and Lanczos brings the result down; None where they reach it (or no -s)."""
  if scale is None or _is_power(scale, model_scale):
    return None
  return max(1, round(height * scale)), max(1, round(width * scale))


def _passes_for(wanted, model_scale, name):
  if model_scale == 1:
    return 1
  count = round(math.log(wanted, model_scale)) if wanted > 1 else 0
  if count < 1 and wanted == 1:
    raise ModelError(f'{name}: -s 1 with a {model_scale}x model runs nothing; a scale-1 model '
                     '(-m noiseN) denoises at -s 1')
  if count < 1 or model_scale ** count != wanted:
    raise ModelError(f'{name}: -s {wanted} is not a power (>= 1) of the model scale {model_scale}')
  return count


def _passes_to_reach(height, width, target, scale):
  if scale == 1:
    return 1
  count = 0
  while height * scale ** count < target[0] or width * scale ** count < target[1]:
    count += 1
  return count


class _TileBar:
  """A progress bar over the tiles of one large image (none for small ones, or when quiet)."""

  def __init__(self, quiet, desc):
    self.quiet, self.desc, self.bar = quiet, desc, None

  def __call__(self, done, total):
    if self.quiet or total < TILE_BAR_MIN:
      return
    if self.bar is None:  # disable=None: no bar where stderr is not a terminal (a log file)
      self.bar = tqdm.tqdm(total=total, desc=self.desc, unit='tile', leave=False, position=1,
                           file=sys.stderr, dynamic_ncols=True, disable=None)
    self.bar.update(done - self.bar.n)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _same_file(a, b):
  try:
    return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
  except OSError:
    return False


def upscale_loaded(image, info, fmt, runner, args, name, pass_progress=None):
  """One image as read_image gave it (`image`, `info`) through the passes that `args` ask for;
  returns the array to give write_image for `fmt`. `pass_progress(i, passes)` may return a
  progress(done_tiles, total_tiles) callable for pass i (with an optional close()). Raises
  JobError naming `name`, or ModelError."""
  if info.has_alpha and args.background is not None:
    image = image_io.composite(image, args.background)
  elif info.has_alpha and fmt == 'jpeg' and image[..., -1].min() >= 1.0:
    image = image_io.composite(image, (1.0, 1.0, 1.0))  # opaque everywhere: alpha just dropped
  elif info.has_alpha and fmt == 'jpeg':
    raise JobError(f'{name}: has alpha, which JPEG cannot store; use -f png or webp, or '
                   '--background COLOR to composite it')
  keys, target = runner.passes(image.shape[0], image.shape[1])
  total = math.prod(runner.scales(keys))
  height, width = target or (image.shape[0] * total, image.shape[1] * total)
  if max(height, width) > image_io.MAX_SIDES[fmt]:  # before the passes, not after their work
    raise JobError(f'{name}: the output would be {width}x{height}, over the '
                   f'{image_io.MAX_SIDES[fmt]} pixels per side that {fmt} can store; choose '
                   'PNG or a smaller output')  # (words for the command and the web page alike)
  out_dtype = image_io.output_dtype(info, fmt)
  for i, key in enumerate(keys):
    last = i == len(keys) - 1 and target is None
    bar = pass_progress(i, len(keys)) if pass_progress is not None else None
    try:
      image = inference.upscale_image(runner.upscaler(key), image, tta=args.tta, progress=bar,
                                      out_dtype=out_dtype if last else np.float32,
                                      fill_alpha=i == 0,
                                      alpha_upscaler=_alpha_upscaler(runner, key, image))
    finally:
      if hasattr(bar, 'close'):
        bar.close()
  if target is not None:
    image = resize(image, *target)
  return image


def _alpha_upscaler(runner, key, image):
  """The shipped 2x model without denoising for the alpha of a shipped denoising pass (PNG alpha
  carries no JPEG noise; waifu2x does the same), where installed; else None (the pass's own)."""
  plain = shipped_model(-1, True)
  if (runner.args.model or image.shape[-1] not in (2, 4) or key == plain
      or not key.startswith('scale2x_noise')):
    return None
  try:
    alpha, colour = runner.upscaler(plain), runner.upscaler(key)
  except ModelError:
    return None
  # Only a model of the same scale and tiles (margin): its progress continues the colour's.
  same = (alpha.scale == colour.scale and alpha.tile_size == colour.tile_size
          and alpha.margin(1) == colour.margin(image.shape[-1]))
  return alpha if same else None


def _check_writable(dst):
  """JobError now, before the work, where `dst`'s folder cannot be made or written to."""
  folder = os.path.dirname(os.path.abspath(dst))
  while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise JobError(f'{dst}: cannot write: {folder} is not a folder')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise JobError(f'{dst}: cannot write: {folder} is read-only or not writable')


def format_bytes(n):
  for unit, size in (('GB', 1 << 30), ('MB', 1 << 20), ('KB', 1 << 10)):
    if n >= size:
      return f'{n / size:.3g} {unit}'
  return f'{n} bytes'


def _read_number(path, field=None):
  """The integer in a /proc or /sys file (`field`: that line's first number), or None."""
  try:
    with open(path, encoding='ascii') as f:
      for line in f:
        if field is None:
          return int(line.split()[0])
        if line.startswith(field):
          return int(line.split()[1])
  except (OSError, ValueError, IndexError):
    pass
  return None


def available_memory():
  """Bytes of memory free for this process, or None where unknown: Linux's MemAvailable, or less
  where a container's memory limit (cgroup v2) leaves less."""
  free = _read_number('/proc/meminfo', 'MemAvailable:')
  free = free * 1024 if free is not None else None
  limit = _read_number('/sys/fs/cgroup/memory.max')  # 'max' (no limit) reads as None
  used = _read_number('/sys/fs/cgroup/memory.current')
  if used is not None:  # less the page cache the kernel can drop (the working set, as Docker's)
    used -= _read_number('/sys/fs/cgroup/memory.stat', 'inactive_file ') or 0
  if limit is not None and used is not None:
    free = min(free, limit - used) if free is not None else limit - used
  return free


def memory_needed(height, width, channels, bits, scales, target=None):
  """Bytes the command holds at its peak for one image: Pillow's pixels and the float32 array
  read from them; in each pass its float32 input (in the first, with alpha, its filled copy) and
  its output (float32 but for the last pass's, in the output's integer type); the result twice
  while it is written (the array and Pillow's copy); a --width/--height resize from float32.
  Times 1.5: the process's peak resident memory grew 1.43x the bytes counted so from a 1000x1000
  to a 3000x3000 RGB image at -s 2 (49 against 34 bytes per input pixel; freed memory is kept for
  reuse, conv.keep_freed_memory, and the tiles' batches add theirs)."""
  pixels = height * width * channels
  out_bytes = 2 if bits == 16 else 1
  peak = pixels * (out_bytes + 4)
  total = 1
  for i, s in enumerate(scales):
    last = i == len(scales) - 1 and target is None
    filled = i == 0 and channels in (2, 4)  # alpha: the copy with transparent colour filled
    peak = max(peak, pixels * total ** 2 * 4 * (2 if filled else 1)
               + pixels * (total * s) ** 2 * (out_bytes if last else 4))
    total *= s
  if target is not None:
    # The resize holds the passes' float32 result, its premultiplied copy (alpha), its own float32
    # output and one channel's planes (the input's copy for Pillow, the resized one and its
    # array); the float32 result is rounded (two float32 temporaries) and copied as it is written.
    # Measured for 3000x3000 RGBA at -s 1.5: 2.7 GB peak resident, where 1.26 GB had been estimated.
    before, after = pixels * total ** 2, target[0] * target[1] * channels
    premultiplied = 2 if channels in (2, 4) else 1
    peak = max(peak, before * 4 * premultiplied + after * 4 + (before * 4 + after * 8) // channels,
               after * (4 * 3 + 2 * out_bytes))
  else:
    peak = max(peak, 2 * pixels * total ** 2 * out_bytes)
  return int(1.5 * peak)


def check_memory(src, runner, advice='a smaller -s or --width, or split the image'):
  """JobError before the work where one image would not fit in the free memory (it would be
  killed, the rest of a folder with it, or the web page's server with every job); Pillow's
  decompression-bomb limit, off in the command, decided by this instead. `advice` ends the line."""
  width, height, channels, bits = image_io.peek(src)
  background = getattr(runner.args, 'background', None)
  if background is not None:  # composited before the passes
    channels = image_io.composited_channels(channels, background)
  keys, target = runner.passes(height, width)
  need = memory_needed(height, width, channels, bits, runner.scales(keys), target)
  free = available_memory()
  if free is not None and need > free:
    raise JobError(f'{src}: {width}x{height} needs about {format_bytes(need)} of memory, '
                   f'{format_bytes(free)} free; {advice}')


def process(src, dst, fmt, runner, args, written=None):
  """Upscales one file; 'done' or 'skipped', or raises JobError / ImageError (one line).
  `written`: {(st_dev, st_ino): source} of the outputs this run wrote, so that two names of one
  file (A.png and a.png on a case-insensitive file system) are a clash, not a skip."""
  if os.path.exists(dst):
    if os.path.isdir(dst):
      raise JobError(f'{dst}: cannot write: a folder is there')
    if _same_file(src, dst):
      raise JobError(f'{src}: is its own output; choose another output')
    st = os.stat(dst)
    if written and (st.st_dev, st.st_ino) in written:
      raise JobError(f'{src}: has the same output as {written[st.st_dev, st.st_ino]} ({dst})')
    if not args.overwrite:
      return 'skipped'
  _check_writable(dst)
  # Files the user chose: their size is checked against the free memory, not against Pillow's
  # fixed limit for untrusted input (179 megapixels, a warning from 89).
  with image_io.pixel_limit(None), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    check_memory(src, runner)
    image, info = image_io.read_image(src)
  # Pillow's own warnings (a camera's "Corrupt EXIF data") name no file and, printed raw, broke
  # the progress bar: one line each, naming the file.
  for message in dict.fromkeys(str(w.message).strip().split('\n')[0] for w in caught):
    if not args.quiet:
      _say(f'{src}: warning: {message}')
  if info.frames > 1:  # even with --quiet: the other frames are not in the output
    _say(f'{src}: {info.frames} frames (an animation or pages); only the first is upscaled')
  image = upscale_loaded(image, info, fmt, runner, args, src,
                         lambda i, n: _TileBar(args.quiet, f'pass {i + 1}/{n}'))
  parent = os.path.dirname(os.path.abspath(dst))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise JobError(f'{dst}: cannot write: {e.strerror or e}') from e
  image_io.write_image(dst, image, info, fmt, args.quality)
  if written is not None:
    st = os.stat(dst)
    written[st.st_dev, st.st_ino] = src
  return 'done'


def _quality(text):
  value = int(text)
  if not 0 <= value <= 100:
    raise argparse.ArgumentTypeError(f'{value} is not in 0..100')
  return value


def _scale(text):
  """-s: a factor in (0, MAX_SCALE]; whole ones as int (messages say 4, not 4.0)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not 0 < value <= MAX_SCALE:
    raise argparse.ArgumentTypeError(f'{text} is not in (0, {MAX_SCALE}]')
  return int(value) if value.is_integer() else value


def positive_int(text):
  """An argparse type: an integer >= 1 (also the web page's and the evaluate command's)."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} must be >= 1')
  return value


def _colour(text):
  try:
    return image_io.parse_color(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog=f'python -m {PROG}', description='waifu2x-style 2x super-resolution and JPEG noise '
      'removal of images, folders (recursive) or lists of paths.')
  p.add_argument('-i', '--input', required=True, help='an image, a folder or a .txt list of paths')
  p.add_argument('-o', '--output', required=True,
                 help='the output file (single image) or folder (folders, lists)')
  p.add_argument('-n', '--noise-level', type=int, choices=NOISE_LEVELS, default=None,
                 help=f'JPEG noise removal: -1 none, 0..3 (default {DEFAULT_NOISE}); '
                 'ignored with -m')
  p.add_argument('-s', '--scale', type=_scale, default=None,
                 help='upscaling: repeated 2x passes, denoising only in the first; a factor the '
                 'passes do not reach exactly (1.5, 3) takes one pass more and a Lanczos downscale '
                 f'(default {DEFAULT_SCALE}; with -m: passes of that model, one for a scale-1 model, '
                 f'-m noiseN, and Lanczos the whole resize; at most {MAX_SCALE})')
  p.add_argument('--width', type=positive_int, help='output width: 2x passes, then a Lanczos '
                 'downscale to it (with --height alone, the aspect ratio is kept; with a scale-1 '
                 'model, -m noiseN, one pass and Lanczos does the whole resize)')
  p.add_argument('--height', type=positive_int, help='output height (see --width)')
  p.add_argument('-m', '--model', help='a shipped model name or a checkpoint folder; it does every '
                 'pass')
  p.add_argument('--tile-size', type=positive_int, default=inference.DEFAULT_TILE_SIZE,
                 help='tile side in input pixels, margins included (default %(default)s; more '
                 'than twice the model\'s margin, which the run prints)')
  p.add_argument('--batch-size', type=positive_int, default=None,
                 help='tiles per step, rounded up to a multiple of the devices (default: one '
                 'per device)')
  p.add_argument('--tta', action='store_true',
                 help='test-time augmentation: average the 8 flips and rotations (8x slower)')
  p.add_argument('-f', '--format', choices=('png', 'webp', 'jpeg', 'jpg'), default=None,
                 help='output format (default: png, or the output file\'s suffix)')
  p.add_argument('-q', '--quality', type=_quality, default=image_io.DEFAULT_QUALITY,
                 help='JPEG/WebP quality 0..100; WebP 100 is lossless (default %(default)s)')
  p.add_argument('--background', type=_colour, default=None, metavar='COLOR',
                 help='composite images with alpha over COLOR (e.g. white, #808080): needed for '
                 'JPEG output of such images')
  p.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  p.add_argument('--quiet', action='store_true', help='no progress bars nor device line')
  g = p.add_argument_group(
      'several processes (hosts)', 'every process runs the same command with its own --process_id '
      'and takes every n-th file; process 0 prints the summary of all')
  g.add_argument('--coordinator_address', '--coordinator-address', metavar='HOST:PORT',
                 help="process 0's address, to join a multi-process run")
  g.add_argument('--num_processes', '--num-processes', type=positive_int, metavar='N',
                 help='processes in the run')
  g.add_argument('--process_id', '--process-id', type=int, metavar='I',
                 help="this process's index in [0, N)")
  g.add_argument('--distributed', choices=distributed.MODES, default=None,
                 help='auto: JAX reads the setup from the cluster (SLURM, Open MPI, TPU); default: '
                 f'${distributed.ENV_VAR}, else off')
  args = p.parse_args(argv)
  if args.scale is not None and (args.width or args.height):
    p.error('-s and --width/--height both set the output size: give one')
  return args


def _job_format(args, single_output):
  """The output format; for a single image written to a named file, its suffix may choose."""
  suffix = os.path.splitext(single_output or '')[1].lower()
  if args.format:
    fmt = image_io.output_format('', args.format)
    if suffix in image_io.SUFFIX_FORMATS and image_io.SUFFIX_FORMATS[suffix] != fmt:
      raise image_io.ImageError(f'{single_output}: its suffix says {image_io.SUFFIX_FORMATS[suffix]}'
                                f' but -f says {fmt}; one of them must change')
    return fmt
  return image_io.output_format(single_output) if suffix else 'png'


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised where the main thread is, to unwind as Ctrl+C does."""


def _terminate(signum, frame):  # pylint: disable=unused-argument
  raise Terminated()


def _flagged(column):
  """'0, 2': the processes whose row of a gathered column is set."""
  return ', '.join(str(i) for i, flag in enumerate(column) if flag)


def _lost_peer(code, exit_hard):
  """`code`, or with `exit_hard` the process's end with it: at a normal exit JAX's shutdown
  barrier would wait for the dead process, then abort (a C++ trace, exit 134) after its
  heartbeat timeout."""
  if exit_hard:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


def main(argv=None, load_model_fn=None, exit_hard=False):
  """Runs the command; returns the exit status. `load_model_fn(name_or_path) -> (model, params,
  config)` replaces the model loading (tests); `exit_hard`: where another process died, end this
  one at once (the command line's; see _lost_peer)."""
  args = parse_args(argv)
  err = _say
  conv.keep_freed_memory_on_cpu()  # before JAX's backend starts (conv.py)
  compilation_cache.enable(program=PROG)  # the next call reuses this one's tile functions
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           args.distributed)
  except distributed.DistributedError as e:
    err(f'{PROG}: {e}')
    return 2
  single = not os.path.isdir(args.input) and not (
      os.path.splitext(args.input)[1].lower() in LIST_SUFFIXES and os.path.isfile(args.input))
  named_output = args.output if single and not (
      os.path.isdir(args.output) or args.output.endswith(os.sep)) else None
  try:
    fmt = _job_format(args, named_output)
  except image_io.ImageError as e:
    err(f'{PROG}: {e}')
    return 2
  # A refusal found here is said, and (several processes) shared below, so that no process waits
  # for one that stopped.
  refusal, all_jobs, listing_errors = None, [], []
  if not single and os.path.exists(args.output) and not os.path.isdir(args.output):
    refusal = f'{args.output}: is a file; the outputs of a folder or a list go in a folder'
  elif os.path.isdir(args.input) and os.path.isdir(args.output) and os.path.samefile(
      args.output, args.input):  # (samefile: also a case-insensitive disk's other spelling)
    refusal = (f'{args.output}: is the input folder: PNG inputs would be their own outputs, and a '
               'second run would take this run\'s outputs as inputs; choose another folder')
  else:
    try:
      all_jobs = list_jobs(args.input, args.output, fmt, listing_errors)
    except OSError as e:
      refusal = f'{args.input}: cannot read the list: {e.strerror or e}'
  if refusal:
    err(f'{PROG}: {refusal}')
    if jax.process_count() == 1:
      return 2
  elif not all_jobs and not listing_errors and not args.quiet and jax.process_index() == 0:
    err(f'{PROG}: no images in {args.input} (suffixes Pillow reads, hidden files skipped)')
  # Decided over the whole list, so that it does not depend on which process gets which file: a
  # file listed twice runs once; of two inputs with one output, the later one fails; an output
  # that is another input fails (it would replace that input, or be skipped as done).
  sources = {os.path.realpath(src): src for src, _ in all_jobs}
  listed, by_output, clashes, unique = set(), {}, {}, []
  for src, dst in all_jobs:
    src_key, dst_key = os.path.realpath(src), os.path.realpath(dst)
    if (src_key, dst_key) in listed:
      continue  # the same file listed twice
    listed.add((src_key, dst_key))
    i = len(unique)
    unique.append((src, dst))
    if dst_key in sources and dst_key != src_key:
      clashes[i] = (f'{src}: its output {dst} is another input ({sources[dst_key]}); choose '
                    'another output')
    elif dst_key in by_output:
      clashes[i] = f'{src}: has the same output as {by_output[dst_key]} ({dst})'
    else:
      by_output[dst_key] = src
  all_jobs = unique
  # Several processes: each takes every n-th file (the listing is the same on all of them, checked
  # here), runs it on its own devices only, and process 0 prints the summary of all.
  rank, size = jax.process_index(), jax.process_count()
  if size > 1:
    listing = '\n'.join(f'{s}\t{d}' for s, d in all_jobs).encode('utf-8', 'surrogateescape')
    try:
      views = distributed.allgather([len(all_jobs), len(listing_errors),
                                     zlib.crc32(listing) & 0x7fffffff, bool(refusal)])
    except Exception as e:  # pylint: disable=broad-except (a process that died or stopped early)
      err(f'{PROG}: the other processes did not answer ({image_io.first_line(e)}); nothing was done')
      return _lost_peer(1, exit_hard)
    if views[:, 3].any():
      if not refusal:
        err(f'{PROG}: stopped: process(es) {_flagged(views[:, 3])} refused the run (see their '
            'lines)')
      return 2
    if (views != views[0]).any():  # each would skip or repeat others' files
      err(f'{PROG}: the processes see different inputs in {args.input} (' + ', '.join(
          f'process {i}: {n} files' + (f', {k} unlistable folders' if k else '')
          for i, (n, k, _, _) in enumerate(views.tolist())) + '); give them all the same view of it')
      return 2
  jobs = list(enumerate(all_jobs))[rank::size]
  show = not args.quiet and rank == 0
  args.quiet = not show  # the other processes draw no bars (tile bars included) nor device line
  if show:
    devices = jax.local_devices()
    where = f'process 0 of {size} (each takes 1 file in {size}) ' if size > 1 else ''
    err(f'{PROG}: {where}running on {len(devices)} device(s): ' + ', '.join(
        f'{d.platform}:{d.id} ({d.device_kind})' for d in devices))
    if args.model and args.noise_level is not None:
      err(f'{PROG}: -n is ignored with -m: the model decides what it removes')
    if (args.scale == 1 and args.noise_level == -1 and not args.model and not args.width
        and not args.height):
      err(f'{PROG}: -s 1 -n -1 runs no model: the images are only converted')
  runner = Runner(args, load_model_fn or load_model)
  counts = {'done': 0, 'skipped': 0, 'failed': 0}
  if rank == 0:  # the same listing on every process: said and counted once
    for line in listing_errors:
      err(line)
    counts['failed'] += len(listing_errors)
  fatal = interrupted = False
  written = {}  # the outputs this run wrote (process)
  # SIGTERM (a scheduler, `kill`) stops like Ctrl+C: the file being written is removed, the
  # counts are said and gathered.
  try:
    # (None: a handler not set from Python, which cannot be put back; the default then)
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate) or signal.SIG_DFL
  except ValueError:  # not the main thread: left as it is
    previous_sigterm = None
  # disable=None: tqdm draws nothing where stderr is not a terminal (redirected to a log file).
  bar = tqdm.tqdm(jobs, unit='file', disable=None if show else True, file=sys.stderr,
                  dynamic_ncols=True)
  try:
    for i, (src, dst) in bar:
      try:
        if i in clashes:
          raise JobError(clashes[i])
        counts[process(src, dst, fmt, runner, args, written)] += 1
      except ModelError:
        raise
      except (JobError, image_io.ImageError) as e:
        counts['failed'] += 1
        err(str(e))
      except Exception as e:  # pylint: disable=broad-except (report it, go on with the rest)
        counts['failed'] += 1
        err(f'{src}: {type(e).__name__}: {image_io.first_line(e)}')  # (src whole: see _say)
  except ModelError as e:
    err(f'{PROG}: {e}')
    fatal = True
  except KeyboardInterrupt as e:  # Ctrl+C or SIGTERM: what is done stays done (never partial)
    err(f'{PROG}: interrupted' + (' (SIGTERM)' if isinstance(e, Terminated) else ''))
    interrupted = 143 if isinstance(e, Terminated) else 130
  finally:
    if previous_sigterm is not None:
      signal.signal(signal.SIGTERM, previous_sigterm)
  bar.close()
  # Every process reaches this gather, a fatal error or Ctrl+C included, so that none waits forever.
  try:
    totals = distributed.allgather([counts['done'], counts['skipped'], counts['failed'], fatal,
                                    bool(interrupted)])
  except KeyboardInterrupt:  # a second Ctrl+C while the others finish
    return 130
  except Exception as e:  # pylint: disable=broad-except (a process that died: one line, no traceback)
    err(f'{PROG}: the other processes did not answer ({image_io.first_line(e)}); this one: '
        f'{counts["done"]} done, {counts["skipped"]} skipped, {counts["failed"]} failed')
    return _lost_peer(1, exit_hard)
  done, skipped, failed, fatal_anywhere, interrupted_anywhere = totals.sum(axis=0).tolist()
  if fatal_anywhere:
    if rank == 0 and not fatal:
      err(f'{PROG}: stopped by a model error on process(es) {_flagged(totals[:, 3])}')
    return 1
  if rank == 0:
    if interrupted_anywhere and not interrupted:
      err(f'{PROG}: interrupted on process(es) {_flagged(totals[:, 4])}')
    print(f'{done} done, {skipped} skipped, {failed} failed')
  if interrupted_anywhere:
    return interrupted or 1
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(exit_hard=True))
