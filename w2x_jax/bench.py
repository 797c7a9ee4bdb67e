"""Throughput benchmarks: `python -m w2x_jax.bench [data|train|infer|layers|memory|all ...] [--json FILE] [--data-dir DIR]`.

`--dtypes float32 bfloat16` measures train and infer in each compute dtype (params stay float32),
each against the GFLOP/s of a large matmul of the same dtype timed between the row's own calls.

Each benchmark is a function (args) -> list of row dicts, registered in BENCHMARKS; rows are printed
as one table and, with --json, written to a file.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
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
  _set_feeding(dc, args)
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
    mode = f'{dc.num_workers} worker processes' if dc.num_workers else f'{dc.num_threads} threads'
    rows.append(dict(common, mode=f'PatchGenerator ({mode})', patches_per_s=rate,
                     batches=batches, seconds=elapsed))

    def one_batch(step, scale=scale, images=images):
      data.make_batch(images, seed=0, step=step, indices=range(batch_size), patch_size=dc.patch_size,
                      scale=scale, noise_level=dc.noise_level, nr_rate=dc.nr_rate,
                      filter_weights=dc.filter_weights)
    rate, batches, elapsed = _rate(one_batch, batch_size, args.seconds)
    rows.append(dict(common, mode='make_batch (1 thread)', patches_per_s=rate, batches=batches,
                     seconds=elapsed))
  return rows


PRESETS = ('dcscn', 'dcscn_compact', 'espcn_su')  # the model configs measured by `train` and `infer`
TRAIN_BATCH = 25  # the seed's training batch: 25 patches of 48x48 (LR)


def _preset_config(name, noise_level=2, scale=2, dtype='float32'):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config(f'noise={noise_level},scale={scale}')
  config.model.dtype = dtype
  return config


class _MatmulProbe:
  """A large matmul in `dtype` on the default device, timed between a row's own timed calls: the
  row's peak is the median of those products, so both sides of its ratio are measured at the same
  moments with the same statistic (this shared machine's matmul moved between 105 and 206 GFLOP/s
  within minutes, which a peak measured once at the start passed on to every ratio)."""

  def __init__(self, dtype):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    # 2048 saturates a CPU; an accelerator needs a larger product to reach its peak.
    self.n = 2048 if jax.default_backend() == 'cpu' else 8192
    # Random operands: an accelerator multiplies zeros or ones faster than real data.
    self._operands = jax.random.normal(jax.random.PRNGKey(0), (2, self.n, self.n), dtype)
    self._matmul = jax.jit(jnp.matmul)
    self._block = jax.block_until_ready
    self.times = []
    self.sample()

  def sample(self):
    start = time.perf_counter()
    self._block(self._matmul(*self._operands))
    self.times.append(time.perf_counter() - start)

  def start_row(self):
    self.times = []

  def gflops(self):
    return 2.0 * self.n ** 3 / statistics.median(self.times) / 1e9

  def best_gflops(self):
    return 2.0 * self.n ** 3 / min(self.times) / 1e9


def _matmul_probe(args, dtype):
  """The run's _MatmulProbe for `dtype` (compiled once), with no samples yet."""
  probes = args.__dict__.setdefault('_matmul_probes', {})
  if dtype not in probes:
    probes[dtype] = _MatmulProbe(dtype)
  probes[dtype].start_row()
  return probes[dtype]


def _set_feeding(data_cfg, args):
  """--threads (0: the config's) and --workers onto `config.data`."""
  if args.threads:
    data_cfg.num_threads = args.threads
  data_cfg.num_workers = args.workers


def _preset_runs(args):
  """(preset, dtype) pairs to measure: every preset in each dtype."""
  return [(name, dtype) for dtype in args.dtypes for name in args.presets]


def bench_train(args):
  """The jitted train step: alone (on batches made beforehand), GFLOP/s against the matmul peak
  (timed between its steps); then fed by the real PatchGenerator, as in training (the generator's
  threads share the cores).

  The generator's headroom is its rate alone (its own threads) over what the step consumes: it must
  be well above 1 for the generator never to be the bottleneck.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from w2x_jax import conv  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  from w2x_jax import train  # pylint: disable=g-import-not-at-top
  rows = []
  batch_size = args.train_batch
  for name, dtype in _preset_runs(args):
    probe = _matmul_probe(args, dtype)
    config = _preset_config(name, dtype=dtype)
    config.train.batch_size = batch_size
    _set_feeding(config.data, args)
    config.data.patch_size = args.patch_size
    scale = config.model.scale
    images, _ = load_bench_images(args.data_dir, data.min_image_size(args.patch_size, scale))
    mesh = train.make_mesh(jax.local_devices())
    start = time.perf_counter()
    state = jax.device_put(train.create_train_state(config, jax.random.PRNGKey(0)),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = jax.jit(train.make_train_step(config), donate_argnums=(0,),
                   compiler_options=conv.compiler_options())
    with data.PatchGenerator(images, config.data, scale=scale, batch_size=batch_size, seed=0) as gen:
      batches = iter(gen)
      ready = [train.shard_batch(next(batches)[1], mesh) for _ in range(2)]
      state, m = step(state, ready[0])
      jax.block_until_ready(m)
      compile_s = time.perf_counter() - start  # init + first step, as a run's first log line waits

      def timed_steps(next_batch, state, min_steps=3, probe=None):
        """(state, median seconds per step) over `args.seconds` (at least `min_steps` steps),
        with a probe matmul after each step if given."""
        calls = 0

        def one_step():
          nonlocal state, calls
          state, m = step(state, next_batch(calls))
          calls += 1
          jax.block_until_ready(m)

        seconds = _median_seconds(one_step, args.seconds, probe, min_steps)
        return state, seconds

      # The next few steps still run up to 3x slower, in plateaus (measured here for the seed
      # DCSCN: 15.9, 8.9, 9.1, 8.7, 5.3, 4.9, 4.7, 4.7 s: the heap still growing and page-faulting
      # in), so warm up for at least 4 rounds and until a round is no longer 5% faster (at most 10).
      previous = float('inf')
      for k in range(10):
        state, s_step = timed_steps(lambda _, k=k: ready[k % 2], state, min_steps=1)
        if k >= 3 and s_step > 0.95 * previous:
          break
        previous = min(previous, s_step)
      state, s_alone = timed_steps(lambda k: ready[k % 2], state, probe=probe)
      state, s_fed = timed_steps(lambda _: train.shard_batch(next(batches)[1], mesh), state)
      generator_rate, _, _ = _rate(lambda _: next(batches), batch_size, min(args.seconds, 2.0))
    hr_pixels = (args.patch_size * scale) ** 2
    gflops = 3 * models.flops_per_output_pixel(config.model) * hr_pixels * batch_size / s_alone / 1e9
    peak = probe.gflops()
    rows.append(dict(bench='train', model=name, dtype=dtype, params=models.count_params(state.params),
                     batch=f'{batch_size}x{args.patch_size}x{args.patch_size}', s_per_step=s_alone,
                     patches_per_s=batch_size / s_alone, gflops=gflops, matmul_gflops=peak,
                     matmul_gflops_best=probe.best_gflops(), of_peak=gflops / peak,
                     s_per_step_fed=s_fed, compile_s=compile_s,
                     generator_headroom=generator_rate * s_alone / batch_size))
  return rows


def bench_infer(args):
  """Output megapixels/s of tiled inference at the default tile size, and a whole 256x256 forward.

  `of_peak` counts the FLOPs of the output pixels only; `computed_of_peak` those of every pixel the
  tiles read (`work_per_pixel` per image pixel; unpadded, their later layers compute fewer, so
  this overstates them: it credits work not done), which separates the convolutions' speed from
  the tiling's overlap."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from w2x_jax import conv  # pylint: disable=g-import-not-at-top
  from w2x_jax import inference  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 1, (args.infer_size, args.infer_size, 3)).astype(np.float32)
  rows = []
  for name, dtype in _preset_runs(args):
    probe = _matmul_probe(args, dtype)
    config = _preset_config(name, noise_level=-1, dtype=dtype)
    model = models.build_model(config.model)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, config.model.channels), np.float32))['params']
    upscaler = inference.Upscaler(params, config.model, model=model)
    start = time.perf_counter()
    upscaler(image)
    compile_s = time.perf_counter() - start
    elapsed = _median_seconds(lambda: upscaler(image), args.seconds, probe)
    out_pixels = (args.infer_size * config.model.scale) ** 2
    flops = models.flops_per_output_pixel(config.model) * out_pixels
    # Input pixels the tiles read per pixel of the image: margins plus the last row and column
    # of tiles overlapping their neighbours (they end at the image's edge).
    c = config.model.channels
    side = upscaler.tile_side(args.infer_size, args.infer_size, c)
    overhead = inference.margin_overhead(config.model, side)
    work = upscaler.num_tiles(args.infer_size, args.infer_size, c) * side ** 2 / args.infer_size ** 2
    # Whole-image forward of 256x256, as the seed's figure (2.9 s for its DCSCN) is measured.
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x),
                      compiler_options=conv.compiler_options())
    # The random image's values (np.resize reflows them, repeated where it is smaller), not zeros.
    x = np.ascontiguousarray(np.resize(image, (256, 256, 3))[None, :, :, :c])
    jax.block_until_ready(forward(params, x))
    fwd_s = _median_seconds(lambda: jax.block_until_ready(forward(params, x)), args.seconds, probe)
    peak = probe.gflops()
    fwd_gflops = models.flops_per_output_pixel(config.model) * (256 * config.model.scale) ** 2 / fwd_s / 1e9
    rows.append(dict(bench='infer', model=name, dtype=dtype, image=f'{args.infer_size}x{args.infer_size}',
                     tile=side, margin_overhead=overhead, work_per_pixel=work,
                     output_mp_per_s=out_pixels / elapsed / 1e6, gflops=flops / elapsed / 1e9,
                     matmul_gflops=peak, matmul_gflops_best=probe.best_gflops(),
                     of_peak=flops / elapsed / 1e9 / peak,
                     computed_of_peak=work * flops / elapsed / 1e9 / peak,
                     compile_s=compile_s, forward_256_s=fwd_s, forward_256_of_peak=fwd_gflops / peak))
  return rows


def model_convolutions(model_cfg, batch, side):
  """[(x shape, kernel shape)] of every convolution one forward pass of `model_cfg`'s model makes on
  `batch` patches of side x side, in call order, and the conv function that runs them: recorded
  by tracing the model with a conv_fn that notes its arguments, so the list is the model's own
  (on CPU the compact DCSCN's reconstruction split per feature layer and its final conv at low
  resolution; the seed DCSCN's one 1x1 of the concatenated features, its final conv at high)."""
  import jax  # pylint: disable=g-import-not-at-top
  from w2x_jax import conv  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  conv_fn = conv.get_conv_fn(model_cfg.get('conv', 'auto'))
  calls = []

  def recording_conv(x, kernel):
    calls.append((x.shape, kernel.shape))
    return conv_fn(x, kernel)

  model = models.build_model(model_cfg, conv_fn=recording_conv)
  x = jax.ShapeDtypeStruct((batch, side, side, model_cfg.channels), model_cfg.get('dtype', 'float32'))
  jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return calls, conv_fn


def bench_layers(args):
  """Each convolution of the train step alone, jitted as the step compiles it (same conv function,
  same compiler options), on the train batch: its forward, and its forward plus backward (the
  input's and kernel's gradients; the kernel's alone for the first, which reads the image).

  The `all layers` row sums them: the model's FLOPs (as `train` counts them) over that sum bound
  what the whole step or a forward can reach with these convolutions, were the activations, the
  loss and the optimizer free."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from w2x_jax import conv  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows, side, batch = [], args.patch_size, args.train_batch
  for name, dtype in _preset_runs(args):
    probe = _matmul_probe(args, dtype)
    config = _preset_config(name, dtype=dtype)
    calls, conv_fn = model_convolutions(config.model, batch, side)
    forward = jax.jit(conv_fn, compiler_options=conv.compiler_options())

    def forward_and_grads(x, kernel, dy, image=False):
      y, vjp = jax.vjp(conv_fn, x, kernel)
      dx, dk = vjp(dy.astype(y.dtype))
      return (y, dk) if image else (y, dx, dk)

    train = jax.jit(forward_and_grads, static_argnames='image', compiler_options=conv.compiler_options())
    layers = []
    for i, (x_shape, k_shape) in enumerate(calls):
      x = rng.standard_normal(x_shape).astype(dtype)
      kernel = (rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:3]))).astype(dtype)
      dy = rng.standard_normal(x_shape[:3] + k_shape[3:]).astype(np.float32)
      fwd_s = _median_seconds(lambda: jax.block_until_ready(forward(x, kernel)), args.seconds, probe)
      train_s = _median_seconds(lambda: jax.block_until_ready(train(x, kernel, dy, image=i == 0)),
                                args.seconds, probe)
      flops = 2.0 * np.prod(x_shape[:3]) * np.prod(k_shape)
      layers.append((dict(layer=str(i), x='x'.join(map(str, x_shape)), kernel='x'.join(map(str, k_shape)),
                          fwd_s=fwd_s, train_s=train_s), flops, (2 if i == 0 else 3) * flops))
    # The model's FLOPs as `train` and `infer` count them (the final conv at high resolution).
    flops = models.flops_per_output_pixel(config.model) * (side * config.model.scale) ** 2 * batch
    total = dict(layer='all layers', x=f'{batch}x{side}x{side}', kernel=f'{len(calls)} convs',
                 fwd_s=sum(r['fwd_s'] for r, _, _ in layers),
                 train_s=sum(r['train_s'] for r, _, _ in layers))
    peak = probe.gflops()
    for row, fwd_flops, train_flops in layers + [(total, flops, 3 * flops)]:
      fwd_gflops, train_gflops = fwd_flops / row['fwd_s'] / 1e9, train_flops / row['train_s'] / 1e9
      rows.append(dict(bench='layers', model=name, dtype=dtype, **row, fwd_gflops=fwd_gflops,
                       train_gflops=train_gflops, fwd_of_peak=fwd_gflops / peak,
                       train_of_peak=train_gflops / peak))
    rows[-1]['matmul_gflops'] = peak
  return rows


def _median_seconds(fn, seconds, probe=None, min_calls=3):
  """Median seconds per call of fn() over `seconds` (at least `min_calls` calls), with a probe
  matmul (`_MatmulProbe`) after each call if given."""
  times, begin = [], time.perf_counter()
  while len(times) < min_calls or time.perf_counter() - begin < seconds:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    if probe is not None:
      probe.sample()
  return statistics.median(times)


def bench_memory(args):
  """Peak resident memory of the upscale command on a 4000x4000 RGB PNG (to 8000x8000).

  Run in a child process (its peak RSS is what getrusage reports for children), with the model of
  `--memory-config` (default: the tiny configs/test.py; a big model adds its per-tile activations).
  """
  import resource  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from w2x_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  side = args.memory_size
  with tempfile.TemporaryDirectory() as tmp:
    config = _preset_config(args.memory_config, noise_level=-1)
    model = models.build_model(config.model)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, config.model.channels), np.float32))['params']
    model_dir = checkpoint.export_model(os.path.join(tmp, 'model'), params, config)
    rng = np.random.default_rng(0)
    # Smooth noise, so that the PNG is not trivially small to decode.
    small = rng.integers(0, 256, (side // 8, side // 8, 3), np.uint8)
    Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(os.path.join(tmp, 'in.png'))
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'w2x_jax.upscale', '-i', os.path.join(tmp, 'in.png'), '-o',
                    os.path.join(tmp, 'out.png'), '-m', model_dir, '--quiet'], check=True, cwd=REPO_ROOT)
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with Image.open(os.path.join(tmp, 'out.png')) as out:
      out_size = f'{out.width}x{out.height}'
  return [dict(bench='memory', model=args.memory_config, input=f'{side}x{side}', output=out_size,
               peak_rss_gb=peak_kb / 2 ** 20, output_buffer_gb=(2 * side) ** 2 * 3 / 2 ** 30, seconds=elapsed)]


BENCHMARKS = {'data': bench_data, 'train': bench_train, 'infer': bench_infer, 'layers': bench_layers,
              'memory': bench_memory}
ALL = ('data', 'train', 'infer')  # `all`; layers and memory take minutes, so they are asked for by name


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
  parser.add_argument('which', nargs='*', default=['all'], choices=sorted(BENCHMARKS) + ['all'])
  parser.add_argument('--json', metavar='FILE', help='also write the rows (and the host) as JSON')
  parser.add_argument('--data-dir', default=str(SHARED_TRAIN_DIR) if SHARED_TRAIN_DIR.is_dir() else '',
                      # Named even where absent: a bare '%(default)s' reads "default: " in a fresh clone.
                      help="training images ('' = the embedded default; default: "
                           f"{str(SHARED_TRAIN_DIR).replace('%', '%%')} where it exists, else '')")
  parser.add_argument('--seconds', type=float, default=3.0, help='time per measurement')
  parser.add_argument('--patch-size', type=int, default=48, help='low-resolution patch side')
  parser.add_argument('--scales', type=int, nargs='+', default=[2, 1])
  parser.add_argument('--threads', type=int, default=0, help='producer threads (0: config default)')
  parser.add_argument('--workers', type=int, default=0,
                      help='patch worker processes (config.data.num_workers; 0: the threads make patches)')
  parser.add_argument('--presets', nargs='+', default=list(PRESETS), help='model configs for train/infer')
  parser.add_argument('--dtypes', nargs='+', default=['float32'], choices=['float32', 'bfloat16'],
                      help='compute dtypes for train/infer (params stay float32)')
  parser.add_argument('--train-batch', type=int, default=TRAIN_BATCH,
                      help='patches per train step (default: the seed\'s %(default)s)')
  parser.add_argument('--infer-size', type=int, default=512, help='input side for the infer benchmark')
  parser.add_argument('--memory-size', type=int, default=4000, help='input side for the memory benchmark')
  parser.add_argument('--memory-config', default='test', help='model config for the memory benchmark')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  names = list(dict.fromkeys(n for w in args.which for n in (ALL if w == 'all' else [w])))
  if {'train', 'infer', 'layers'} & set(names):
    from w2x_jax import conv  # pylint: disable=g-import-not-at-top
    conv.keep_freed_memory_on_cpu()  # as main.py and the upscale command: before JAX's backend
  rows = []
  for name in names:
    these = BENCHMARKS[name](args)
    print(format_table(these), end='\n\n', flush=True)
    rows += these
  train_rows = {r['model']: r for r in rows if r['bench'] == 'train' and r['dtype'] == 'float32'}
  data_rows = [r for r in rows if r['bench'] == 'data' and r['scale'] == 2 and 'PatchGenerator' in r['mode']]
  if 'dcscn' in train_rows and data_rows:
    ratio = data_rows[0]['patches_per_s'] / train_rows['dcscn']['patches_per_s']
    print(f'generator / default DCSCN train step: {data_rows[0]["patches_per_s"]:.0f} / '
          f'{train_rows["dcscn"]["patches_per_s"]:.1f} patches/s = {ratio:.0f}x; a step fed by the '
          f'generator takes {train_rows["dcscn"]["s_per_step_fed"] / train_rows["dcscn"]["s_per_step"]:.2f}x '
          f'the time of one alone')
  if args.json:
    host = dict(python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None)
    with open(args.json, 'w') as f:
      json.dump({'host': host, 'rows': rows}, f, indent=1)
    print(f'wrote {args.json}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
