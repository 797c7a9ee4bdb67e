"""Several processes on JAX's distributed runtime (gloo on loopback): training gives the same params
as one process with as many devices, both processes killed and restarted resume, and the upscale
command splits a folder across processes with one summary."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from w2x_jax import checkpoint
from w2x_jax import distributed

import train_test  # pylint: disable=g-bad-import-order (tests/ is on sys.path under pytest)
import upscale_test  # pylint: disable=g-bad-import-order

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5
TIMEOUT = 240

pytestmark = pytest.mark.skipif(
    not distributed.gloo_available(),
    reason='this jaxlib has no gloo CPU collectives (jax._src.lib._jax.make_gloo_tcp_collectives)')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  # The same compiler settings in every run, so that results compare; `devices` CPU devices each.
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_PLATFORMS='cpu')


def _dist_flags(port, count, index):
  return [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
          f'--process_id={index}']


def _train_cmd(workdir, images, *extra):
  return [sys.executable, str(ROOT / 'main.py'), '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.train_dir={images}', f'--config.train.num_steps={STEPS}',
          '--config.train.checkpoint_every=2', '--config.train.eval_every=2', *extra]


class _Group:
  """Processes started together, one log file each (no pipe to fill up and block them)."""

  def __init__(self, cmds, env, logdir, name):
    self.logs = [logdir / f'{name}{i}.log' for i in range(len(cmds))]
    self.procs = []
    for cmd, log in zip(cmds, self.logs):
      with open(log, 'w') as f:
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                           stderr=subprocess.STDOUT, text=True))

  def wait(self, timeout=TIMEOUT):
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1, deadline - time.time())) for p in self.procs]
    finally:
      self.kill()

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def output(self, i):
    return self.logs[i].read_text()

  def outputs(self):
    return '\n'.join(f'--- process {i} ---\n{self.output(i)}' for i in range(len(self.logs)))


def _run_two(tmp_path, name, make_cmd):
  port = _free_port()
  group = _Group([make_cmd(_dist_flags(port, 2, i)) for i in range(2)], _env(1), tmp_path, name)
  return group, group.wait()


def _params(workdir):
  return jax.device_get(checkpoint.restore_model(workdir)[1])


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  return train_test.make_image_folder(tmp_path_factory.mktemp('mp') / 'images')


@pytest.fixture(scope='module')
def one_process_two_devices(images):
  """The reference: one process, 2 CPU devices, the same seed and global batch."""
  workdir = images.parent / 'one_process'
  group = _Group([_train_cmd(workdir, images)], _env(2), images.parent, 'one')
  assert group.wait() == [0], group.outputs()
  return _params(workdir)


def test_two_processes_match_one_process_with_two_devices(tmp_path, images,
                                                          one_process_two_devices):
  workdir = tmp_path / 'two_processes'
  group, codes = _run_two(tmp_path, 'two', lambda flags: _train_cmd(workdir, images, *flags))
  assert codes == [0, 0], group.outputs()
  log0, log1 = group.output(0), group.output(1)
  assert 'processes: 2, global batch 4' in log0 and f'Done: {STEPS} steps' in log0, log0
  assert 'step 2/' not in log1 and 'Done:' not in log1, log1  # one log: process 0's
  # Checkpoints, metrics and the plot written once, by process 0, in the shared workdir.
  assert str(STEPS) in os.listdir(workdir / checkpoint.CHECKPOINT_DIR)
  rows = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert sum('"loss"' in r for r in rows) == 3, rows  # steps 2, 4, 5: once each
  _assert_close(_params(workdir), one_process_two_devices)


def test_kill_both_and_restart_resumes(tmp_path, images, one_process_two_devices):
  workdir = tmp_path / 'killed'
  port = _free_port()
  cmds = [_train_cmd(workdir, images, *_dist_flags(port, 2, i)) for i in range(2)]
  group = _Group(cmds, _env(1), tmp_path, 'killed')
  first = workdir / checkpoint.CHECKPOINT_DIR / '2'
  deadline = time.time() + TIMEOUT
  while not first.exists() and all(p.poll() is None for p in group.procs) and time.time() < deadline:
    time.sleep(0.05)
  for p in group.procs:
    p.send_signal(signal.SIGKILL)
  assert group.wait() == [-signal.SIGKILL] * 2, group.outputs()
  saved = sorted(int(s) for s in os.listdir(workdir / checkpoint.CHECKPOINT_DIR) if s.isdigit())
  assert saved and saved[-1] < STEPS, saved

  group, codes = _run_two(tmp_path, 'resumed', lambda flags: _train_cmd(workdir, images, *flags))
  assert codes == [0, 0], group.outputs()
  assert f'Resuming from step {saved[-1]}' in group.output(0), group.output(0)
  assert f'Done: {STEPS} steps' in group.output(0)
  # Resumed across processes, the run still ends where one uninterrupted process does.
  _assert_close(_params(workdir), one_process_two_devices)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, images):
  workdir = tmp_path / 'stopped'
  port = _free_port()
  cmds = [_train_cmd(workdir, images, '--config.train.num_steps=100000', *_dist_flags(port, 2, i))
          for i in range(2)]
  group = _Group(cmds, _env(1), tmp_path, 'stopped')
  first = workdir / checkpoint.CHECKPOINT_DIR / '2'
  deadline = time.time() + TIMEOUT
  while not first.exists() and all(p.poll() is None for p in group.procs) and time.time() < deadline:
    time.sleep(0.05)
  group.procs[1].send_signal(signal.SIGTERM)  # as a scheduler might, to one process only
  assert group.wait() == [143, 143], group.outputs()  # 128 + SIGTERM: stopped, not finished
  saved = max(int(s) for s in os.listdir(workdir / checkpoint.CHECKPOINT_DIR) if s.isdigit())
  assert f'Stopped by SIGTERM at step {saved}' in group.output(1), group.outputs()
  assert f'Stopped by a signal to another process at step {saved}' in group.output(0)


def test_upscale_splits_a_folder_across_processes(tmp_path):
  model = upscale_test._export(tmp_path / 'model', 2)  # pylint: disable=protected-access
  src, dst = tmp_path / 'in', tmp_path / 'out'
  names = ['a.png', 'b.png', 'c.png', 'sub/d.png', 'sub/e.png']
  for i, name in enumerate(names):
    upscale_test._png(str(src / name), (6 + i, 5, 3), seed=i)  # pylint: disable=protected-access
  (src / 'sub' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)

  def cmd(flags):
    return [sys.executable, '-m', 'w2x_jax.upscale', '-i', str(src), '-o', str(dst), '-m',
            str(model), '--tile-size', '32', '--batch-size', '4', *flags]

  group, codes = _run_two(tmp_path, 'upscale', cmd)
  # One file failed on one process: both exit 1; one summary of all, from process 0.
  assert codes == [1, 1], group.outputs()
  summaries = [line for i in range(2) for line in group.output(i).splitlines()
               if line.endswith(' failed')]
  assert summaries == ['5 done, 0 skipped, 1 failed'], group.outputs()
  assert 'corrupt.png' in group.outputs()
  assert 'process 0 of 2' in group.output(0) and 'device(s)' not in group.output(1)
  # Every output exactly once (5 done in all, and each of the 5 is there), nothing left half-done.
  written = sorted(str(p.relative_to(dst)) for p in dst.rglob('*') if p.is_file())
  assert written == names, written


@pytest.mark.parametrize('address', ['127.0.0.1', '127.0.0.1:', 'host:port'])
def test_coordinator_address_without_a_port_is_one_line(address):
  # Refused before JAX's initialize, which raised an IndexError traceback on it.
  with pytest.raises(distributed.DistributedError, match='must be HOST:PORT'):
    distributed.initialize(address, 2, 0)


def test_upscale_ends_the_others_when_process_0_dies(tmp_path):
  # Process 0 runs JAX's coordination service: its death ends the others at once (JAX's abort,
  # README), not a hang; what they wrote is whole.
  model = upscale_test._export(tmp_path / 'model', 2)  # pylint: disable=protected-access
  src, dst = tmp_path / 'in', tmp_path / 'out'
  for i in range(60):
    upscale_test._png(str(src / f'{i:02}.png'), (40, 40, 3), seed=i)  # pylint: disable=protected-access
  port = _free_port()
  cmds = [[sys.executable, '-m', 'w2x_jax.upscale', '-i', str(src), '-o', str(dst), '-m',
           str(model), *_dist_flags(port, 2, i)] for i in range(2)]
  group = _Group(cmds, _env(1), tmp_path, 'dead0')
  deadline = time.time() + TIMEOUT
  while (not (dst.exists() and any(dst.iterdir())) and all(p.poll() is None for p in group.procs)
         and time.time() < deadline):
    time.sleep(0.05)
  group.procs[0].send_signal(signal.SIGKILL)
  codes = group.wait(timeout=60)
  assert codes[0] == -signal.SIGKILL and codes[1] in (1, -signal.SIGABRT), group.outputs()
  for path in dst.iterdir():
    assert not path.name.startswith('.') or path.name.startswith('.w2x-'), path
    if not path.name.startswith('.'):
      Image.open(path).load()
