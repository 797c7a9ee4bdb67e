"""Evaluation pairs made the standard way: bicubic downscale, fixed JPEG noise per level, bicubic baseline."""

import io

import numpy as np
from PIL import Image

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


def degrade_for_eval(hr_uint8, scale, noise_level):
  """The model's input for a ground-truth image: Pillow bicubic downscale, then the level's JPEG noise."""
  hr = crop_to_multiple(hr_uint8, scale)
  lr = hr
  if scale > 1:
    h, w = hr.shape[:2]
    lr = np.asarray(Image.fromarray(hr).resize((w // scale, h // scale), Image.Resampling.BICUBIC))
  for quality in EVAL_JPEG_QUALITIES[noise_level]:
    lr = jpeg_roundtrip(lr, quality)
  return lr


def bicubic_upscale(lr_uint8, scale):
  """The baseline every table compares with (identity for scale 1)."""
  if scale == 1:
    return lr_uint8
  h, w = lr_uint8.shape[:2]
  return np.asarray(Image.fromarray(lr_uint8).resize((w * scale, h * scale), Image.Resampling.BICUBIC))
