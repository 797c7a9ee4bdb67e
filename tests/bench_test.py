"""The benchmark command runs end to end (tiny model, fractions of a second) and reports ratios."""

import json

from w2x_jax import bench


def test_bench_all_tiny(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert bench.main(['all', '--seconds', '0.1', '--scales', '2', '--data-dir', '', '--presets', 'test',
                     '--patch-size', '12', '--infer-size', '40', '--json', str(out)]) == 0
  rows = json.loads(out.read_text())['rows']
  by_bench = {r['bench']: r for r in rows}
  assert set(by_bench) == {'data', 'train', 'infer'}
  assert by_bench['data']['patches_per_s'] > 0
  train, infer = by_bench['train'], by_bench['infer']
  assert train['of_peak'] == train['gflops'] / train['matmul_gflops'] and train['of_peak'] > 0
  assert train['generator_headroom'] > 0 and train['patches_per_s'] > 0
  assert infer['output_mp_per_s'] > 0 and 0 < infer['margin_overhead'] < 1 and infer['work_per_pixel'] >= 1
  assert 'train' in capsys.readouterr().out


def test_bench_memory_tiny(tmp_path):
  out = tmp_path / 'mem.json'
  assert bench.main(['memory', '--memory-size', '64', '--json', str(out)]) == 0
  row = json.loads(out.read_text())['rows'][0]
  assert row['output'] == '128x128' and 0 < row['peak_rss_gb'] < 4


def test_bench_dtypes_and_batch(tmp_path):
  """Each compute dtype gets its own rows, each measured against a matmul of that dtype."""
  out = tmp_path / 'bench.json'
  assert bench.main(['train', 'infer', '--seconds', '0.05', '--data-dir', '', '--presets', 'test',
                     '--patch-size', '12', '--infer-size', '40', '--train-batch', '3',
                     '--dtypes', 'float32', 'bfloat16', '--workers', '1', '--json', str(out)]) == 0
  rows = json.loads(out.read_text())['rows']
  assert sorted((r['bench'], r['dtype']) for r in rows) == [
      ('infer', 'bfloat16'), ('infer', 'float32'), ('train', 'bfloat16'), ('train', 'float32')]
  assert all(r['batch'] == '3x12x12' for r in rows if r['bench'] == 'train')
  # Each row's peak is its own (the matmul timed between its calls): positive, and the ratios use it.
  assert all(r['matmul_gflops'] > 0 and r['of_peak'] == r['gflops'] / r['matmul_gflops'] for r in rows)


def test_bench_layers_times_every_convolution_of_the_model(tmp_path):
  """`layers` has one row per convolution the model calls (recorded from the model itself) and an
  `all layers` row whose ratios use the model's FLOPs over the summed times."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'layers.json'
  assert bench.main(['layers', '--seconds', '0', '--presets', 'test', '--patch-size', '12',
                     '--train-batch', '2', '--json', str(out)]) == 0
  rows = json.loads(out.read_text())['rows']
  model_cfg = test_config.get_config('noise=2,scale=2').model
  calls, _ = bench.model_convolutions(model_cfg, 2, 12)
  *layers, total = rows
  assert [(r['x'], r['kernel']) for r in layers] == [
      ('x'.join(map(str, x)), 'x'.join(map(str, k))) for x, k in calls]
  assert calls[0][0] == (2, 12, 12, model_cfg.channels) and len(calls) >= 3
  assert all(r['fwd_s'] > 0 and r['train_s'] > 0 and r['train_of_peak'] > 0 for r in layers)
  assert total['layer'] == 'all layers'
  assert total['train_s'] == sum(r['train_s'] for r in layers)
  flops = models.flops_per_output_pixel(model_cfg) * 24 ** 2 * 2
  assert abs(total['train_of_peak'] - 3 * flops / total['train_s'] / 1e9 / total['matmul_gflops']) < 1e-9


def test_layers_records_each_dcscn_as_it_runs():
  """As the README says of `layers`: on CPU the compact DCSCN's reconstruction runs per feature
  layer and its final conv at low resolution; the seed DCSCN's as one 1x1 of the concatenated
  features, its final conv at high resolution."""
  compact, _ = bench.model_convolutions(bench._preset_config('dcscn_compact').model, 1, 12)
  seed, _ = bench.model_convolutions(bench._preset_config('dcscn').model, 1, 12)
  assert sum(k[:2] == (1, 1) for _, k in compact) == 7  # one 1x1 per feature layer
  assert compact[-1][0][1] == 12  # the final conv before the shuffle
  assert [k for _, k in seed if k[:2] == (1, 1)] == [(1, 1, 1281, 192)]  # recon_a and recon_b1 as one
  assert seed[-1][0][1] == 24  # the final conv after it
  assert (len(seed), len(compact)) == (16, 17)  # the README's `bench layers` table


def test_data_dir_help_names_its_default(capsys):
  """--help names the shared training folder even where it is absent (a fresh clone)."""
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    bench.parse_args(['--help'])
  squeeze = lambda text: ''.join(text.split())  # argparse wraps long paths at their hyphens
  assert squeeze(f'default: {bench.SHARED_TRAIN_DIR} where it exists') in squeeze(capsys.readouterr().out)


def test_timed_calls_alternate_with_the_matmul_probe():
  """The peak a row is divided by is sampled between its own calls, not once per run."""
  order = []

  class Probe:
    def sample(self):
      order.append('matmul')

  bench._median_seconds(lambda: order.append('call'), 0.0, Probe())
  assert order == ['call', 'matmul'] * 3


def test_torch_baseline_has_the_presets_layers():
  """docs/torch_baseline.py (PyTorch, not a dependency) builds the same layers as the configs and
  counts the same FLOPs, so its ratios compare with the bench's."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from w2x_jax import models  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parent.parent / 'docs' / 'torch_baseline.py'
  spec = importlib.util.spec_from_file_location('torch_baseline', path)
  baseline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(baseline)  # imports torch only when run
  for name, (filters, channels, ra, rb1, rb2, up, activation, skip) in baseline.PRESETS.items():
    m = bench._preset_config(name, scale=baseline.SCALE).model
    assert (tuple(models.feature_filters(m)), m.channels, m.recon_a, m.recon_b1, m.recon_b2,
            m.upsampler_filters, m.activation, m.skip_interpolation, m.final_bias) == (
                filters, channels, ra, rb1, rb2, up, activation, skip, False)
    assert baseline.flops_per_output_pixel(name) == models.flops_per_output_pixel(m)
