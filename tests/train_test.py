"""Training: the step learns, devices do not change the result, runs resume exactly, restores work."""

import asyncio
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import espcn_su as espcn_config
from configs import test as test_config
from w2x_jax import checkpoint
from w2x_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_image_folder(folder, count=4, size=40, seed=0):
  """Small smooth-plus-texture RGB images (real files, so the whole loading path runs)."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(count):
    base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1)
    image = (base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)).clip(0, 1)
    Image.fromarray((image * 255).astype(np.uint8)).save(folder / f'img{i}.png')
  return folder


def tiny_config(train_dir, **train_overrides):
  config = test_config.get_config()
  config.data.train_dir = str(train_dir)
  config.train.update(train_overrides)
  return config


def test_restore_while_the_run_removes_the_step_it_read(tmp_path, monkeypatch):
  # A script restoring a workdir that a run is training in: the step it picked (the latest, an
  # older best) can be removed under it; it reads again from what is kept, not a TensorStore error.
  config = test_config.get_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  checkpoint.save_run_config(str(tmp_path), config)
  manager = checkpoint.make_manager(str(tmp_path))
  for step in (1, 2):
    checkpoint.save_train_state(manager, state.replace(step=step))
  manager.close()
  orbax_params = checkpoint._orbax_params  # pylint: disable=protected-access
  removed = []

  def removing(step_path, restore):
    if not removed:  # as the run's next save does to an old step, between listing and reading
      removed.append(step_path)
      shutil.rmtree(step_path)
    return orbax_params(step_path, restore)
  monkeypatch.setattr(checkpoint, '_orbax_params', removing)
  assert checkpoint.restore_model(tmp_path, with_step=True)[3] == 1
  assert removed == [str(tmp_path / checkpoint.CHECKPOINT_DIR / '2')]


def test_overfits_one_batch():
  config = test_config.get_config()
  config.train.schedule = 'constant'
  config.train.learning_rate = 3e-3
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(config))
  rng = np.random.default_rng(0)
  hr = jnp.asarray(rng.uniform(0, 1, (4, 24, 24, 3)), jnp.float32)
  lr = jax.image.resize(hr, (4, 12, 12, 3), 'linear')
  batch = {'lr': lr, 'hr': hr, 'weight': jnp.ones(4)}
  losses = []
  for _ in range(50):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 50


def test_padding_samples_change_nothing():
  config = test_config.get_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(config))
  rng = np.random.default_rng(1)
  batch = {'lr': rng.uniform(0, 1, (3, 12, 12, 3)).astype(np.float32),
           'hr': rng.uniform(0, 1, (3, 24, 24, 3)).astype(np.float32)}
  padded = train.pad_local_batch(batch, 4)
  assert padded['lr'].shape[0] == 4 and padded['weight'].tolist() == [1, 1, 1, 0]
  _, m_padded = step(state, padded)
  _, m_plain = step(state, dict(batch, weight=np.ones(3, np.float32)))
  np.testing.assert_allclose(float(m_padded['loss']), float(m_plain['loss']), rtol=1e-6)


def test_one_device_equals_four(tmp_path):
  folder = make_image_folder(tmp_path / 'images')
  params = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    assert len(devices) in (1, 4)
    # 6 is not a multiple of 4: the padded, weighted batch must still give the same update.
    config = tiny_config(folder, batch_size=6, num_steps=3, eval_every=3, checkpoint_every=3)
    state = train.train_and_evaluate(config, str(tmp_path / f'run{len(devices)}'), devices=devices)
    assert int(state.step) == 3
    params.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *params)


def test_throughput_leaves_out_the_first_steps_compilation(tmp_path, monkeypatch):
  # A first step that takes 1000 s to compile: the first line's patches/s (and so its ETA) is
  # the steps' after it, as the lines after it are.
  clock = [0.0]
  monkeypatch.setattr(train, 'time', mock.Mock(time=lambda: time.time() + clock[0]))
  make_train_step = train.make_train_step

  def slow_to_compile(config):
    step = make_train_step(config)

    def traced(state, batch):
      clock[0] += 1000  # runs once: while jit traces the step, before it compiles it
      return step(state, batch)
    return traced
  monkeypatch.setattr(train, 'make_train_step', slow_to_compile)
  config = tiny_config(make_image_folder(tmp_path / 'images'), num_steps=4, log_every=2)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [json.loads(line) for line in open(tmp_path / 'run' / train.METRICS_FILE)]
  assert clock[0] == 1000
  assert [r['step'] for r in rows if 'patches_per_s' in r] == [2, 4]
  assert all(r['patches_per_s'] > 1 for r in rows if 'patches_per_s' in r), rows
  # A line at every step: the first one's window is that step, compile and all (not 0 patches/s).
  config = tiny_config(make_image_folder(tmp_path / 'images'), num_steps=2, log_every=1)
  train.train_and_evaluate(config, str(tmp_path / 'run1'))
  rows = [json.loads(line) for line in open(tmp_path / 'run1' / train.METRICS_FILE)]
  assert [r['step'] for r in rows if 'patches_per_s' in r] == [1, 2]
  assert all(r['patches_per_s'] > 0 for r in rows if 'patches_per_s' in r), rows


def test_plot_draws_a_single_point(tmp_path, monkeypatch):
  # A run's first picture holds one validation (and, with log_every = eval_every, one loss): each
  # curve, bicubic's too, must show it, not a line between no two points.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figures = []
  monkeypatch.setattr(plt, 'close', figures.append)
  train.write_plot([{'step': 5, 'loss': 1.3}, {'step': 5, 'val_psnr': 10.3, 'val_bicubic_psnr': 30.5}],
                   str(tmp_path / train.PLOT_FILE))
  lines = [line for ax in figures[0].axes for line in ax.get_lines()]
  assert len(lines) == 3 and all(line.get_marker() not in (None, '', 'None') for line in lines)
  assert (tmp_path / train.PLOT_FILE).stat().st_size > 1000


def test_metrics_plot_restore_and_export(tmp_path, caplog, capsys):
  folder = make_image_folder(tmp_path / 'images')
  workdir = tmp_path / 'run'
  config = tiny_config(folder, num_steps=4)
  state = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in open(workdir / train.METRICS_FILE)]
  assert [r['step'] for r in rows if 'loss' in r] == [2, 4]
  val = [r for r in rows if 'val_psnr' in r]
  assert [r['step'] for r in val] == [2, 4]
  assert all(np.isfinite(r['val_psnr']) and r['val_bicubic_psnr'] > 10 for r in val)
  assert (workdir / train.PLOT_FILE).stat().st_size > 1000
  samples = np.asarray(Image.open(workdir / train.SAMPLES_FILE))
  assert samples.shape[1] == 4 * 40 + 3 * 4  # input, bicubic, model, truth of the 40x40 held-out image
  assert sorted(os.listdir(workdir / checkpoint.CHECKPOINT_DIR)) == ['2', '4']

  # Two lines in a script: params only, no optimizer state.
  model, params, saved = checkpoint.restore_model(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(state.params))
  assert saved.model.to_dict() == json.loads(config.model.to_json())
  x = jnp.zeros((1, 5, 7, 3))
  assert model.apply({'params': params}, x).shape == (1, 10, 14, 3)
  _, params2, _ = checkpoint.restore_model(workdir / checkpoint.CHECKPOINT_DIR / '2')
  assert not np.allclose(jax.tree.leaves(params2)[0], jax.tree.leaves(params)[0])
  _, params2_by_step, _ = checkpoint.restore_model(workdir, step=2)
  jax.tree.map(np.testing.assert_array_equal, params2_by_step, params2)
  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint of step 3 \(it keeps steps 2, 4\)'):
    checkpoint.restore_model(workdir, step=3)
  with pytest.raises(checkpoint.CheckpointError, match='step=2 and best=True name different'):
    checkpoint.restore_model(workdir, step=2, best=True)
  with pytest.raises(checkpoint.CheckpointError, match='a step folder is its own step'):
    checkpoint.restore_model(workdir / checkpoint.CHECKPOINT_DIR / '2', step=4)

  exported = checkpoint.export_model(tmp_path / 'exported', params, config)
  assert sorted(os.listdir(exported)) == [checkpoint.CONFIG_FILE, checkpoint.PARAMS_FILE]
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(exported).st_mode & 0o777 == 0o777 & ~umask  # readable by others, as mkdir's
  _, params3, config3 = checkpoint.restore_model(exported)
  with pytest.raises(checkpoint.CheckpointError, match='an exported model holds one set'):
    checkpoint.restore_model(exported, best=True)
  jax.tree.map(np.testing.assert_array_equal, params3, jax.device_get(params))
  assert config3.model.scale == 2

  # The same from the command line (the best step here: validation PSNR is logged at 2 and 4).
  assert checkpoint.main(['export', str(workdir), str(tmp_path / 'cli'), '--best']) == 0
  best_at = checkpoint.restore_model(workdir, best=True, with_step=True)[3]
  assert f'cli (step {best_at}, ' in capsys.readouterr().out  # which checkpoint, said
  _, params4, _ = checkpoint.restore_model(tmp_path / 'cli')
  _, best, _ = checkpoint.restore_model(workdir, best=True)
  jax.tree.map(np.testing.assert_array_equal, params4, jax.device_get(best))
  assert checkpoint.main(['export', str(tmp_path / 'nothing'), str(tmp_path / 'cli2')]) == 1
  assert not (tmp_path / 'cli2').exists()
  # An earlier export is replaced; anything else is refused and left as it was (the workdir
  # itself, a folder of other files).
  assert checkpoint.main(['export', str(workdir), str(tmp_path / 'cli')]) == 0
  before = sorted(os.listdir(workdir))
  assert checkpoint.main(['export', str(workdir), str(workdir)]) == 1
  assert sorted(os.listdir(workdir)) == before
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  with pytest.raises(checkpoint.CheckpointError, match='mine: exists and is not an exported model'):
    checkpoint.export_model(tmp_path / 'mine', params, config)
  assert os.listdir(tmp_path / 'mine') == ['notes.txt']

  # Running the same config again resumes at its end: nothing more to do, params unchanged.
  caplog.set_level(logging.INFO)
  again = train.train_and_evaluate(config, str(workdir))
  assert int(again.step) == 4 and 'Already done: step 4 of 4' in caplog.text
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
               jax.device_get(state.params))


def test_incompatible_model_is_refused(tmp_path):
  folder = make_image_folder(tmp_path / 'images')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(folder, num_steps=2), workdir)
  config = tiny_config(folder, num_steps=4)
  config.model.layers = 4
  with pytest.raises(checkpoint.CheckpointError, match=r'another model.*layers=3 saved vs 4'):
    train.train_and_evaluate(config, workdir)
  # Another optimizer state (AdamW, no clipping): refused before anything is overwritten.
  saved = (tmp_path / 'run' / checkpoint.CONFIG_FILE).read_text()
  for field, value, message in [('optimizer', 'adamw', "train.optimizer='adam' saved vs 'adamw'"),
                                ('grad_clip', 0.0, 'train.grad_clip > 0=True saved vs False')]:
    config = tiny_config(folder, num_steps=4, **{field: value})
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
      train.train_and_evaluate(config, workdir)
    assert (tmp_path / 'run' / checkpoint.CONFIG_FILE).read_text() == saved
  # A workdir whose run stopped before its first checkpoint takes another model.
  config = tiny_config(tmp_path / 'no_such_folder', num_steps=1)
  with pytest.raises(train.data.DataError):
    train.train_and_evaluate(config, str(tmp_path / 'early'))
  config = tiny_config(folder, num_steps=1)
  config.model.layers = 4
  assert int(train.train_and_evaluate(config, str(tmp_path / 'early')).step) == 1


def test_a_nan_validation_never_ranks_best(tmp_path):
  state = train.create_train_state(test_config.get_config(), jax.random.PRNGKey(0))
  manager = checkpoint.make_manager(tmp_path, keep=1)
  for step, psnr in [(2, 20.0), (3, float('nan')), (4, 15.0), (5, 14.0)]:
    checkpoint.save_train_state(manager, state.replace(step=step), metrics={'val_psnr': psnr})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 5] and checkpoint.best_step(manager) == 2


def test_validation_skips_slivers_and_metrics_survive_a_cut_line(tmp_path, caplog):
  folder = make_image_folder(tmp_path / 'images')
  val = make_image_folder(tmp_path / 'val', count=2, size=64)
  Image.fromarray(np.zeros((5, 300, 3), np.uint8)).save(val / 'sliver.png')
  config = tiny_config(folder, num_steps=2)
  config.data.val_dir = str(val)
  train_images, val_images = train.load_datasets(config)
  assert [im.shape for im in val_images] == [(64, 64, 3)] * 2
  config.data.synthetic_images = 3  # drawings join the training images, never validation
  more_train, same_val = train.load_datasets(config)
  assert len(more_train) == len(train_images) + 3 and len(same_val) == 2
  assert all(np.array_equal(a, b) for a, b in zip(more_train[:-3], train_images))
  # A metrics file whose last line was cut short (a full disk): skipped, then dropped on resume.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / train.METRICS_FILE).write_text('{"step": 2, "loss": 0.5}\n{"step": 4, "lo')
  log = train.MetricsLog(str(workdir), resume_step=4)
  assert log.rows() == [{'step': 2, 'loss': 0.5}]
  assert (workdir / train.METRICS_FILE).read_text() == '{"step": 2, "loss": 0.5}\n'
  assert 'not a JSON row' in caplog.text


def test_init_from_copies_matching_params_then_resuming_wins(tmp_path):
  folder = make_image_folder(tmp_path / 'images')
  train.train_and_evaluate(tiny_config(folder, num_steps=2), str(tmp_path / 'a'))
  _, source, _ = checkpoint.restore_model(tmp_path / 'a')
  flat_source = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}

  # A scale-1 model (a denoiser) from a scale-2 one: all but the upsampler's params are copied.
  config = tiny_config(folder, num_steps=1, init_from=str(tmp_path / 'a'))
  config.model.scale, config.data.noise_level = 1, 1
  fresh = train.create_train_state(config, jax.random.PRNGKey(config.seed)).params
  params, (copied, total) = train.init_params_from(fresh, str(tmp_path / 'a'))
  assert 0 < copied < total
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    same_shape = key in flat_source and flat_source[key].shape == value.shape
    expected = flat_source[key] if same_shape else fresh_leaf(fresh, path)
    np.testing.assert_array_equal(value, expected)

  # In a run: the first step starts from the copied params; a rerun resumes instead.
  state = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert int(state.step) == 1
  config.train.num_steps = 2
  config.train.init_from = str(tmp_path / 'no_such_model')  # ignored: the workdir has a checkpoint
  assert int(train.train_and_evaluate(config, str(tmp_path / 'b')).step) == 2

  with pytest.raises(train.ConfigError, match='init_from.*no_such_model'):
    train.init_params_from(fresh, str(tmp_path / 'no_such_model'))
  other = espcn_config.get_config()
  other.model.filters = (8, 8)
  with pytest.raises(train.ConfigError, match='no parameter matches'):
    train.init_params_from(train.create_train_state(other, jax.random.PRNGKey(0)).params,
                           str(tmp_path / 'a'))


def fresh_leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_bad_config_values_name_the_field(tmp_path):
  for field, value, message in [('train.loss', 'l3', 'config.train.loss'),
                                ('train.batch_size', 0, 'config.train.batch_size'),
                                ('data.noise_level', 7, 'config.data.noise_level'),
                                ('data.val_count', 0, 'config.data.val_count'),
                                ('data.val_max_side', 1, 'config.data.val_max_side'),
                                ('train.learning_rate', float('inf'), 'learning_rate=inf: must be finite'),
                                ('train.warmup_steps', -1, 'warmup_steps=-1: must be >= 0'),
                                ('train.weight_decay', -1.0, 'weight_decay=-1.0: must be >= 0'),
                                # The model's fields, checked before the workdir is touched.
                                ('model.activation', 'gelu', "config.model.activation='gelu' must be one of"),
                                ('model.name', 'srcnn', "config.model.name='srcnn' must be one of"),
                                ('model.first_filters', 0, 'config.model.first_filters=0 and last_filters'),
                                ('model.recon_b1', 0, 'config.model.recon_b1=0 must be >= 1'),
                                ('model.dtype', 'int8', "config.model.dtype='int8' must be a float type"),
                                ('model.gamma', -1.0, 'config.model.gamma=-1.0 must be a finite number'),
                                # The data fields (NaN had made every pair clean).
                                ('data.nr_rate', float('nan'), r'config.data.nr_rate=nan: must be in \[0, 1\]'),
                                ('data.nr_rate', 2.0, r'config.data.nr_rate=2.0: must be in \[0, 1\]')]:
    config = tiny_config(tmp_path)
    section, name = field.split('.')
    config[section][name] = value
    if name in ('gamma', 'nr_rate'):
      config.model.filter_decay, config.data.noise_level = 'power', 1
    with pytest.raises(train.ConfigError, match=message):
      train.check_config(config)
  config = tiny_config(tmp_path)
  config.model.scale, config.data.noise_level = 1, -1
  with pytest.raises(train.ConfigError, match='nothing to learn'):
    train.check_config(config)
  config = tiny_config(tmp_path)
  config.data.filter_weights.box = float('inf')
  with pytest.raises(train.ConfigError, match='config.data.filter_weights.box=inf: must be a finite'):
    train.check_config(config)
  config = tiny_config(tmp_path)
  config.seed = -1
  with pytest.raises(train.ConfigError, match='config.seed=-1: must be >= 0'):
    train.check_config(config)
  config.seed = 10 ** 20  # had been a traceback (numpy), and 2**32 the same init as 0
  with pytest.raises(train.ConfigError, match=r'config.seed=100000000000000000000: must be < 2\*\*32'):
    train.check_config(config)
  config = tiny_config(tmp_path)
  config.train.schedule, config.train.decay_every = 'step', 0
  with pytest.raises(train.ConfigError, match='config.train.decay_every=0: must be > 0'):
    train.check_config(config)
  config = espcn_config.get_config()
  config.model.filters = (8, 8.5)  # an override's tuple items are not type-checked
  with pytest.raises(train.ConfigError, match=r'config.model.filters=\(8, 8.5\) must be counts'):
    train.check_config(config)
  config = tiny_config(tmp_path)
  config.model.activation = 'gelu'
  with pytest.raises(train.ConfigError, match='activation'):  # and nothing was written
    train.train_and_evaluate(config, str(tmp_path / 'never'))
  assert not (tmp_path / 'never').exists()


def _main_cmd(workdir, train_dir, *extra):
  return [sys.executable, str(ROOT / 'main.py'), '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.train_dir={train_dir}', '--config.train.num_steps=8',
          '--config.train.checkpoint_every=2', '--config.train.eval_every=4', *extra]


def _env():
  # The same compiler settings in every run, so results compare exactly.
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
              JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_PLATFORMS='cpu')


def _params(workdir):
  return jax.device_get(checkpoint.restore_model(workdir)[1])


def _stat(pid):
  """(state, parent pid) of a process from /proc (Linux), or None once it is gone."""
  try:
    fields = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
  except OSError:
    return None
  return fields[0], int(fields[1])


def _children(pid):
  """PIDs of the processes whose parent is `pid`."""
  pids = [int(path.name) for path in pathlib.Path('/proc').iterdir() if path.name.isdigit()]
  return [child for child in pids if (_stat(child) or (None, None))[1] == pid]


def _alive(pid):
  stat = _stat(pid)
  return stat is not None and stat[0] != 'Z'


def _run_until_checkpoint(cmd, workdir, step, sig, group=False):
  """Starts a training process and sends `sig` once the checkpoint of `step` exists (to its whole
  process group where `group`, as Ctrl-C or `timeout` do). Returns (returncode, output, the PIDs
  of its child processes just before the signal)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=group)
  target = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR / str(step)
  deadline = time.time() + 240
  while not target.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  children = _children(proc.pid)
  if group:
    os.killpg(proc.pid, sig)
  else:
    proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out, children


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  """Killed (patches made by a worker process) and resumed: the same params as a run straight
  through (patches made by threads), and the killed run's worker exits on its own."""
  folder = make_image_folder(tmp_path / 'images')
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  subprocess.run(_main_cmd(straight, folder), cwd=ROOT, env=_env(), check=True, capture_output=True)
  code, out, children = _run_until_checkpoint(
      _main_cmd(killed, folder, '--config.data.num_workers=1'), killed, 2, signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  assert children, 'no worker process'
  deadline = time.time() + 10
  while any(map(_alive, children)) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(map(_alive, children)), 'a worker outlived the killed training process'
  steps = sorted(int(s) for s in os.listdir(killed / checkpoint.CHECKPOINT_DIR) if s.isdigit())
  assert steps and steps[-1] < 8, steps
  resumed = subprocess.run(_main_cmd(killed, folder), cwd=ROOT, env=_env(), capture_output=True,
                           text=True)
  assert resumed.returncode == 0, resumed.stderr
  assert f'Resuming from step {steps[-1]}' in resumed.stderr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               _params(straight), _params(killed))


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
  """SIGTERM to the whole process group (as `timeout` sends it): the workers leave it to the
  training process, which saves a checkpoint and exits with the shell's code for SIGTERM."""
  folder = make_image_folder(tmp_path / 'images')
  workdir = tmp_path / 'run'
  cmd = _main_cmd(workdir, folder, '--config.train.num_steps=100000', '--config.data.num_workers=1')
  code, out, _ = _run_until_checkpoint(cmd, workdir, 2, signal.SIGTERM, group=True)
  assert code == 128 + signal.SIGTERM, out  # not 0: a scheduler must not take it as finished
  assert 'Stopped by SIGTERM' in out and 'checkpoint saved' in out
  steps = sorted(int(s) for s in os.listdir(workdir / checkpoint.CHECKPOINT_DIR) if s.isdigit())
  assert steps[-1] >= 2
  # What was saved is the state at the step the log names: one more checkpoint beyond the periodic.
  assert f'at step {steps[-1]}' in out
  # The losses up to that step are logged (a row at the stop step, whatever log_every says).
  rows = [json.loads(line) for line in open(workdir / train.METRICS_FILE)]
  assert [r['step'] for r in rows if 'loss' in r][-1] == steps[-1]


def test_a_second_ctrl_c_that_python_cannot_raise_is_no_traceback(monkeypatch):
  # Raised in a garbage-collector callback (seen in CI), the second signal's KeyboardInterrupt is
  # "ignored" with a traceback printed; the run stops at the next step through the first's flag.
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  info = lambda exc_type: mock.Mock(exc_type=exc_type)
  with train._StopRequest():  # pylint: disable=protected-access
    sys.unraisablehook(info(KeyboardInterrupt))
    sys.unraisablehook(info(ValueError))
  assert [i.exc_type for i in seen] == [ValueError] and sys.unraisablehook == seen.append


def test_two_ctrl_c_stop_in_one_line(tmp_path):
  """A second SIGINT (during the stop's checkpoint, say) ends the run at once: exit 130 and a
  line, no traceback; the next run resumes."""
  folder = make_image_folder(tmp_path / 'images')
  workdir = tmp_path / 'run'
  cmd = _main_cmd(workdir, folder, '--config.train.num_steps=100000')
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  target, deadline = workdir / checkpoint.CHECKPOINT_DIR / '2', time.time() + 240
  while not target.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT and 'Traceback' not in out, out
  resumed = subprocess.run(_main_cmd(workdir, folder, '--config.train.num_steps=4'), cwd=ROOT,
                           env=_env(), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr


def test_dead_patch_worker_stops_after_a_checkpoint(tmp_path):
  """A worker killed (as for memory) stops the run in one line, the steps done since the last
  periodic checkpoint saved (they had been lost)."""
  folder = make_image_folder(tmp_path / 'images')
  workdir = tmp_path / 'run'
  cmd = _main_cmd(workdir, folder, '--config.train.num_steps=100000', '--config.data.num_workers=1',
                  '--config.train.checkpoint_every=100000', '--config.train.log_every=1')
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics, deadline = workdir / train.METRICS_FILE, time.time() + 240
  while proc.poll() is None and time.time() < deadline and (
      not metrics.exists() or metrics.read_text().count('"loss"') < 3):
    time.sleep(0.05)
  for child in _children(proc.pid):  # the worker (and multiprocessing's resource tracker)
    os.kill(child, signal.SIGKILL)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, out
  assert 'main.py: error: a patch worker process died' in out.strip().splitlines()[-1]
  assert 'Checkpoint saved before stopping' in out
  steps = [int(s) for s in os.listdir(workdir / checkpoint.CHECKPOINT_DIR) if s.isdigit()]
  assert steps and max(steps) >= 3, steps


def test_diverged_run_stops_in_one_line_keeping_its_last_good_checkpoint(tmp_path):
  config = tiny_config(make_image_folder(tmp_path / 'images'), learning_rate=1e9, grad_clip=0.0,
                       schedule='constant', num_steps=40, log_every=1, checkpoint_every=1,
                       eval_every=1000)
  with pytest.raises(train.Diverged, match=r'((loss|grad_norm) (nan|inf)|non-finite parameters) '
                     r'by step \d+: the run diverged; its checkpoints stop at step \d+'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  # What was saved has finite parameters, and a finite loss on the next step (the grads that
  # made them were checked too: the loss alone is the step before's).
  _, params, _ = checkpoint.restore_model(str(tmp_path / 'run'))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(params)))


def test_a_save_cut_short_is_cleared_by_the_next_run(tmp_path):
  config = tiny_config(make_image_folder(tmp_path / 'images'), num_steps=2, eval_every=2)
  left = tmp_path / 'run' / checkpoint.CHECKPOINT_DIR / '651.orbax-checkpoint-tmp'
  left.mkdir(parents=True)
  (left / 'part').write_bytes(b'x' * 100)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not left.exists()
  # Cleared before make_manager returns: Orbax's thread for it, left running by a run that
  # stopped before its first save (a bad init_from), had failed at exit with a traceback.
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  rmtree = async_path.rmtree

  async def slow_rmtree(path):
    await asyncio.sleep(0.5)
    return await rmtree(path)
  left.mkdir()
  with mock.patch.object(async_path, 'rmtree', slow_rmtree):
    checkpoint.make_manager(str(tmp_path / 'run'))
    assert not left.exists()


def test_schedules_by_hand():
  tc = test_config.get_config().train
  tc.update(learning_rate=1.0, num_steps=100, warmup_steps=10, decay_every=30, decay_rate=0.5)
  tc.schedule = 'constant'
  assert float(train.make_schedule(tc)(77)) == 1.0
  tc.schedule = 'cosine'
  cosine = train.make_schedule(tc)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(55)) == pytest.approx(0.5, abs=1e-6)  # halfway through the cosine
  assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
  tc.schedule = 'step'
  step = train.make_schedule(tc)
  assert [float(step(s)) for s in (0, 29, 30, 61, 95)] == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_keeps_latest_and_best(tmp_path):
  config = test_config.get_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  manager = checkpoint.make_manager(tmp_path, keep=1)
  for step, psnr in [(2, 10.0), (4, 30.0), (6, 20.0), (8, None)]:
    state = state.replace(step=step, params=jax.tree.map(lambda p, s=step: p * 0 + s, state.params))
    checkpoint.save_train_state(manager, state, metrics=psnr and {'val_psnr': psnr})
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 8]  # the best by PSNR and the latest
  assert checkpoint.best_step(manager) == 4
  checkpoint.save_run_config(tmp_path, config)
  _, params, _ = checkpoint.restore_model(tmp_path, best=True)
  assert all(np.all(np.asarray(p) == 4) for p in jax.tree.leaves(params))
  _, params, _ = checkpoint.restore_model(tmp_path)
  assert all(np.all(np.asarray(p) == 8) for p in jax.tree.leaves(params))
  # After a restart the best is still known (its metrics are on disk) and still kept.
  manager = checkpoint.make_manager(tmp_path, keep=1)
  checkpoint.save_train_state(manager, state.replace(step=10), metrics={'val_psnr': 5.0})
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 10] and checkpoint.best_step(manager) == 4


def test_longer_cosine_run_warns_that_its_rate_rises(tmp_path, caplog):
  config = test_config.get_config()
  config.train.schedule = 'cosine'
  checkpoint.save_run_config(tmp_path, config)
  (tmp_path / checkpoint.CHECKPOINT_DIR / '8').mkdir(parents=True)  # as a finished run has
  config.train.num_steps *= 2
  with caplog.at_level('WARNING'):
    checkpoint.save_run_config(tmp_path, config)
  assert 'the cosine schedule goes on as one of the new length' in caplog.text
  caplog.clear()
  config.train.num_steps //= 4  # shorter: no word of a rise
  with caplog.at_level('WARNING'):
    checkpoint.save_run_config(tmp_path, config)
  assert 'cosine' not in caplog.text


def test_a_workdir_in_use_is_refused_and_freed_with_its_run(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  lock = checkpoint.lock_workdir(str(workdir))  # as a run in progress holds it
  try:
    with pytest.raises(checkpoint.CheckpointError,
                       match=f'another training run is using it \\(pid {os.getpid()}\\)'):
      train.train_and_evaluate(tiny_config(tmp_path), str(workdir))
    assert sorted(os.listdir(workdir)) == [checkpoint.LOCK_FILE]  # no config.json written
  finally:
    lock.close()
  # A place that cannot be written: one line (it had been a traceback, and over several
  # processes the others had waited for process 0 until a timeout).
  (tmp_path / 'file').write_text('')
  with pytest.raises(checkpoint.CheckpointError, match='file/run: cannot write there: Not a directory'):
    train.train_and_evaluate(tiny_config(tmp_path), str(tmp_path / 'file' / 'run'))
  # An exported model's folder: its config.json had been replaced, its params left unloadable.
  model = tmp_path / 'model'
  config = tiny_config(tmp_path)
  checkpoint.export_model(model, train.create_train_state(config, jax.random.PRNGKey(0)).params,
                          config)
  before = (model / checkpoint.CONFIG_FILE).read_text()
  with pytest.raises(checkpoint.CheckpointError, match='model: holds an exported model'):
    train.train_and_evaluate(tiny_config(tmp_path, num_steps=2), str(model))
  assert (model / checkpoint.CONFIG_FILE).read_text() == before
  # Nothing added (a .lock had made export_model refuse the folder as not an export).
  assert sorted(os.listdir(model)) == sorted([checkpoint.CONFIG_FILE, checkpoint.PARAMS_FILE])
  # A file system without locks: the run goes on, with a warning.
  def no_locks(*_):
    raise OSError(errno.ENOLCK, 'No locks available')
  with mock.patch.object(checkpoint.fcntl, 'flock', no_locks):
    checkpoint.lock_workdir(str(workdir)).close()
  # A run's lock goes with it, even with SIGKILL.
  code = ('import os, sys; from w2x_jax import checkpoint; checkpoint.lock_workdir(sys.argv[1]); '
          'os.kill(os.getpid(), 9)')
  subprocess.run([sys.executable, '-c', code, str(workdir)], check=False, cwd=ROOT)
  checkpoint.lock_workdir(str(workdir)).close()
