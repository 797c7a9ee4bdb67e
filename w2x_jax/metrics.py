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


# How Y is taken for PSNR/SSIM: 'data-readme', the benchmark data's stated formula with the
# ground truth's Y on the 8-bit grid (this reproduces the data README's measured bicubic figures,
# 33.66 / 30.32 / 29.55 dB, to within 0.01); 'paper-code', as the DCSCN paper's code scores (both
# images' Y rounded, a one-channel file on its own grey values, not mapped to 16-235), for
# comparing with its published figures on its own terms.
PROTOCOLS = ('data-readme', 'paper-code')


def _y(image, protocol, grey):
  if protocol == 'data-readme':
    return rgb_to_y(image)
  image = np.asarray(image, np.float64)
  if not grey:
    return np.round(rgb_to_y(image))
  if image.ndim == 3 and image.shape[-1] == 3:  # full-range luma: the grey value where R=G=B
    image = image @ np.array([0.299, 0.587, 0.114])
  return np.round(image.reshape(image.shape[:2]))


def _crop_border(image, border):
  return image[border:image.shape[0] - border, border:image.shape[1] - border] if border else image


def _y_pair(output, target, border, round_target=True, protocol='data-readme', grey=False):
  """Y of output and target, borders cropped. 'data-readme': the ground truth's Y is kept on the
  8-bit grid and the output's is not: that reproduces the data README's measured bicubic figures,
  33.66 / 30.32 / 29.55 dB (Set5 / Set14 / BSD100), to within 0.01 dB (neither rounded: 33.67 /
  30.33 / 29.56; both: 33.64 / 30.31 / 29.55). A consequence: an output equal to the target scores
  the rounding error's PSNR (at least 54 dB, since no pixel is off by more than 0.5; about 59 on a
  photograph; more, up to infinity, on flat colours whose Y falls near the grid), which caps
  near-lossless figures. 'paper-code': both rounded, `grey` (a one-channel file) on its grey values."""
  a = _crop_border(_y(output, protocol, grey), border)
  b = _crop_border(_y(target, protocol, grey), border)
  b = np.round(b) if round_target and protocol == 'data-readme' else b
  if a.shape != b.shape:
    raise ValueError(f'shapes differ: {a.shape} vs {b.shape}')
  return a, b


def psnr_y(output, target, border=0, protocol='data-readme', grey=False):
  """PSNR (peak 255) on the Y channel of two RGB images in [0, 255], `border` pixels cropped per
  side; `protocol` and `grey` (the ground truth was a one-channel file) as in _y_pair."""
  a, b = _y_pair(output, target, border, protocol=protocol, grey=grey)
  mse = np.mean((a - b) ** 2)
  return float('inf') if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def ssim_y(output, target, border=0, protocol='data-readme', grey=False):
  """SSIM on the Y channel as scikit-image computes it (gaussian window, sigma 1.5, K1 0.01, K2 0.03).

  Under 'data-readme' neither Y is rounded (the ground truth's rounding is PSNR's, to match the
  data README's figures); under 'paper-code' both are, as for PSNR."""
  from skimage.metrics import structural_similarity  # pylint: disable=g-import-not-at-top
  a, b = _y_pair(output, target, border, round_target=False, protocol=protocol, grey=grey)
  return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255.0))


def to_uint8_range(image01):
  """Float [0, 1] to the [0, 255] grid the metrics expect (rounded like a saved 8-bit image)."""
  return np.round(np.clip(np.asarray(image01, np.float64), 0.0, 1.0) * 255.0)
