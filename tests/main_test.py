"""main.py's flags: config files with `:args`, `--config.x.y=` overrides and clear errors."""

import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(*args):
  values = flags.FlagValues()
  argv = ['main.py', *args]
  # Override flags (--config.a.b=) are defined from the argument list, as main.py gets sys.argv.
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_config_args_and_overrides():
  config = parse('--config=configs/dcscn.py:noise=2,scale=1', '--config.train.batch_size=8',
                 '--config.data.filter_weights.box=0')
  assert (config.data.noise_level, config.model.scale, config.train.batch_size) == (2, 1, 8)
  assert config.data.filter_weights.box == 0
  assert config.model.layers == 12 and config.model.first_filters == 196


@pytest.mark.parametrize('name', ['default', 'dcscn', 'dcscn_compact', 'dcscn_paper', 'espcn_su', 'quick', 'test'])
def test_every_config_loads(name):
  config = parse(f'--config=configs/{name}.py')
  assert config.model.scale == 2 and config.data.noise_level == -1


def run_main(*args):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_unknown_field_is_one_clear_line(tmp_path):
  result = run_main('--config=configs/test.py', '--config.train.no_such_field=1',
                    f'--workdir={tmp_path}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'main.py: error: unknown config field --config.train.no_such_field'], result.stderr
  # A near name: ml_collections' suggestion, on the same line as the whole flag.
  result = run_main('--config=configs/test.py', '--config.train.num_step=5', f'--workdir={tmp_path}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'main.py: error: unknown config field --config.train.num_step. Did you mean "num_steps" '
      'instead of "num_step"?'], result.stderr
  result = run_main('--config=configs/test.py', '--config.trian.num_steps=5', f'--workdir={tmp_path}')
  assert result.stderr.strip().splitlines() == [
      'main.py: error: unknown config field --config.trian.num_steps. Did you mean "train" '
      'instead of "trian"?'], result.stderr


def test_help_says_how_to_set_a_config_field():
  # ml_collections defines --config.x.y flags only for those given: --help lists none of them.
  result = run_main('--help')
  assert '--config.FIELD=VALUE' in result.stdout and 'configs/default.py' in result.stdout, result.stdout


def test_bad_config_argument_is_one_clear_line(tmp_path):
  result = run_main('--config=configs/test.py:noise=7', f'--workdir={tmp_path}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[0].endswith(
      'ValueError: config argument noise=7: must be one of (-1, 0, 1, 2, 3)'), result.stderr


def test_missing_config_file_is_one_clear_line(tmp_path):
  for extra in ([], ['--config.train.num_steps=3']):  # loaded lazily without overrides
    result = run_main('--config=configs/nope.py', f'--workdir={tmp_path}', *extra)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "main.py: error: --config=configs/nope.py: cannot load it: [Errno 2] No such file or "
        "directory: 'configs/nope.py'"], result.stderr
  # absl takes the last --config; a file's own Python error is one line too.
  (tmp_path / 'broken.py').write_text('def get_config(:\n  pass\n')
  result = run_main('--config=configs/test.py', f'--config={tmp_path / "broken.py"}',
                    f'--workdir={tmp_path}')
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [
      f'main.py: error: --config={tmp_path / "broken.py"}: cannot load it: SyntaxError: invalid '
      'syntax (broken.py, line 1)'], result.stderr


@pytest.mark.parametrize('args, message', [
    (['--config=configs/test.py', '--config.train.batch_size=many'], 'batch_size'),
    (['--config=configs/test.py:noise=9'], 'noise=9'),
    (['--config=configs/test.py:colour=2'], 'colour'),
])
def test_bad_flags_are_clear_errors(args, message):
  with pytest.raises(flags.Error, match=message):
    parse(*args)


def test_main_reports_errors_in_one_line(tmp_path):
  missing = tmp_path / 'no_such_folder'
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path / "w"}',
                    f'--config.data.train_dir={missing}')
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('main.py: error:') and str(missing) in last, result.stderr
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path / "w"}', '--config.train.loss=l3')
  assert result.returncode == 1 and 'config.train.loss' in result.stderr.strip().splitlines()[-1]
  # An error after the checkpoint manager exists: Orbax's clean-up thread had added a traceback.
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path / "w2"}',
                    '--config.train.init_from=no_such_model')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'main.py: error: config.train.init_from: no_such_model'), result.stderr


def test_training_log_keeps_orbax_warnings_but_the_unranked_checkpoint():
  import logging  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top

  def record(level, message, path='/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'):
    return logging.LogRecord('absl', level, path, 1, message, None, None)
  keep = main._QuietLibraries().filter  # pylint: disable=protected-access
  assert not keep(record(logging.INFO, 'Saving checkpoint at step 2'))
  assert not keep(record(logging.WARNING, 'Requested `tracked_metric`; did not provide metrics.'))
  assert keep(record(logging.WARNING, 'Something else went wrong'))
  assert keep(record(logging.INFO, 'step 2/8  loss 0.1', path='/work/w2x_jax/train.py'))
  # The backends JAX skips on a CPU machine; its warnings (a GPU that failed) still show.
  bridge = '/venv/site-packages/jax/_src/xla_bridge.py'
  assert not keep(record(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to "
                         'open libtpu.so', path=bridge))
  assert keep(record(logging.WARNING, 'An NVIDIA GPU may be present on this machine, but a '
                     'CUDA-enabled jaxlib is not installed. Falling back to cpu.', path=bridge))


def test_scripts_elsewhere_import_the_package(tmp_path):
  """setup.sh puts the repository on the venv's path (a .pth file): a user's script in another
  folder imports w2x_jax (it had needed PYTHONPATH)."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  if not (pathlib.Path(sysconfig.get_paths()['purelib']) / 'w2x_jax_repo.pth').exists():
    pytest.skip('this interpreter was not set up by setup.sh')
  result = subprocess.run([sys.executable, '-c', 'import w2x_jax; print(w2x_jax.__file__)'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert pathlib.Path(result.stdout.strip()).name == '__init__.py'
