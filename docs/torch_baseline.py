"""The bench's DCSCN rows in PyTorch, for a same-machine baseline (issue 6). Not a dependency.

The layers of `configs/dcscn.py` or `configs/dcscn_compact.py` at 2x (features concatenated, 1x1
reconstruction A and B, B's 3x3, the upsampler's 3x3 + pixel shuffle, the HR 3x3, plus the
interpolated input): a 256x256 forward and a train step (batch 25 of 48x48, L1, Adam), in PyTorch's
default NCHW layout and in channels_last (NHWC, the faster for oneDNN here). As in `w2x_jax.bench`,
each figure is a median per call with a 2048^2 float32 matmul timed after every call, and GFLOP/s
count the layers' multiply-adds (`w2x_jax.models.flops_per_output_pixel`, 3x for a train step).

Run with the CPU build of PyTorch, outside the project's venv (this machine has the wheel for
Python 3.11 on disk):
  python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch==2.13.0
  /tmp/torch-venv/bin/python docs/torch_baseline.py dcscn_compact dcscn
"""

import argparse
import statistics
import time

# name: (feature filters, channels, recon_a, recon_b1, recon_b2, upsampler filters, activation,
#        skip interpolation); tests/bench_test.py checks these against the configs.
PRESETS = {
    'dcscn': ((196, 172, 152, 134, 118, 103, 91, 80, 70, 62, 55, 48), 3, 128, 64, 128, 32, 'selu',
              'bilinear'),
    'dcscn_compact': ((32, 26, 22, 18, 14, 11, 8), 1, 24, 8, 8, 8, 'prelu', 'bicubic'),
}
SCALE = 2


def flops_per_output_pixel(name):
  """2 * multiply-adds per HR output pixel, counted as `w2x_jax.models.flops_per_output_pixel`."""
  filters, c, ra, rb1, rb2, up, _, _ = PRESETS[name]
  s2 = SCALE * SCALE
  lr = sum(9 * i * o for i, o in zip((c,) + filters[:-1], filters))
  lr += sum(filters) * (ra + rb1) + 9 * rb1 * rb2 + 9 * (ra + rb2) * up * s2
  return 2.0 * (lr / s2 + 9 * up * c)


def build(name):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn as nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  filters, c, ra, rb1, rb2, up, activation, skip = PRESETS[name]

  def act(n):
    return nn.PReLU(n) if activation == 'prelu' else nn.SELU()

  class DCSCN(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1)
                                    for i, o in zip((c,) + filters[:-1], filters))
      self.feature_acts = nn.ModuleList(act(o) for o in filters)
      self.recon_a, self.recon_a_act = nn.Conv2d(sum(filters), ra, 1), act(ra)
      self.recon_b1, self.recon_b1_act = nn.Conv2d(sum(filters), rb1, 1), act(rb1)
      self.recon_b2, self.recon_b2_act = nn.Conv2d(rb1, rb2, 3, padding=1), act(rb2)
      self.upsampler = nn.Conv2d(ra + rb2, up * SCALE * SCALE, 3, padding=1)
      self.upsampler_act = act(up)
      self.final = nn.Conv2d(up, c, 3, padding=1, bias=False)

    def forward(self, x):
      h, features = x, []
      for conv, a in zip(self.features, self.feature_acts):
        h = a(conv(h))
        features.append(h)
      f = torch.cat(features, 1)
      b = self.recon_b2_act(self.recon_b2(self.recon_b1_act(self.recon_b1(f))))
      h = self.upsampler(torch.cat([self.recon_a_act(self.recon_a(f)), b], 1))
      h = self.final(self.upsampler_act(F.pixel_shuffle(h, SCALE)))
      return h + F.interpolate(x, scale_factor=SCALE, mode=skip, align_corners=False)

  return DCSCN(), c


def median_seconds(fn, probe, seconds):
  times, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end or len(times) < 3:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    probe()
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('presets', nargs='*', default=list(PRESETS), choices=list(PRESETS))
  parser.add_argument('--seconds', type=float, default=4.0)
  parser.add_argument('--threads', type=int, default=None, help='default: torch\'s own')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
  matmul = []

  def probe():
    start = time.perf_counter()
    torch.mm(a, b)
    matmul.append(2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9)

  for _ in range(3):
    probe()
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
  for name in args.presets:
    for layout_name, layout in (('NCHW', torch.contiguous_format), ('NHWC', torch.channels_last)):
      torch.manual_seed(0)
      model, c = build(name)
      model = model.to(memory_format=layout)
      flops = flops_per_output_pixel(name)
      x = torch.rand(1, c, 256, 256).to(memory_format=layout)
      matmul.clear()
      with torch.no_grad():
        model(x)
        forward_s = median_seconds(lambda: model(x), probe, args.seconds)  # pylint: disable=cell-var-from-loop
      forward_peak = statistics.median(matmul)
      forward_gflops = flops * (256 * SCALE) ** 2 / forward_s / 1e9
      optimizer = torch.optim.Adam(model.parameters(), 1e-3)
      lr = torch.rand(25, c, 48, 48).to(memory_format=layout)
      hr = torch.rand(25, c, 48 * SCALE, 48 * SCALE).to(memory_format=layout)

      def step():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(lr) - hr).abs().mean()  # pylint: disable=cell-var-from-loop
        loss.backward()
        optimizer.step()  # pylint: disable=cell-var-from-loop

      for _ in range(3):
        step()
      matmul.clear()
      step_s = median_seconds(step, probe, args.seconds)
      step_peak = statistics.median(matmul)
      step_gflops = 3 * flops * (48 * SCALE) ** 2 * 25 / step_s / 1e9
      print(f'{name} {layout_name}: 256x256 forward {forward_s:.4f} s, {forward_gflops:.0f} GFLOP/s, '
            f'{forward_gflops / forward_peak:.2f} of matmul {forward_peak:.0f}; train step '
            f'{step_s:.3f} s, {step_gflops:.0f} GFLOP/s, {step_gflops / step_peak:.2f} of matmul '
            f'{step_peak:.0f}', flush=True)


if __name__ == '__main__':
  main()
