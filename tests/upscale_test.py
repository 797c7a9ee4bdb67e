"""The upscale command: single files, folders with bad files and unwritable outputs, lists, skip and
overwrite, exit codes, model choice per -n/-s, modes kept, JPEG and alpha, missing shipped model."""

import os
import shutil
import signal
import struct
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image, ImageCms

from configs import test as test_config
from w2x_jax import checkpoint
from w2x_jax import conv
from w2x_jax import image_io
from w2x_jax import models
from w2x_jax import upscale

SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()
FAST = ['--tile-size', '32', '--batch-size', '4']


def _export(path, scale):
  config = test_config.get_config(f'scale={scale}')
  model = models.build_model(config.model)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
  params = jax.tree.map(np.asarray, params)
  params['final']['kernel'] = params['final']['kernel'] * 0.05  # near the skip: sane outputs
  return checkpoint.export_model(path, params, config)


@pytest.fixture(scope='module')
def model_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('models')
  return {'2x': str(_export(root / 'tiny2x', 2)), '1x': str(_export(root / 'tiny1x', 1))}


@pytest.fixture(scope='module')
def loaded(model_dirs):
  return {k: checkpoint.restore_model(v) for k, v in model_dirs.items()}


def _png(path, shape, seed=0, **save_kw):
  data = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(data).save(path, **save_kw)
  return data


def _run(capsys, *argv, **kw):
  code = upscale.main([*map(str, argv)], **kw)
  out, err = capsys.readouterr()
  return code, out, err


def _tmp_files(root):
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith('.tmp')]


def test_single_file_device_line_and_progress(tmp_path, capsys, model_dirs, monkeypatch):
  kept = []  # the command keeps freed memory (on the CPU), as training does
  monkeypatch.setattr(conv, 'keep_freed_memory_on_cpu', lambda: kept.append(1))
  _png(tmp_path / 'a.png', (6, 9, 3), icc_profile=SRGB_ICC)
  _png(tmp_path / 'big.png', (70, 90, 3))  # 4 x 5 tiles of 20 + margins: a tile bar too
  # stderr redirected to a file (capsys: not a terminal): no bars, the lines only.
  code, out, err = _run(capsys, '-i', tmp_path / 'big.png', '-o', tmp_path / 'log.png', '-m',
                        model_dirs['2x'], *FAST)
  assert code == 0 and '\r' not in err and 'tile/s' not in err and '1/1' not in err
  assert 'running on 4 device(s)' in err
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True, raising=False)  # a terminal: bars
  code, out, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '-m',
                        model_dirs['2x'], *FAST)
  assert code == 0 and kept == [1, 1]
  assert out.strip() == '1 done, 0 skipped, 0 failed'
  assert err.count('running on 4 device(s)') == 1
  assert '1/1' in err and 'file' in err and 'tile/s' not in err  # no tile bar for a small image
  # The margin's share, said once per model.
  assert err.count('of their input pixels on the overlap') == 1
  with Image.open(tmp_path / 'b.png') as im:
    assert (im.size, im.mode, im.info.get('icc_profile')) == ((18, 12), 'RGB', SRGB_ICC)
  code, out, err = _run(capsys, '-i', tmp_path / 'big.png', '-o', f'{tmp_path / "out"}{os.sep}',
                        '-m', model_dirs['2x'], '-f', 'webp', *FAST)
  assert code == 0 and '/20 [' in err and 'tile/s' in err
  with Image.open(tmp_path / 'out' / 'big.webp') as im:
    assert (im.format, im.size) == ('WEBP', (180, 140))


def test_folder_with_bad_files_mirrors_tree(tmp_path, capsys, model_dirs):
  src, dst = tmp_path / 'in', tmp_path / 'out'
  _png(src / 'top.png', (5, 7, 3))
  _png(src / 'a' / 'b' / 'deep.png', (4, 4, 3), seed=1)
  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(src / 'a' / 'photo.jpg', quality=90)
  (src / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
  (src / 'notes.txt').write_text('not an image: ignored in folders')
  _png(src / 'blocked' / 'x.png', (4, 4, 3))
  os.makedirs(dst)
  (dst / 'blocked').write_text('a file where the output folder should be')
  code, out, err = _run(capsys, '-i', src, '-o', dst, '-m', model_dirs['2x'], '--quiet', *FAST)
  assert code == 1
  assert out.strip() == '3 done, 0 skipped, 2 failed'
  lines = err.strip().splitlines()
  assert len(lines) == 2, err  # quiet: only the two failures, one line each
  assert any('corrupt.png: cannot read' in l for l in lines)
  assert any(os.path.join('blocked', 'x.png') in l and 'cannot write' in l for l in lines)
  assert sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst)
                for f in fs) == ['a/b/deep.png', 'a/photo.png', 'blocked', 'top.png']
  with Image.open(dst / 'a' / 'b' / 'deep.png') as im:
    assert im.size == (8, 8)
  assert not _tmp_files(tmp_path)

  # Again: existing outputs are skipped; with --overwrite they are redone.
  code, out, _ = _run(capsys, '-i', src, '-o', dst, '-m', model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (1, '0 done, 3 skipped, 2 failed')
  os.utime(dst / 'top.png', ns=(0, 0))
  code, out, _ = _run(capsys, '-i', src, '-o', dst, '-m', model_dirs['2x'], '--quiet',
                      '--overwrite', *FAST)
  assert (code, out.strip()) == (1, '3 done, 0 skipped, 2 failed')
  assert os.stat(dst / 'top.png').st_mtime_ns != 0  # rewritten
  os.remove(src / 'corrupt.png')
  os.remove(dst / 'blocked')
  code, out, _ = _run(capsys, '-i', src, '-o', dst, '-m', model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (0, '1 done, 3 skipped, 0 failed')


def test_list_file_and_own_output(tmp_path, capsys, model_dirs):
  _png(tmp_path / 'p' / 'one.png', (3, 5, 3))
  (tmp_path / 'p' / 'data.bin').write_bytes(os.urandom(64))
  (tmp_path / 'list.txt').write_text('# inputs\np/one.png\n\np/data.bin\np/missing.png\n')
  code, out, err = _run(capsys, '-i', tmp_path / 'list.txt', '-o', tmp_path / 'o', '-m',
                        model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '1 done, 0 skipped, 2 failed')
  assert 'data.bin: cannot read: not an image' in err
  assert 'missing.png: cannot read' in err
  assert os.listdir(tmp_path / 'o') == ['one.png']
  # An input that is its own output is refused, and left alone.
  before = (tmp_path / 'p' / 'one.png').read_bytes()
  code, out, err = _run(capsys, '-i', tmp_path / 'p' / 'one.png', '-o', tmp_path / 'p' / 'one.png',
                        '-m', model_dirs['2x'], '--overwrite', '--quiet', *FAST)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert 'is its own output' in err
  assert (tmp_path / 'p' / 'one.png').read_bytes() == before


def test_modes_kept_through_the_command(tmp_path, capsys, model_dirs):
  src = tmp_path / 'in'
  rng = np.random.default_rng(0)
  _png(src / 'gray.png', (5, 6))
  la = rng.integers(0, 256, (5, 6, 2), dtype=np.uint8)
  Image.fromarray(la).save(src / 'la.png')
  rgba = rng.integers(0, 256, (4, 7, 4), dtype=np.uint8)
  rgba[..., 3] = 255
  rgba[0, :, 3] = 0  # a hidden row: its colour is filled before the model sees it
  Image.fromarray(rgba).save(src / 'rgba.png')
  g16 = rng.integers(0, 65536, (3, 4), dtype=np.uint16)
  Image.fromarray(g16).save(src / 'g16.png')
  pal = Image.fromarray(rng.integers(0, 3, (4, 4), dtype=np.uint8), 'P')
  pal.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])
  pal.save(src / 'pal.png', transparency=0)
  code, out, _ = _run(capsys, '-i', src, '-o', tmp_path / 'out', '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (0, '5 done, 0 skipped, 0 failed')
  want = {'gray.png': ('L', (12, 10)), 'la.png': ('LA', (12, 10)), 'rgba.png': ('RGBA', (14, 8)),
          'g16.png': ('I;16', (8, 6)), 'pal.png': ('RGBA', (8, 8))}
  for name, (mode, size) in want.items():
    with Image.open(tmp_path / 'out' / name) as im:
      assert (im.mode, im.size) == (mode, size), name
      if name == 'rgba.png':
        alpha = np.asarray(im)[..., 3]
        assert alpha[0].max() < 64 and alpha[4:].min() > 240  # alpha went through the model


def test_model_choice_for_noise_and_scale(tmp_path, capsys, loaded):
  asked = []

  def fake_load(name):
    asked.append(name)
    return loaded['1x' if name.startswith('noise') else '2x']
  _png(tmp_path / 'a.png', (5, 3, 3))

  def run(*extra):
    asked.clear()
    code, _, _ = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '--overwrite',
                      '--quiet', *FAST, *extra, load_model_fn=fake_load)
    assert code == 0
    with Image.open(tmp_path / 'b.png') as im:
      return im.size
  assert run('-n', '1', '-s', '4') == (12, 20)
  assert asked == ['scale2x_noise1', 'scale2x_noisenone']
  assert run('-n', '-1', '-s', '2') == (6, 10)
  assert asked == ['scale2x_noisenone']
  assert run('-n', '3', '-s', '1') == (3, 5)
  assert asked == ['noise3']
  assert run('-n', '-1', '-s', '1') == (3, 5) and asked == []  # nothing to do but convert
  assert run('-n', '2', '--width', '11') == (11, round(5 * 11 / 3))  # 2 passes, then down
  assert asked == ['scale2x_noise2', 'scale2x_noisenone']
  assert run('-n', '0', '--width', '4', '--height', '9') == (4, 9)
  assert asked == ['scale2x_noise0']
  # A factor the 2x passes do not reach: one pass past it, then Lanczos down (round half even).
  assert run('-n', '1', '-s', '1.5') == (4, 8) and asked == ['scale2x_noise1']
  assert run('-n', '1', '-s', '3') == (9, 15)
  assert asked == ['scale2x_noise1', 'scale2x_noisenone']
  assert run('-n', '3', '-s', '0.5') == (2, 2) and asked == ['noise3']  # denoised, then down
  assert run('--tta') == (6, 10)
  assert asked == ['scale2x_noise0']  # -n 0 and -s 2 by default, as waifu2x's
  # -m: that model does every pass; without -s, once.
  assert run('-m', 'noise1') == (3, 5) and asked == ['noise1']
  assert run('-m', 'scale2x_noise3', '-s', '4') == (12, 20) and asked == ['scale2x_noise3']
  assert run('-m', 'scale2x_noise3', '-s', '3') == (9, 15) and asked == ['scale2x_noise3']
  # A scale-1 model: one pass, Lanczos does any -s (as it does --width).
  assert run('-m', 'noise1', '-s', '2') == (6, 10) and asked == ['noise1']
  assert run('-m', 'noise1', '-s', '1.5') == (4, 8) and asked == ['noise1']
  assert run('-m', 'noise1', '-s', '1') == (3, 5) and asked == ['noise1']


def test_missing_shipped_model_is_one_clear_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(upscale, 'WEIGHTS_DIR', str(tmp_path / 'no_weights'))
  _png(tmp_path / 'a.png', (4, 4, 3))
  code, out, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '-n', '1',
                        '--quiet')
  assert code == 1 and out == ''
  assert err.strip().splitlines() == [
      f"w2x_jax.upscale: shipped model 'scale2x_noise1' is not installed "
      f"({tmp_path / 'no_weights' / 'scale2x_noise1'}); pass -m CHECKPOINT_DIR (an exported "
      "model folder or a training workdir)"]
  assert not os.path.exists(tmp_path / 'b.png')
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '-m',
                      tmp_path / 'nowhere', '--quiet')
  assert code == 1 and 'no such model folder' in err


def test_broken_or_mismatched_model_folder_is_one_clear_line(tmp_path, capsys, model_dirs):
  # Another model's params beside a config, a config cut short or of no model, params cut short:
  # a CheckpointError naming the file, never a traceback at (or a failure of) every image.
  mixed = tmp_path / 'mixed'
  shutil.copytree(model_dirs['1x'], mixed)
  shutil.copy(os.path.join(model_dirs['2x'], checkpoint.CONFIG_FILE), mixed)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"params.msgpack: not the parameters of config.json's model \(2 differ: "
                           r"\['upsampler'\]\['bias'\]"):
    checkpoint.restore_model(mixed)
  _png(tmp_path / 'a.png', (4, 4, 3))
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '-m', mixed,
                      '--quiet')
  assert code == 1 and len(err.strip().splitlines()) == 1 and 'not the parameters of' in err
  cut = tmp_path / 'cut'
  shutil.copytree(model_dirs['2x'], cut)
  (cut / checkpoint.PARAMS_FILE).write_bytes((cut / checkpoint.PARAMS_FILE).read_bytes()[:100])
  with pytest.raises(checkpoint.CheckpointError, match=r'cut/params.msgpack: cannot read it'):
    checkpoint.restore_model(cut)
  for text, reason in (('{"model": {', 'JSONDecodeError'), ('{}', 'AttributeError')):
    (cut / checkpoint.CONFIG_FILE).write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=f"cut/config.json: not a model's config "
                                                         f'\\({reason}'):
      checkpoint.restore_model(cut)
  # A workdir whose config.json is another model's: one line, not Orbax's tree of differences.
  workdir = tmp_path / 'run'
  _, params, config = checkpoint.restore_model(model_dirs['2x'])
  with ocp.StandardCheckpointer() as saver:
    saver.save(workdir / checkpoint.CHECKPOINT_DIR / '3' / 'params', params)
  other = test_config.get_config()
  other.model.layers = 2
  checkpoint.save_run_config(str(workdir), other)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/3: cannot restore its parameters as config.json's model "
                           r'\([^\n]*\)$'):
    checkpoint.restore_model(workdir / checkpoint.CHECKPOINT_DIR / '3')


def test_jpeg_alpha_refused_or_composited_and_bad_args(tmp_path, capsys, model_dirs):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 3] = 0
  rgba[1:3, 1:3] = 255
  Image.fromarray(rgba).save(tmp_path / 'a.png')
  code, out, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'a.jpg', '-m',
                        model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert 'JPEG cannot store' in err and '--background' in err
  code, out, _ = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'a.jpg', '-m',
                      model_dirs['2x'], '--quiet', '--background', 'white', '-q', '95', *FAST)
  assert code == 0
  with Image.open(tmp_path / 'a.jpg') as im:
    assert (im.format, im.mode, im.size) == ('JPEG', 'RGB', (8, 8))
    assert np.asarray(im)[0, 0].min() > 240  # transparent corner over white
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'a.bmp', '--quiet')
  assert code == 2 and 'output format' in err
  # -f against the output's own suffix: JPEG bytes in a .png file would mislead every viewer.
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '-f', 'jpg')
  assert code == 2 and 'b.png: its suffix says png but -f says jpeg' in err
  assert not os.path.exists(tmp_path / 'b.png')
  for bad in (['-s', '0'], ['-s', '17'], ['-s', 'two'], ['-s', '2', '--width', '9']):
    with pytest.raises(SystemExit) as e:
      upscale.main(['-i', 'x', '-o', 'y', *bad])
    assert e.value.code == 2
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'c.png', '-s', '1', '-n',
                      '-1', '--background', 'white')
  assert code == 0 and 'runs no model: the images are only converted' in err  # said, then done
  # An animation: its first frame, said so.
  frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 128, 255)]
  frames[0].save(tmp_path / 'anim.gif', save_all=True, append_images=frames[1:])
  code, out, err = _run(capsys, '-i', tmp_path / 'anim.gif', '-o', tmp_path / 'anim.png', '-m',
                        model_dirs['2x'], '--quiet', *FAST)  # (said even so: frames are lost)
  assert code == 0 and 'anim.gif: 3 frames (an animation or pages); only the first is upscaled' in err
  # Alpha that is opaque everywhere (screenshots saved as RGBA) is dropped for JPEG, not refused.
  rgba[..., 3] = 255
  Image.fromarray(rgba).save(tmp_path / 'opaque.png')
  code, out, _ = _run(capsys, '-i', tmp_path / 'opaque.png', '-o', tmp_path / 'opaque.jpg', '-m',
                      model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (0, '1 done, 0 skipped, 0 failed')
  with Image.open(tmp_path / 'opaque.jpg') as im:
    assert (im.mode, im.size) == ('RGB', (8, 8))


def test_shipped_default_model_needs_no_argument(tmp_path, capsys):
  """On a fresh clone: `python -m w2x_jax.upscale -i photo.png -o out.png` (noise 0, 2x, shipped)."""
  rng = np.random.default_rng(3)
  small = rng.integers(0, 256, (12, 16, 3), np.uint8)
  Image.fromarray(small).resize((64, 48), Image.Resampling.BICUBIC).save(tmp_path / 'photo.png')
  code, out, err = _run(capsys, '-i', tmp_path / 'photo.png', '-o', tmp_path / 'out.png')
  assert code == 0, err
  assert out.strip() == '1 done, 0 skipped, 0 failed'
  with Image.open(tmp_path / 'out.png') as im:
    result = np.asarray(im.convert('RGB'), np.float64)
  bicubic = np.asarray(Image.open(tmp_path / 'photo.png').resize((128, 96), Image.Resampling.BICUBIC),
                       np.float64)
  assert result.shape == (96, 128, 3)
  assert 0.5 < np.abs(result - bicubic).mean() < 20  # the model's own picture, not bicubic, not noise


def test_every_shipped_model_is_installed_small_and_runs():
  """Issue 7: every model the command picks by -n/-s ships, all together under 20 MB."""
  from w2x_jax import inference  # pylint: disable=g-import-not-at-top
  total = 0
  for name in upscale.shipped_names():
    folder = os.path.join(upscale.WEIGHTS_DIR, name)
    assert sorted(os.listdir(folder)) == [checkpoint.CONFIG_FILE, checkpoint.PARAMS_FILE], name
    total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    _, params, config = upscale.load_model(name)
    expected_scale = 1 if name.startswith('noise') else 2
    assert config.model.scale == expected_scale, name
    noise = name.rsplit('noise', 1)[1]
    assert config.data.noise_level == (-1 if noise == 'none' else int(noise)), name
    image = np.random.default_rng(0).uniform(0, 1, (20, 24, 3)).astype(np.float32)
    out = inference.upscale_array(params, config.model, image)
    assert out.shape == (20 * expected_scale, 24 * expected_scale, 3) and np.isfinite(out).all(), name
  for name in upscale.EXTRA_MODELS:  # the paper-protocol models, by -m NAME
    folder = os.path.join(upscale.WEIGHTS_DIR, name)
    total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    _, params, config = upscale.load_model(name)
    assert config.model.scale == 2 and config.data.noise_level == -1, name
    out = inference.upscale_array(params, config.model, image)
    assert out.shape == (40, 48, 3) and np.isfinite(out).all(), name
  assert total < 20 * 2 ** 20


def test_4x_and_denoise_only_with_shipped_models(tmp_path, capsys):
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 12, 3), np.uint8)).save(tmp_path / 'a.png')
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'x4.png', '-s', '4', '-n', '2', '--quiet')
  assert code == 0, err
  assert Image.open(tmp_path / 'x4.png').size == (48, 40)
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'x1.png', '-s', '1', '-n', '3', '--quiet')
  assert code == 0, err
  assert Image.open(tmp_path / 'x1.png').size == (12, 10)


def test_list_with_bom_bad_tile_size_and_output_too_large(tmp_path, capsys, model_dirs,
                                                         monkeypatch):
  # A list saved by Notepad: a byte-order mark and CRLF lines.
  _png(tmp_path / 'p' / 'one.png', (3, 5, 3))
  _png(tmp_path / 'p' / 'two.png', (4, 5, 3))
  (tmp_path / 'list.txt').write_bytes('\ufeffp/one.png\r\n# note\r\np/two.png\r\n'.encode())
  code, out, _ = _run(capsys, '-i', tmp_path / 'list.txt', '-o', tmp_path / 'o', '-m',
                      model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (0, '2 done, 0 skipped, 0 failed')
  # An empty folder: a hint, nothing to fail.
  os.makedirs(tmp_path / 'empty')
  (tmp_path / 'empty' / 'notes.heic').write_bytes(b'')
  code, out, err = _run(capsys, '-i', tmp_path / 'empty', '-o', tmp_path / 'o', '-m',
                        model_dirs['2x'])
  assert (code, out.strip()) == (0, '0 done, 0 skipped, 0 failed') and 'no images in' in err
  # A tile size the model's margin does not fit: one line for the run, not one per file.
  margin = upscale.inference.tile_margin(upscale.load_model(model_dirs['2x'])[2].model, 3)
  code, out, err = _run(capsys, '-i', tmp_path / 'p', '-o', tmp_path / 'o2', '-m',
                        model_dirs['2x'], '--quiet', '--tile-size', str(2 * margin))
  assert code == 1 and not os.path.exists(tmp_path / 'o2')
  assert err.count('must exceed twice') == 1 and f'at least {2 * margin + 1}' in err
  # An output larger than WebP can store fails before any pass runs; the other file goes on.
  Image.fromarray(np.zeros((2, 9000, 3), np.uint8)).save(tmp_path / 'p' / 'wide.png')
  ran = []
  real = upscale.inference.upscale_image
  monkeypatch.setattr(upscale.inference, 'upscale_image',
                      lambda upscaler, image, **kw: ran.append(image.shape) or real(upscaler, image, **kw))
  code, out, err = _run(capsys, '-i', tmp_path / 'p', '-o', tmp_path / 'o3', '-m',
                        model_dirs['2x'], '--quiet', '-f', 'webp', *FAST)
  assert (code, out.strip()) == (1, '2 done, 0 skipped, 1 failed')
  assert 'wide.png: the output would be 18000x4, over the 16383 pixels per side that webp' in err
  assert all(shape[1] != 9000 for shape in ran) and len(ran) == 2
  assert sorted(os.listdir(tmp_path / 'o3')) == ['one.webp', 'two.webp']


def test_ctrl_c_and_a_silent_peer_end_in_one_line(tmp_path, capsys, model_dirs, monkeypatch):
  for name in ('a', 'b', 'c'):
    _png(tmp_path / 'in' / f'{name}.png', (4, 5, 3))
  real = upscale.process
  calls = []

  def interrupted_on_second(src, *args):
    calls.append(src)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(src, *args)
  monkeypatch.setattr(upscale, 'process', interrupted_on_second)
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o', '-m',
                        model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (130, '1 done, 0 skipped, 0 failed') and 'interrupted' in err
  assert os.listdir(tmp_path / 'o') == ['a.png'] and not _tmp_files(tmp_path)
  # A peer process that died: its gather fails; this process says so in one line.
  monkeypatch.setattr(upscale, 'process', real)

  def dead_peer(values):
    raise RuntimeError('Gloo context initialization failed: DEADLINE_EXCEEDED\nmore')
  monkeypatch.setattr(upscale.distributed, 'allgather', dead_peer)
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o2', '-m',
                        model_dirs['2x'], '--quiet', *FAST)
  assert code == 1 and out == ''
  assert err.strip().splitlines() == [
      'w2x_jax.upscale: the other processes did not answer (Gloo context initialization failed: '
      'DEADLINE_EXCEEDED); this one: 3 done, 0 skipped, 0 failed']


def test_processes_that_see_different_inputs_stop_before_the_work(tmp_path, capsys, monkeypatch):
  # As two processes whose views of a shared folder differ (NFS caching, root_squash): each would
  # skip or repeat the others' files.
  for name in ('a', 'b'):
    _png(tmp_path / 'in' / f'{name}.png', (4, 5, 3))
  monkeypatch.setattr(upscale.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(upscale.distributed, 'allgather',
                      lambda values: np.array([values, [values[0] + 1, 1, 7, 0]]))
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o', '--quiet', *FAST,
                        load_model_fn=_no_model)
  assert (code, out) == (2, '')
  assert err.strip() == (f'w2x_jax.upscale: the processes see different inputs in {tmp_path / "in"} '
                         '(process 0: 2 files, process 1: 3 files, 1 unlistable folders); give '
                         'them all the same view of it')

  # A process that refuses the run (its output a file, its list unreadable) still meets the
  # others' check, and all stop.
  monkeypatch.setattr(upscale.distributed, 'allgather',
                      lambda values: np.array([values, [0, 0, 0, 1]]))
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o', '--quiet', *FAST,
                        load_model_fn=_no_model)
  assert (code, out) == (2, '')
  assert err.strip() == ('w2x_jax.upscale: stopped: process(es) 1 refused the run (see their '
                         'lines)')
  (tmp_path / 'file').write_text('')
  gathered = []
  monkeypatch.setattr(upscale.distributed, 'allgather',
                      lambda values: gathered.append(values) or np.array([values, values]))
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'file', '--quiet', *FAST,
                        load_model_fn=_no_model)
  assert (code, out, gathered[0][3]) == (2, '', True) and 'is a file' in err

  def dead_peer(values):
    raise RuntimeError('Gloo context initialization failed: DEADLINE_EXCEEDED\nmore')
  monkeypatch.setattr(upscale.distributed, 'allgather', dead_peer)
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o', '--quiet', *FAST,
                        load_model_fn=_no_model)
  assert (code, out) == (1, '')
  assert err.strip() == ('w2x_jax.upscale: the other processes did not answer (Gloo context '
                         'initialization failed: DEADLINE_EXCEEDED); nothing was done')
  assert not os.path.exists(tmp_path / 'o')


def _no_model(name):
  raise AssertionError(f'no model should be loaded (no work should start): {name}')


def test_pipes_unlistable_folders_links_and_lists_in_other_encodings(tmp_path, capsys, model_dirs):
  src = tmp_path / 'in'
  _png(src / 'ok.png', (4, 4, 3))
  os.mkfifo(src / 'pipe.png')  # opening it would wait for a writer for ever
  _png(tmp_path / 'elsewhere' / 'linked.png', (4, 4, 3))
  os.symlink(tmp_path / 'elsewhere', src / 'link')  # a linked folder is followed ...
  os.symlink(src, tmp_path / 'elsewhere' / 'loop')  # ... and a loop ends
  locked = src / 'locked'
  _png(locked / 'x.png', (4, 4, 3))
  os.chmod(locked, 0)
  try:
    unlistable = not os.access(locked, os.R_OK)  # root lists it anyway
    code, out, err = _run(capsys, '-i', src, '-o', tmp_path / 'out', '-m', model_dirs['2x'],
                          '--quiet', *FAST)
  finally:
    os.chmod(locked, 0o755)
  failed = 1 + int(unlistable)
  assert code == 1
  assert out.strip() == f'{3 - int(unlistable)} done, 0 skipped, {failed} failed'
  assert 'pipe.png: cannot read: not a regular file (a pipe or a device)' in err
  assert os.path.exists(tmp_path / 'out' / 'link' / 'linked.png')
  if unlistable:
    assert f'{locked}: cannot list the folder' in err
  # A list in another encoding than UTF-8 (its bytes are the file names), a file listed twice
  # (it runs once), and a pipe named as a list (not a list: a file that cannot be read).
  (tmp_path / 'latin.txt').write_bytes(b'in/ok.png\nin/caf\xe9.png\nin/ok.png\n')
  code, out, err = _run(capsys, '-i', tmp_path / 'latin.txt', '-o', tmp_path / 'o2', '--quiet',
                        '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '1 done, 0 skipped, 1 failed')
  assert err.strip().splitlines() == [f'{tmp_path}/in/caf\\xe9.png: cannot read: No such file or '
                                      'directory']
  # A newline or tab in a name: escaped, one line per file still.
  (tmp_path / 'ctl').mkdir()
  (tmp_path / 'ctl' / 'new\nline.png').write_bytes(b'junk')
  (tmp_path / 'ctl' / 'tab\t.png').write_bytes(b'junk')
  code, out, err = _run(capsys, '-i', tmp_path / 'ctl', '-o', tmp_path / 'o4', '--quiet',
                        '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 2 failed')
  assert err.strip().splitlines() == [
      f'{tmp_path}/ctl/new\\nline.png: cannot read: not an image file Pillow knows',
      f'{tmp_path}/ctl/tab\\t.png: cannot read: not an image file Pillow knows']
  os.mkfifo(tmp_path / 'fifo.txt')
  code, out, err = _run(capsys, '-i', tmp_path / 'fifo.txt', '-o', tmp_path / 'o3', '--quiet',
                        '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert 'fifo.txt: cannot read: not a regular file (a pipe or a device)' in err


def test_output_folder_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
  _png(tmp_path / 'in' / 'a.png', (4, 4, 3))
  (tmp_path / 'file').write_text('not a folder')
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'file' / 'sub', '--quiet',
                        *FAST, load_model_fn=_no_model)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert f'cannot write: {tmp_path / "file"} is not a folder' in err
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'file', '--quiet', *FAST,
                        load_model_fn=_no_model)  # the folder's outputs into a file: said once
  assert (code, out) == (2, '')
  assert err.strip() == (f'w2x_jax.upscale: {tmp_path / "file"}: is a file; the outputs of a folder '
                         'or a list go in a folder')
  os.makedirs(tmp_path / 'o2' / 'a.png')  # a folder where the output goes: not 'skipped'
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'o2', '--quiet', *FAST,
                        load_model_fn=_no_model)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert f'{tmp_path / "o2" / "a.png"}: cannot write: a folder is there' in err


def test_an_output_never_replaces_another_input(tmp_path, capsys, model_dirs):
  # -i D/in -o D: D/in/in/x.jpg's output is D/in/x.png, itself an input.
  before = _png(tmp_path / 'in' / 'x.png', (4, 4, 3))
  os.makedirs(tmp_path / 'in' / 'in')
  Image.fromarray(before[::-1]).save(tmp_path / 'in' / 'in' / 'x.jpg')
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path, '--overwrite', '--quiet',
                        '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '1 done, 0 skipped, 1 failed')
  assert f'x.jpg: its output {tmp_path}/in/x.png is another input' in err
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'in' / 'x.png')), before)


def test_two_names_of_one_output_clash_in_the_command(tmp_path, capsys, model_dirs, monkeypatch):
  # A case-insensitive disk makes out/b.png the same file as out/A.png: a hard link plays it.
  _png(tmp_path / 'in' / 'A.png', (4, 4, 3))
  _png(tmp_path / 'in' / 'b.png', (4, 4, 3), seed=1)
  real = upscale.image_io.write_image

  def write_image(path, *a, **k):
    real(path, *a, **k)
    if os.path.basename(path) == 'A.png':
      os.link(path, os.path.join(os.path.dirname(path), 'b.png'))
  monkeypatch.setattr(upscale.image_io, 'write_image', write_image)
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'out', '--quiet', '-m',
                        model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '1 done, 0 skipped, 1 failed')
  assert 'b.png: has the same output as' in err and 'A.png' in err


def test_links_into_the_tree_keep_the_folders_own_names(tmp_path):
  _png(tmp_path / 'in' / 'z' / 'photo.png', (4, 4, 3))
  os.symlink(tmp_path / 'in' / 'z', tmp_path / 'in' / 'a_link')  # sorts first; not followed
  _png(tmp_path / 'in' / '.originals' / 'kept.png', (4, 4, 3))
  os.symlink(tmp_path / 'in' / '.originals', tmp_path / 'in' / 'originals')  # the hidden one's way
  jobs = upscale.list_jobs(str(tmp_path / 'in'), str(tmp_path / 'out'), 'png')
  assert jobs == [(str(tmp_path / 'in' / n), str(tmp_path / 'out' / n))
                  for n in ('originals/kept.png', 'z/photo.png')]


def test_two_names_of_one_output_clash(tmp_path, loaded):
  # As A.png and a.png on a case-insensitive file system: here a hard link plays the alias.
  _png(tmp_path / 'A.png', (4, 4, 3))
  _png(tmp_path / 'b.png', (4, 4, 3), seed=1)
  args = upscale.parse_args(['-i', 'x', '-o', 'y', '-m', '2x', '--quiet', *FAST])
  runner = upscale.Runner(args, lambda key: loaded[key])
  written = {}
  assert upscale.process(str(tmp_path / 'A.png'), str(tmp_path / 'out' / 'A.png'), 'png', runner,
                         args, written) == 'done'
  os.link(tmp_path / 'out' / 'A.png', tmp_path / 'out' / 'a.png')
  with pytest.raises(upscale.JobError, match='b.png: has the same output as .*A.png'):
    upscale.process(str(tmp_path / 'b.png'), str(tmp_path / 'out' / 'a.png'), 'png', runner, args,
                    written)


@pytest.mark.parametrize('during_write', [False, True])
def test_sigterm_stops_with_its_counts_and_no_temporary_file(tmp_path, capsys, model_dirs,
                                                             monkeypatch, during_write):
  for k in range(3):
    _png(tmp_path / 'in' / f'{k}.png', (4, 4, 3), seed=k)
  calls = []
  real = upscale.image_io.atomic_write

  def atomic_write(path, save):
    calls.append(path)
    if len(calls) < 2:
      return real(path, save)
    if during_write:
      def killed(f):
        f.write(b'partial')
        os.kill(os.getpid(), signal.SIGTERM)
        save(f)
      return real(path, killed)
    os.kill(os.getpid(), signal.SIGTERM)
    return real(path, save)

  monkeypatch.setattr(upscale.image_io, 'atomic_write', atomic_write)
  previous = signal.getsignal(signal.SIGTERM)
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'out', '-m',
                        model_dirs['2x'], '--quiet', *FAST)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert code == 143 and 'interrupted (SIGTERM)' in err
  assert out.strip() == '1 done, 0 skipped, 0 failed'
  assert os.listdir(tmp_path / 'out') == ['0.png']  # no partial nor temporary file
  monkeypatch.setattr(upscale.image_io, 'atomic_write', real)
  code, out, _ = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'out', '-m',
                      model_dirs['2x'], '--quiet', *FAST)
  assert (code, out.strip()) == (0, '2 done, 1 skipped, 0 failed')


def _png_header_only(path, width, height):
  """A PNG whose header claims width x height (with a few bytes of pixel data)."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  path.write_bytes(b'\x89PNG\r\n\x1a\n'
                   + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                   + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def test_images_larger_than_the_free_memory_fail_before_the_work(tmp_path, capsys, model_dirs,
                                                                  monkeypatch):
  _png(tmp_path / 'in' / 'a.png', (40, 30, 3))
  _png_header_only(tmp_path / 'in' / 'huge.png', 100000, 100000)  # 10 gigapixels
  code, out, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'out', '--quiet', '-m',
                        model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '1 done, 0 skipped, 1 failed')
  line = [l for l in err.splitlines() if 'huge.png' in l]
  assert len(line) == 1 and '100000x100000 needs about 335 GB of memory' in line[0]
  assert 'decompression bomb' not in err  # Pillow's own limit is not the command's
  assert os.listdir(tmp_path / 'out') == ['a.png']
  # What is counted: a pass's float32 input and its output (8-bit: as much as the result and
  # Pillow's copy), or at 4x in 16 bits, the result and its copy at the end.
  assert upscale.memory_needed(30, 40, 3, 8, [2]) == int(1.5 * 30 * 40 * 3 * (4 + 4 * 1))
  assert upscale.memory_needed(30, 40, 4, 8, [2]) == int(1.5 * 30 * 40 * 4 * (4 * 2 + 4 * 1))
  assert upscale.memory_needed(30, 40, 3, 16, [2, 2]) == int(1.5 * 30 * 40 * 3 * 2 * 16 * 2)
  # A resize (-s 1.5): the passes' result and its premultiplied copy, the resized array and one
  # channel's planes (the copy had not been counted: 3000x3000 RGBA peaked at twice the estimate).
  before, after = 30 * 40 * 4 * 4, 45 * 60 * 4
  assert upscale.memory_needed(30, 40, 4, 8, [2], (45, 60)) == int(
      1.5 * (before * 4 * 2 + after * 4 + (before * 4 + after * 8) // 4))
  # Lanczos alone to a larger size (a scale-1 model): the float32 result written as integers.
  assert upscale.memory_needed(10, 10, 3, 8, [1], (100, 100)) == int(1.5 * 100 * 100 * 3 * 14)
  # A machine with less free memory refuses a small image the same way, and says how much.
  monkeypatch.setattr(upscale, 'available_memory', lambda: 10000)
  code, out, err = _run(capsys, '-i', tmp_path / 'in' / 'a.png', '-o', tmp_path / 'small.png',
                        '--quiet', '-m', model_dirs['2x'], *FAST)
  assert (code, out.strip()) == (1, '0 done, 0 skipped, 1 failed')
  assert 'a.png: 30x40 needs about 42.2 KB of memory, 9.77 KB free; a smaller -s' in err
  assert not os.path.exists(tmp_path / 'small.png')
  # Grey + alpha over a coloured --background is counted as the RGB image it becomes.
  la = tmp_path / 'in' / 'la.png'
  Image.fromarray(np.zeros((40, 30, 2), np.uint8), 'LA').save(la)
  for colour, counted in (('red', 3), ('white', 1)):
    code, _, err = _run(capsys, '-i', la, '-o', tmp_path / 'la_out.png', '--quiet', '-m',
                        model_dirs['2x'], '--background', colour, *FAST)
    want = upscale.format_bytes(upscale.memory_needed(40, 30, counted, 8, [2]))
    assert code == 1 and f'needs about {want} of memory' in err, (colour, err)
  # A container's memory limit (cgroup v2) counts where it leaves less than the machine.
  numbers = {'/proc/meminfo': 8 << 20, '/sys/fs/cgroup/memory.max': 3 << 30,
             '/sys/fs/cgroup/memory.current': (1 << 30) + (256 << 20),
             '/sys/fs/cgroup/memory.stat': 256 << 20}  # its inactive_file: page cache
  monkeypatch.undo()
  monkeypatch.setattr(upscale, '_read_number', lambda path, field=None: numbers[path])
  assert upscale.available_memory() == 2 << 30  # 8 GiB free, 2 GiB under the limit
  numbers['/sys/fs/cgroup/memory.max'] = None  # 'max': no limit
  assert upscale.available_memory() == 8 << 30


def test_shipped_models_keep_flat_colours():
  """Flat fills (anime-style art) stay flat and keep their colour: an audit had found (0, 0, 255)
  out of noise0 as (0, 0, 245), and scale2x_noise3 turning saturated fills into a checkerboard."""
  from w2x_jax import inference  # pylint: disable=g-import-not-at-top
  colours = [(0, 0, 255), (255, 0, 0), (0, 255, 0), (64, 0, 255), (0, 0, 0), (255, 255, 255),
             (154, 242, 4), (255, 128, 0)]
  for name in upscale.shipped_names():
    _, params, config = upscale.load_model(name)
    upscaler = inference.Upscaler(params, config.model)
    for colour in colours:
      out = upscaler(np.broadcast_to(np.float32(colour) / 255, (32, 32, 3)).copy()) * 255
      centre = out[out.shape[0] // 4:-out.shape[0] // 4, out.shape[1] // 4:-out.shape[1] // 4]
      assert np.abs(centre - colour).max() < 2.5, (name, colour, centre.min((0, 1)), centre.max((0, 1)))


def test_alpha_and_folder_choices(tmp_path, capsys, loaded, model_dirs):
  """Alpha of a denoising pass goes through the model without denoising (JPEG noise removal had
  erased dithered transparency); -o the input folder is refused; -s 1 with a 2x model says why."""
  asked = []

  def fake_load(name):
    asked.append(name)
    return loaded['1x' if name.startswith('noise') else '2x']
  rgba = _png(tmp_path / 'a.png', (6, 5, 4))

  def run(*extra):
    asked.clear()
    code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'b.png', '--overwrite',
                        '--quiet', *FAST, *extra, load_model_fn=fake_load)
    assert code == 0, err
  run('-n', '1')
  assert asked == ['scale2x_noise1', 'scale2x_noisenone']
  run('-n', '-1')
  assert asked == ['scale2x_noisenone']
  run('-m', 'scale2x_noise1')
  assert asked == ['scale2x_noise1']  # a model of one's choice does all
  del rgba
  code, _, err = _run(capsys, '-i', tmp_path / 'a.png', '-o', tmp_path / 'c.png', '-m',
                      model_dirs['2x'], '-s', '1', '--quiet', *FAST)
  assert code == 1 and '-s 1 with a 2x model runs nothing' in err
  os.makedirs(tmp_path / 'in')
  _png(tmp_path / 'in' / 'x.jpg', (4, 4, 3))
  code, _, err = _run(capsys, '-i', tmp_path / 'in', '-o', tmp_path / 'in' / '.', '--quiet',
                      load_model_fn=_no_model)
  assert code == 2 and 'is the input folder' in err and os.listdir(tmp_path / 'in') == ['x.jpg']


def test_resize_and_composite_keep_flat_colours():
  # Lanczos past a flat fill's edge: its overshoot had stayed in the opaque pixels' colour.
  image = np.zeros((20, 20, 4), np.float32)
  image[5:15, 5:15] = [0.5, 0.5, 0.5, 1.0]
  out = upscale.resize(image, 30, 30)
  opaque = out[..., 3] >= 1.0
  assert opaque.any() and np.abs(out[opaque][:, :3] - 0.5).max() < 1e-3
  # Grey + alpha over a colour is that colour, in RGB (it had been the colour's luma).
  la = np.stack([np.full((2, 2), 0.2), np.array([[1.0, 0.0], [0.5, 0.0]])], -1).astype(np.float32)
  out = image_io.composite(la, (1.0, 0.0, 0.0))
  assert out.shape == (2, 2, 3)
  np.testing.assert_allclose(out[0, 1], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(out[0, 0], [0.2, 0.2, 0.2])
  assert image_io.composite(la, (1.0, 1.0, 1.0)).shape == (2, 2, 1)  # over grey: stays grey


def test_pillow_warnings_name_their_file(tmp_path, capsys, model_dirs):
  # A camera JPEG whose EXIF is cut: Pillow warns "Corrupt EXIF data" (raw, two lines, no name).
  exif = b'Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06'
  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / 'cam.jpg', exif=exif)
  code, _, err = _run(capsys, '-i', tmp_path / 'cam.jpg', '-o', tmp_path / 'cam.png',
                      '-m', model_dirs['2x'], *FAST)
  assert code == 0
  lines = [l for l in err.splitlines() if 'EXIF' in l]
  assert len(lines) == 1 and lines[0].startswith(f'{tmp_path / "cam.jpg"}: warning: Corrupt EXIF')
  assert 'warnings.warn' not in err
  code, _, err = _run(capsys, '-i', tmp_path / 'cam.jpg', '-o', tmp_path / 'cam2.png',
                      '-m', model_dirs['2x'], '--quiet', *FAST)
  assert code == 0 and err == ''
