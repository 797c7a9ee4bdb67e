"""Image-quality metrics as the super-resolution literature measures them (numpy, float64)."""

import numpy as np


def rgb_to_y(image):
  """Y of YCbCr, BT.601 with MATLAB's range, for RGB in [0, 255]: 16 + (65.481 R + 128.553 G + 24.966 B) / 255.

  A single-channel image is taken as already grey and returned in the same [16, 235] range.
  """
  image = np.asarray(image, np.float64)
  if image.ndim == 2 or image.shape[-1] == 1:
    grey = image.reshape(image.shape[:2])
    return 16.0 + grey * (219.0 / 255.0)
  return 16.0 + (65.481 * image[..., 0] + 128.553 * image[..., 1] + 24.966 * image[..., 2]) / 255.0


def _crop_border(image, border):
  return image[border:image.shape[0] - border, border:image.shape[1] - border] if border else image


def psnr_y(output, target, border=0):
  """PSNR (peak 255) on the Y channel of two RGB images in [0, 255], `border` pixels cropped per side."""
  a = _crop_border(rgb_to_y(output), border)
  b = _crop_border(rgb_to_y(target), border)
  if a.shape != b.shape:
    raise ValueError(f'psnr_y: shapes differ: {a.shape} vs {b.shape}')
  mse = np.mean((a - b) ** 2)
  return float('inf') if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def to_uint8_range(image01):
  """Float [0, 1] to the [0, 255] grid the metrics expect (rounded like a saved 8-bit image)."""
  return np.round(np.clip(np.asarray(image01, np.float64), 0.0, 1.0) * 255.0)
