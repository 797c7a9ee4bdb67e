"""Exported models replacing an earlier export: whole, even when the export is killed midway."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from configs import test as test_config
from w2x_jax import checkpoint
from w2x_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Exports params x 2 over OUT, SIGKILLed once it has removed one file of what it removes.
_EXPORT_KILLED_WHILE_REMOVING = '''
import os, shutil, signal, sys
import jax
from w2x_jax import checkpoint
def rmtree_then_die(path, *args, **kwargs):
  os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
  os.kill(os.getpid(), signal.SIGKILL)
checkpoint.shutil.rmtree = rmtree_then_die
_, params, config = checkpoint.restore_model(sys.argv[1])
checkpoint.export_model(sys.argv[1], jax.tree.map(lambda p: p * 2, params), config)
'''


def _params():
  config = test_config.get_config()
  return jax.device_get(train.create_train_state(config, jax.random.PRNGKey(0)).params), config


def test_killed_while_replacing_leaves_a_whole_export(tmp_path):
  params, config = _params()
  out = checkpoint.export_model(tmp_path / 'model', params, config)
  proc = subprocess.run([sys.executable, '-c', _EXPORT_KILLED_WHILE_REMOVING, out], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -9, proc.stderr
  # It had removed the earlier export in place (one file left, no model); now it is swapped out.
  assert sorted(os.listdir(out)) == [checkpoint.CONFIG_FILE, checkpoint.PARAMS_FILE]
  _, restored, _ = checkpoint.restore_model(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b * 2), restored, params)


def test_replaces_without_an_atomic_swap_too(tmp_path, monkeypatch):
  params, config = _params()
  out = checkpoint.export_model(tmp_path / 'model', params, config)
  monkeypatch.setattr(checkpoint, '_exchange', lambda a, b: False)
  checkpoint.export_model(out, jax.tree.map(lambda p: p * 2, params), config)
  assert os.listdir(tmp_path) == ['model']  # no folder left aside
  _, restored, _ = checkpoint.restore_model(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b * 2), restored, params)
