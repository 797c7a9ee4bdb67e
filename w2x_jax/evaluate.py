"""Evaluation pairs made the standard way: bicubic downscale, fixed JPEG noise per level, bicubic baseline."""

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image
from PIL import ImageDraw

from w2x_jax import compilation_cache
from w2x_jax import metrics as metrics_lib
from w2x_jax import upscale

# JPEG qualities used to make the noisy input of each noise level at evaluation (fixed, so runs compare):
# one encoding per quality, in order (levels 2 and 3 encode twice, as real re-saved images are).
EVAL_JPEG_QUALITIES = {-1: (), 0: (90,), 1: (75,), 2: (60, 50), 3: (45, 30)}


def crop_to_multiple(image, scale):
  h, w = image.shape[:2]
  return image[:h - h % scale, :w - w % scale]


def jpeg_roundtrip(image_uint8, quality):
  buf = io.BytesIO()
  Image.fromarray(image_uint8).save(buf, format='JPEG', quality=int(quality))
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert('RGB'))


def add_eval_noise(lr_uint8, noise_level):
  """A model input with the level's fixed JPEG noise (EVAL_JPEG_QUALITIES, encoded in order)."""
  for quality in EVAL_JPEG_QUALITIES[noise_level]:
    lr_uint8 = jpeg_roundtrip(lr_uint8, quality)
  return lr_uint8


def degrade_for_eval(hr_uint8, scale, noise_level):
  """The model's input for a ground-truth image: Pillow bicubic downscale, then the level's JPEG noise."""
  hr = crop_to_multiple(hr_uint8, scale)
  lr = hr
  if scale > 1:
    h, w = hr.shape[:2]
    lr = np.asarray(Image.fromarray(hr).resize((w // scale, h // scale), Image.Resampling.BICUBIC))
  return add_eval_noise(lr, noise_level)


def bicubic_upscale(lr_uint8, scale):
  """The baseline every table compares with (identity for scale 1)."""
  if scale == 1:
    return lr_uint8
  h, w = lr_uint8.shape[:2]
  return np.asarray(Image.fromarray(lr_uint8).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------------
# The evaluation command: python -m w2x_jax.evaluate --model M --dataset DIR [--dataset DIR] ...

HR_SUFFIX, LR_SUFFIX = '_HR', '_LR'
SSIM_WINDOW = 11  # scikit-image's gaussian window (sigma 1.5): the smallest side SSIM can measure
COMPARE_IMAGES = 4  # images per side-by-side PNG
COMPARE_CROP = 96  # high-resolution pixels per crop side


def read_rgb8(path):
  """HxWx3 uint8 of any image the upscale command reads (16-bit scaled down, not clipped; grey
  repeated; alpha dropped; EXIF orientation applied); ImageError naming the file."""
  from w2x_jax import image_io  # pylint: disable=g-import-not-at-top
  image, info = image_io.read_image(path)
  if info.has_alpha:
    image = image[..., :-1]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image_io.to_uint(image, 8)


def load_dataset(folder, scale, noise_level, warn=None):
  """[(name, model input uint8, ground truth uint8, whether the truth is a one-channel file)] of a
  folder.

  A file `X_HR.png` with a partner `X_LR.png` uses that low-resolution file (MATLAB-made in the
  benchmark sets) where it is 1/scale of the ground truth; otherwise the input is made by Pillow
  bicubic downscaling (said once per folder where a partner was of another size). The level's JPEG noise
  is then applied to the input either way. Images too small for SSIM after the border crop are
  skipped, each with a line to `warn`.
  """
  from w2x_jax import data  # pylint: disable=g-import-not-at-top
  from w2x_jax import image_io  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise data.DataError(f'{folder}: no such dataset folder')
  # Each real folder once (glob's '**' went round a link loop, measuring its images again and
  # again); hidden files left out, as glob did.
  unlistable = lambda e: (warn or print)(f'{e.filename}: cannot list the folder, skipped: '
                                         f'{e.strerror or e}')
  listed = sorted(image_io.list_files(folder, data.IMAGE_EXTENSIONS, unlistable))
  paths = [p for p in listed if not os.path.splitext(p)[0].endswith(LR_SUFFIX)]
  pairs, unmatched = [], []
  for path in paths:
    stem, ext = os.path.splitext(path)
    whole = read_rgb8(path)
    hr = crop_to_multiple(whole, scale)
    if min(hr.shape[:2]) < SSIM_WINDOW + 2 * scale:
      (warn or print)(f'{path}: {whole.shape[1]}x{whole.shape[0]} is too small to measure (SSIM '
                      f'needs {SSIM_WINDOW} px a side after the {scale} px border), skipped')
      continue
    lr_path = stem[:-len(HR_SUFFIX)] + LR_SUFFIX + ext if stem.endswith(HR_SUFFIX) else None
    lr = read_rgb8(lr_path) if lr_path and scale > 1 and os.path.exists(lr_path) else None
    if lr is not None and (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
      unmatched.append(lr_path)  # made for another scale (the benchmarks' are 2x): not used
      lr = None
    if lr is not None:
      lr = add_eval_noise(lr, noise_level)
    else:
      lr = degrade_for_eval(hr, scale, noise_level)
    pairs.append((os.path.relpath(path, folder), lr, hr, image_io.peek(path)[2] in (1, 2)))
  if not pairs:
    only_lr = not paths and listed
    hint = f' (only low-resolution {LR_SUFFIX} files: their ground truth is needed)' if only_lr else ''
    raise data.DataError(f'{folder}: no images{hint}')
  if unmatched:
    (warn or print)(f'{folder}: {len(unmatched)} low-resolution files are not 1/{scale} of their '
                    f'ground truth (e.g. {os.path.basename(unmatched[0])}): inputs made by bicubic '
                    'downscaling instead')
  return pairs


def measure(output, target, scale, protocol='data-readme', grey=False):
  """(PSNR, SSIM) on the Y channel with `scale` pixels cropped from every border."""
  return (metrics_lib.psnr_y(output, target, border=scale, protocol=protocol, grey=grey),
          metrics_lib.ssim_y(output, target, border=scale, protocol=protocol, grey=grey))


def side_by_side(rows, scale):
  """One PNG-able array: per image a row of (input enlarged nearest, bicubic, model, ground truth),
  under a line naming the columns (the picture is read on its own, away from the docs)."""
  tiles = []
  for lr, bicubic, output, hr in rows[:COMPARE_IMAGES]:
    side = min(COMPARE_CROP, hr.shape[0], hr.shape[1]) // scale * scale
    top = (hr.shape[0] - side) // 2 // scale * scale
    left = (hr.shape[1] - side) // 2 // scale * scale
    crop = lambda im, s=1: im[top // s:(top + side) // s, left // s:(left + side) // s]
    nearest = np.repeat(np.repeat(crop(lr, scale), scale, 0), scale, 1)
    gap = np.full((side, 4, 3), 255, np.uint8)
    tiles.append(np.concatenate([nearest, gap, crop(bicubic), gap, crop(output), gap, crop(hr)], 1))
  width = max(t.shape[1] for t in tiles)
  tiles = [np.pad(t, ((0, 4), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
  header = Image.new('RGB', (width, 14), 'white')
  draw = ImageDraw.Draw(header)
  column = tiles[0].shape[0]  # the first row's crop side and its gap
  # At scale 1 the baseline is the (noisy) input itself.
  for i, label in enumerate(('input', 'bicubic' if scale > 1 else 'input', 'model', 'truth')):
    draw.text((i * column + 2, 1), label, fill='black')
  return np.concatenate([np.asarray(header)] + tiles, 0)


def evaluate_dataset(predict, pairs, scale, protocol='data-readme'):
  """Per-image and mean figures of the model and of the baseline on the same inputs."""
  images, rows = [], []
  for name, lr, hr, grey in pairs:
    baseline = bicubic_upscale(lr, scale)
    output = predict(lr)
    psnr, ssim = measure(output, hr, scale, protocol, grey)
    base_psnr, base_ssim = measure(baseline, hr, scale, protocol, grey)
    images.append(dict(image=name, psnr=psnr, ssim=ssim, baseline_psnr=base_psnr,
                       baseline_ssim=base_ssim))
    rows.append((lr, baseline, output, hr))
  mean = lambda key: float(np.mean([r[key] for r in images]))
  summary = dict(images=len(images), psnr=mean('psnr'), ssim=mean('ssim'),
                 baseline_psnr=mean('baseline_psnr'), baseline_ssim=mean('baseline_ssim'))
  summary['psnr_gain'] = summary['psnr'] - summary['baseline_psnr']
  return summary, images, rows


def json_safe(value):
  """`value` with non-finite floats as None: JSON has no Infinity or NaN (a flat image reproduced
  exactly reads inf dB), and strict readers (JavaScript's JSON.parse) refuse a file with them."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [json_safe(v) for v in value]
  return None if isinstance(value, float) and not np.isfinite(value) else value


def make_predictor(model_name, tta, tile_size=None):
  """(predict(lr uint8) -> uint8, scale, description, the noise level it was trained for) for a
  model name/folder, or 'bicubic' (None, None, 'bicubic', None)."""
  if model_name == 'bicubic':
    return None, None, 'bicubic', None
  from w2x_jax import inference  # pylint: disable=g-import-not-at-top
  model, params, config = upscale.load_model(model_name)
  upscaler = inference.Upscaler(params, config.model, model=model, tile_size=tile_size)

  def predict(lr_uint8):
    out = upscaler(lr_uint8.astype(np.float32) / 255.0, tta=tta)
    return metrics_lib.to_uint8_range(out).astype(np.uint8)

  return (predict, int(config.model.scale), f'{model_name} ({config.model.name})',
          config.get('data', {}).get('noise_level'))


def main(argv=None):
  """The command; Ctrl+C ends it in one line, exit 130 (the --json file is written only at the
  end, so it is never partial)."""
  try:
    return _main(argv)
  except KeyboardInterrupt:
    print('w2x_jax.evaluate: interrupted', file=sys.stderr)
    return 130


def _main(argv):
  parser = argparse.ArgumentParser(
      prog='w2x_jax.evaluate', description='PSNR/SSIM (Y channel, border cropped) of a model and of '
      'bicubic on the same inputs, per dataset.')
  parser.add_argument('--model', '-m', required=True,
                      help="a shipped model's name, a checkpoint or exported folder, or 'bicubic'")
  parser.add_argument('--dataset', action='append', required=True, metavar='DIR',
                      help='a folder of ground-truth images (X_HR.png + X_LR.png pairs are used as '
                      'given); repeatable')
  parser.add_argument('--noise-level', '-n', type=int, default=None, choices=sorted(EVAL_JPEG_QUALITIES),
                      help='JPEG noise on the input at fixed qualities per level (default: the '
                      'level the model was trained for; -1 for bicubic): '
                      + ', '.join(f'{k}: {list(v)}' for k, v in EVAL_JPEG_QUALITIES.items()))
  positive = upscale.positive_int
  parser.add_argument('--scale', type=positive, default=2,
                      help='for bicubic (models have their own)')
  parser.add_argument('--tta', action='store_true', help='average the 8 flips and rotations')
  parser.add_argument('--tile-size', type=positive, default=None)
  parser.add_argument('--protocol', choices=metrics_lib.PROTOCOLS, default=metrics_lib.PROTOCOLS[0],
                      help="how Y is taken: 'data-readme' (default: the benchmark data's formula, "
                      "the truth's Y on the 8-bit grid; reproduces its measured bicubic figures) or "
                      "'paper-code' (as the DCSCN paper's code: both Ys rounded, one-channel files "
                      'on their grey values), to compare with published figures on their terms')
  parser.add_argument('--json', metavar='FILE', help='write the figures as JSON')
  parser.add_argument('--compare-dir', metavar='DIR', default=None,
                      help='write a side-by-side PNG per dataset here (input, bicubic, model, truth)')
  args = parser.parse_args(argv)

  from w2x_jax import data  # pylint: disable=g-import-not-at-top
  from w2x_jax import image_io  # pylint: disable=g-import-not-at-top
  # The outputs' places, checked before any work (not found unwritable after it).
  json_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
  if json_dir and not os.path.isdir(json_dir):
    parser.error(f'--json {args.json}: its folder does not exist')
  if json_dir and os.path.isdir(args.json):
    parser.error(f'--json {args.json}: is a folder')
  if json_dir and not os.access(json_dir, os.W_OK):
    parser.error(f'--json {args.json}: its folder is read-only')
  if args.compare_dir:
    try:
      os.makedirs(args.compare_dir, exist_ok=True)
    except OSError as e:
      parser.error(f'--compare-dir {args.compare_dir}: {e.strerror or e}')
    if not os.access(args.compare_dir, os.W_OK):
      parser.error(f'--compare-dir {args.compare_dir}: is read-only')
  warn = lambda message: print(f'w2x_jax.evaluate: {message}', file=sys.stderr)
  error = lambda e: warn(f'error: {e}')
  compilation_cache.enable(program='w2x_jax.evaluate')  # each image size compiles once, ever
  try:
    predict, scale, description, trained_noise = make_predictor(args.model, args.tta,
                                                                args.tile_size)
  except Exception as e:  # pylint: disable=broad-except (a one-line error, never a traceback)
    error(e)
    return 1
  if args.noise_level is None:  # a denoiser measured on clean input would read as a loss
    args.noise_level = -1 if trained_noise is None else int(trained_noise)
  scale = scale or args.scale
  predict = predict or (lambda lr: bicubic_upscale(lr, scale))
  baseline_name = 'bicubic' if scale > 1 else 'noisy input'
  results = dict(model=description, scale=scale, noise_level=args.noise_level, tta=args.tta,
                 protocol=args.protocol, baseline=baseline_name, datasets={})
  print(f'{description}, scale {scale}, noise level {args.noise_level}'
        f'{", TTA" if args.tta else ""}: PSNR/SSIM on Y, {scale} px border, protocol '
        f'{args.protocol}')
  print(f'{"dataset":<12} {"images":>6} {"model PSNR":>11} {baseline_name + " PSNR":>14} {"gain":>7}'
        f' {"model SSIM":>11} {baseline_name + " SSIM":>14}')
  failed = False
  for folder in args.dataset:
    try:
      pairs = load_dataset(folder, scale, args.noise_level, warn)
      summary, images, rows = evaluate_dataset(predict, pairs, scale, args.protocol)
    except (data.DataError, image_io.ImageError, OSError, ValueError) as e:
      error(e)
      failed = True  # the other datasets are still measured and written
      continue
    name = base = os.path.basename(os.path.abspath(folder))  # '.' named as the folder it is
    for k in range(2, len(args.dataset) + 2):  # two folders of one name: a/Set5, b/Set5
      if name not in results['datasets']:
        break
      name = f'{base}_{k}'
    results['datasets'][name] = dict(summary, folder=os.path.abspath(folder), per_image=images)
    print(f'{name:<12} {summary["images"]:>6} {summary["psnr"]:>11.3f} {summary["baseline_psnr"]:>14.3f}'
          f' {summary["psnr_gain"]:>+7.3f} {summary["ssim"]:>11.4f} {summary["baseline_ssim"]:>14.4f}')
    if args.compare_dir:
      path = os.path.join(args.compare_dir, f'{name}_compare.png')
      try:
        image_io.write_image(path, side_by_side(rows, scale))
      except (image_io.ImageError, OSError) as e:
        error(e)
        failed = True
        continue
      print(f'{"":<12} side by side (input, {baseline_name}, model, truth): {path}')
  if args.json:
    text = json.dumps(json_safe(results), indent=2, allow_nan=False).encode()
    try:
      image_io.atomic_write(args.json, lambda f: f.write(text))  # never a partial file
    except image_io.ImageError as e:
      error(e)
      return 1
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
