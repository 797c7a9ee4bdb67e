"""The evaluation protocol: metrics by hand, the published bicubic figures, the command's outputs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from w2x_jax import checkpoint
from w2x_jax import evaluate
from w2x_jax import metrics
from w2x_jax import models


def test_y_and_psnr_by_hand():
  assert metrics.rgb_to_y(np.full((1, 1, 3), 255.0))[0, 0] == pytest.approx(235.0)
  assert metrics.rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
  a = np.full((12, 12, 3), 100.0)  # Y = 16 + 100 * 219 / 255 = 101.882...
  b = a.copy()
  b[4:8, 4:8] += 10  # Y = 110.470..., rounded to 110 (the target's Y is on the 8-bit grid)
  ya, yb = 16 + 100 * 219 / 255, 16 + 110 * 219 / 255
  # 16 of 144 pixels differ by (110 - ya), the other 128 by (102 - ya).
  mse = (16 * (110 - ya) ** 2 + 128 * (102 - ya) ** 2) / 144
  assert metrics.psnr_y(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
  assert metrics.psnr_y(a, b, border=4) == pytest.approx(10 * np.log10(255 ** 2 / (110 - ya) ** 2))
  assert round(yb) == 110
  assert 50 < metrics.psnr_y(b, b) < 100  # only the 8-bit rounding of the target's Y
  # That rounding is at most 0.5 a pixel (PSNR >= 54.15); not 59 at most: a flat grey reads higher.
  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float64)
  assert 54.15 < metrics.psnr_y(noise, noise) < 60
  assert metrics.psnr_y(a, a) > 60 and metrics.psnr_y(np.zeros_like(a), np.zeros_like(a)) == float('inf')
  assert metrics.ssim_y(b, b) == pytest.approx(1.0)
  assert metrics.ssim_y(a, b) < 0.9995


def test_paper_code_protocol_by_hand():
  """'paper-code': both Ys rounded (an output equal to the truth is infinite PSNR), and a
  one-channel file scored on its grey values, not mapped to 16-235."""
  a = np.full((12, 12, 3), 100.0)
  b = a.copy()
  b[4:8, 4:8] += 10
  ya, yb = round(16 + 100 * 219 / 255), round(16 + 110 * 219 / 255)  # 102 and 110
  mse = 16 * (yb - ya) ** 2 / 144
  assert metrics.psnr_y(a, b, protocol='paper-code') == pytest.approx(10 * np.log10(255 ** 2 / mse))
  assert metrics.psnr_y(b, b, protocol='paper-code') == float('inf')
  grey_mse = 16 * 10 ** 2 / 144  # the grey values themselves: 100 against 110
  assert metrics.psnr_y(a, b, protocol='paper-code', grey=True) == pytest.approx(
      10 * np.log10(255 ** 2 / grey_mse))
  assert metrics.psnr_y(a[..., :1], b[..., :1], protocol='paper-code', grey=True) == pytest.approx(
      10 * np.log10(255 ** 2 / grey_mse))


def test_paper_code_protocol_reproduces_the_published_bicubic(shared_data):
  """The DCSCN README's bicubic figures (33.66 / 30.24 / 29.56) under its code's convention."""
  expected = {'Set5': 33.66, 'Set14': 30.24, 'BSD100': 29.56}
  for name, figure in expected.items():
    pairs = evaluate.load_dataset(str(shared_data / 'benchmark' / name), 2, -1)
    summary, _, _ = evaluate.evaluate_dataset(lambda lr: evaluate.bicubic_upscale(lr, 2), pairs, 2,
                                              protocol='paper-code')
    assert abs(summary['baseline_psnr'] - figure) <= 0.025, (name, summary['baseline_psnr'])


def test_bicubic_reproduces_the_data_readmes_measured_figures(shared_data):
  expected = {'Set5': 33.66, 'Set14': 30.32, 'BSD100': 29.55}
  for name, figure in expected.items():
    pairs = evaluate.load_dataset(str(shared_data / 'benchmark' / name), 2, -1)
    summary, _, _ = evaluate.evaluate_dataset(lambda lr: evaluate.bicubic_upscale(lr, 2), pairs, 2)
    assert abs(summary['baseline_psnr'] - figure) <= 0.01, (name, summary['baseline_psnr'])


def test_shipped_compact_dcscn_meets_the_papers_figures(shared_data):
  """Issue 7: the paper-protocol c-DCSCN reads at least the paper's figures on all three sets,
  scored as the paper's code scores (its figures have two decimals)."""
  predict, scale, _, _ = evaluate.make_predictor('paper_c_dcscn_y_scale2x', tta=False)
  for name, paper in {'Set5': 37.13, 'Set14': 32.71, 'BSD100': 31.59}.items():
    pairs = evaluate.load_dataset(str(shared_data / 'benchmark' / name), scale, -1)
    summary, _, _ = evaluate.evaluate_dataset(predict, pairs, scale, protocol='paper-code')
    assert round(summary['psnr'], 2) >= paper, (name, summary['psnr'])


def test_noise_levels_degrade_in_order():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:64, 0:64] / 64
  hr = (np.stack([np.sin(9 * xx), np.cos(7 * yy), xx * yy], -1) * 100 + 128
        + rng.normal(0, 8, (64, 64, 3))).clip(0, 255).astype(np.uint8)
  psnr = [metrics.psnr_y(evaluate.degrade_for_eval(hr, 1, n), hr) for n in (0, 1, 2, 3)]
  assert psnr == sorted(psnr, reverse=True) and len(set(psnr)) == 4, psnr
  assert evaluate.degrade_for_eval(hr, 2, -1).shape == (32, 32, 3)


def _export_tiny(path, scale):
  config = test_config.get_config(f'scale={scale}')
  model = models.build_model(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))['params']
  return checkpoint.export_model(path, params, config)


def _dataset(folder, count=2, size=40):
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (size, size + 2 * i, 3), np.uint8)).save(folder / f'{i}.png')
  return folder


@pytest.mark.parametrize('scale, baseline', [(2, 'bicubic'), (1, 'noisy input')])
def test_command_writes_table_json_and_picture(tmp_path, capsys, scale, baseline):
  model_dir = _export_tiny(tmp_path / 'model', scale)
  dataset = _dataset(tmp_path / 'mini')
  out_json, compare = tmp_path / 'r.json', tmp_path / 'cmp'
  code = evaluate.main(['--model', str(model_dir), '--dataset', str(dataset), '--noise-level', '1',
                        '--json', str(out_json), '--compare-dir', str(compare)])
  assert code == 0
  table = capsys.readouterr().out
  assert 'mini' in table and baseline in table
  result = json.loads(out_json.read_text())
  assert result['scale'] == scale and result['noise_level'] == 1 and result['baseline'] == baseline
  mini = result['datasets']['mini']
  assert mini['images'] == 2 and len(mini['per_image']) == 2
  assert mini['psnr_gain'] == pytest.approx(mini['psnr'] - mini['baseline_psnr'])
  assert 0 < mini['ssim'] <= 1 and np.isfinite(mini['psnr'])
  picture = np.asarray(Image.open(compare / 'mini_compare.png'))
  assert picture.shape[1] == 4 * 40 + 3 * 4  # input, baseline, model, truth side by side
  # Under a line naming them: dark text over each column's left part, white elsewhere.
  header = picture[:14].min(-1) < 128
  assert all(header[:, 44 * i:44 * i + 20].any() for i in range(4))
  assert picture.shape[0] == 14 + 2 * (40 + 4) and not header[:, 44 * 3 + 36:].any()


def test_noise_level_defaults_to_the_models_and_pairs_of_another_scale_are_not_used(
    tmp_path, capsys):
  model_dir = pathlib.Path(_export_tiny(tmp_path / 'model', 2))
  config = json.loads((model_dir / checkpoint.CONFIG_FILE).read_text())
  config['data']['noise_level'] = 2  # as a model trained to remove level-2 noise
  (model_dir / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
  dataset = _dataset(tmp_path / 'mini')
  assert evaluate.main(['--model', str(model_dir), '--dataset', str(dataset)]) == 0
  assert ', noise level 2:' in capsys.readouterr().out
  # X_LR partners made for 2x (as the benchmarks'), measured at 4x: bicubic inputs, said once.
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(dataset / 'p_LR.png')
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(dataset / 'p_HR.png')
  said = []
  pairs = evaluate.load_dataset(str(dataset), 4, -1, warn=said.append)
  assert dict((n, lr.shape) for n, lr, _, _ in pairs)['p_HR.png'] == (10, 10, 3)
  assert said == [f'{dataset}: 1 low-resolution files are not 1/4 of their ground truth (e.g. '
                  'p_LR.png): inputs made by bicubic downscaling instead']


def test_command_errors_are_one_line(tmp_path, capsys):
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(tmp_path / 'none')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'no such dataset folder' in err[0]
  (tmp_path / 'lr_only').mkdir()
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'lr_only' / 'a_LR.png')
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(tmp_path / 'lr_only')]) == 1
  assert capsys.readouterr().err.strip().endswith(
      'lr_only: no images (only low-resolution _LR files: their ground truth is needed)')
  assert evaluate.main(['--model', str(tmp_path / 'nomodel'), '--dataset', str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'nomodel' in err[0]


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(evaluate, 'load_dataset', interrupted)
  json_path = tmp_path / 'out.json'
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(tmp_path), '--json',
                        str(json_path)]) == 130
  assert capsys.readouterr().err.strip() == 'w2x_jax.evaluate: interrupted'
  assert not json_path.exists()


def test_command_reads_like_the_upscaler_and_refuses_bad_outputs_early(tmp_path, capsys):
  """16-bit grey scaled (not clipped), a sliver skipped with a line, a truncated file named, two
  folders of one name both kept, and unwritable outputs refused before any work."""
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  dataset = _dataset(tmp_path / 'a' / 'mini')
  ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
  Image.fromarray(ramp).save(dataset / 'deep.png')
  Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(dataset / 'sliver.png')
  pairs = evaluate.load_dataset(str(dataset), 2, -1, warn=lambda m: None)
  deep = dict((name, hr) for name, _, hr, _ in pairs)['deep.png']
  np.testing.assert_array_equal(deep[..., 0], np.round(ramp / 257.0).astype(np.uint8))
  assert 'sliver.png' not in dict((name, hr) for name, _, hr, _ in pairs)
  other = _dataset(tmp_path / 'b' / 'mini')
  out_json = tmp_path / 'r.json'
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(dataset), '--dataset', str(other),
                        '--json', str(out_json)]) == 0
  assert 'sliver.png: 40x12 is too small to measure' in capsys.readouterr().err  # its own size
  assert sorted(json.loads(out_json.read_text())['datasets']) == ['mini', 'mini_2']
  (other / 'cut.png').write_bytes((dataset / '0.png').read_bytes()[:60])
  # One dataset that fails: said, and the others still measured and written (exit 1).
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(other), '--dataset', str(dataset),
                        '--json', str(out_json)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and 'cut.png: cannot read' in err[0]
  assert sorted(json.loads(out_json.read_text())['datasets']) == ['mini']
  for extra in (['--json', str(tmp_path / 'no' / 'r.json')], ['--compare-dir', str(out_json)],
                ['--json', str(tmp_path)], ['--compare-dir', str(out_json / 'sub')],
                ['--scale', '0']):
    with pytest.raises(SystemExit) as e:
      evaluate.main(['--model', 'bicubic', '--dataset', str(dataset), *extra])
    assert e.value.code == 2
  capsys.readouterr()
  model_dir = _export_tiny(tmp_path / 'model', 2)
  assert evaluate.main(['--model', str(model_dir), '--dataset', str(dataset), '--tile-size', '4']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'must exceed twice' in err[0]


def test_linked_folders_are_measured_once(tmp_path):
  """A link loop (or a second link to a folder) had glob measure its images again and again."""
  dataset = _dataset(tmp_path / 'mini')
  (dataset / 'sub').mkdir()
  (dataset / 'sub' / 'up').symlink_to('..')  # a loop back to the dataset
  (dataset / 'again').symlink_to('sub')  # a link into the tree: its folder keeps its own name
  (dataset / '.hidden.png').write_bytes((dataset / '0.png').read_bytes())
  pairs = evaluate.load_dataset(str(dataset), 2, -1, warn=lambda m: None)
  assert [name for name, _, _, _ in pairs] == ['0.png', '1.png']


def test_json_is_strict_where_a_psnr_is_infinite(tmp_path):
  """A flat image that bicubic reproduces exactly reads inf dB (its gain nan): json.dumps had
  written Infinity and NaN, which strict readers refuse."""
  (tmp_path / 'flat').mkdir()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'flat' / 'black.png')
  out_json = tmp_path / 'r.json'
  assert evaluate.main(['--model', 'bicubic', '--dataset', str(tmp_path / 'flat'),
                        '--json', str(out_json)]) == 0
  flat = json.loads(out_json.read_text(), parse_constant=pytest.fail)['datasets']['flat']
  assert flat['psnr'] is None and flat['psnr_gain'] is None and flat['ssim'] == 1.0
  assert flat['per_image'][0]['baseline_psnr'] is None
