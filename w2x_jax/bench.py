"""Throughput benchmarks: `python -m w2x_jax.bench [data|all] [--json FILE] [--data-dir DIR]`.

Each benchmark is a function (args) -> list of row dicts, registered in BENCHMARKS; rows are printed
as one table and, with --json, written to a file.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

from configs import default as default_config
from w2x_jax import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TRAIN_DIR = pathlib.Path(
    os.environ.get('W2X_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data')) / 'train'


def load_bench_images(data_dir, min_size):
  """(images, description) from `data_dir`, or the embedded default where it is ''."""
  if data_dir:
    return data.load_images(data_dir, min_size), str(data_dir)
  return data.load_default_images(min_size), f'embedded default ({data.default_image_dir()})'


def _rate(make_one_batch, batch_size, seconds):
  """(patches/s, batches, elapsed) of calling make_one_batch until `seconds` have passed (at least 2 batches)."""
  start = time.perf_counter()
  batches = 0
  while batches < 2 or time.perf_counter() - start < seconds:
    make_one_batch(batches)
    batches += 1
  elapsed = time.perf_counter() - start
  return batches * batch_size / elapsed, batches, elapsed


def bench_data(args):
  """Patches/s of the training-pair generator: the threaded PatchGenerator and plain make_batch."""
  config = default_config.get_config('noise=2')
  dc = config.data
  dc.patch_size = args.patch_size
  if args.threads:
    dc.num_threads = args.threads
  batch_size = config.train.batch_size
  rows = []
  for scale in args.scales:
    start = time.perf_counter()
    images, source = load_bench_images(args.data_dir, data.min_image_size(dc.patch_size, scale))
    load_s = time.perf_counter() - start
    print(f'data: {len(images)} images from {source} (loaded in {load_s:.1f} s)', file=sys.stderr)
    common = dict(bench='data', scale=scale, noise_level=dc.noise_level, patch_size=dc.patch_size,
                  batch_size=batch_size, images=len(images))

    # As training uses it: the producer threads start at construction, so the time to fill the
    # queue counts (a lower bound on the steady rate).
    generator = data.PatchGenerator(images, dc, scale=scale, batch_size=batch_size, seed=0)
    with generator:
      rate, batches, elapsed = _rate(lambda _: next(generator), batch_size, args.seconds)
    rows.append(dict(common, mode=f'PatchGenerator ({dc.num_threads} threads)', patches_per_s=rate,
                     batches=batches, seconds=elapsed))

    def one_batch(step, scale=scale, images=images):
      data.make_batch(images, seed=0, step=step, indices=range(batch_size), patch_size=dc.patch_size,
                      scale=scale, noise_level=dc.noise_level, nr_rate=dc.nr_rate,
                      filter_weights=dc.filter_weights)
    rate, batches, elapsed = _rate(one_batch, batch_size, args.seconds)
    rows.append(dict(common, mode='make_batch (1 thread)', patches_per_s=rate, batches=batches,
                     seconds=elapsed))
  return rows


BENCHMARKS = {'data': bench_data}


def _cell(value):
  if isinstance(value, float):
    return f'{value:.1f}' if abs(value) >= 10 else f'{value:.3g}'
  return str(value)


def format_table(rows):
  """A plain-text table over the union of the rows' keys (in first-seen order)."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  cells = [[_cell(row.get(c, '')) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths))]
  lines.append('  '.join('-' * w for w in widths))
  lines += ['  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m w2x_jax.bench', description=__doc__.splitlines()[0])
  parser.add_argument('which', nargs='?', default='all', choices=sorted(BENCHMARKS) + ['all'])
  parser.add_argument('--json', metavar='FILE', help='also write the rows (and the host) as JSON')
  parser.add_argument('--data-dir', default=str(SHARED_TRAIN_DIR) if SHARED_TRAIN_DIR.is_dir() else '',
                      help="training images ('' = the embedded default; default: %(default)s)")
  parser.add_argument('--seconds', type=float, default=3.0, help='time per measurement')
  parser.add_argument('--patch-size', type=int, default=48, help='low-resolution patch side')
  parser.add_argument('--scales', type=int, nargs='+', default=[2, 1])
  parser.add_argument('--threads', type=int, default=0, help='producer threads (0: config default)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  names = sorted(BENCHMARKS) if args.which == 'all' else [args.which]
  rows = []
  for name in names:
    rows += BENCHMARKS[name](args)
  print(format_table(rows))
  if args.json:
    host = dict(python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None)
    with open(args.json, 'w') as f:
      json.dump({'host': host, 'rows': rows}, f, indent=1)
    print(f'wrote {args.json}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
