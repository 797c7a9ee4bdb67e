"""The commands' persistent compilation cache: where it lives, turned off (by the user, or where
the programs use oneDNN's convolutions), unwritable, and a second upscale run reading its compiled
tile function back instead of compiling it."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from w2x_jax import compilation_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_default_dir_from_the_environment():
  assert compilation_cache.default_dir({}) == pathlib.Path(os.path.expanduser('~'), '.cache',
                                                            'w2x-jax', 'xla')
  assert compilation_cache.default_dir({'XDG_CACHE_HOME': '/c'}) == pathlib.Path('/c/w2x-jax/xla')
  assert compilation_cache.default_dir({'W2X_JAX_CACHE_DIR': '/d', 'XDG_CACHE_HOME': '/c'}) == (
      pathlib.Path('/d'))
  for off in ('', 'off', 'OFF', '0'):
    assert compilation_cache.default_dir({'W2X_JAX_CACHE_DIR': off}) is None


def test_unusable_folder_is_one_warning_and_no_cache(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(compilation_cache.conv, 'compiler_options', lambda *args, **kwargs: {})
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  assert compilation_cache.enable(blocker / 'cache', program='upscale') is None
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('upscale: warning: compilation cache')
  assert str(blocker / 'cache') in err and 'running uncached' in err
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.config.jax_compilation_cache_dir is None


def test_off_where_the_programs_use_onednn(tmp_path, monkeypatch, capsys):
  """x86-64 CPUs: XLA cannot serialize oneDNN's convolutions, and those win over the cache."""
  monkeypatch.setattr(compilation_cache.conv, 'runs_on_cpu_only', lambda: True)
  monkeypatch.setattr(compilation_cache.conv.platform_lib, 'machine', lambda: 'x86_64')
  assert compilation_cache.enable(tmp_path / 'cache') is None
  assert not (tmp_path / 'cache').exists()
  monkeypatch.setattr(compilation_cache.conv.platform_lib, 'machine', lambda: 'aarch64')
  blocker = tmp_path / 'a_file'  # past the oneDNN check: the folder is tried (and fails here)
  blocker.write_text('')
  assert compilation_cache.enable(blocker / 'cache') is None
  assert 'compilation cache' in capsys.readouterr().err


def test_a_folder_given_to_jax_is_kept(tmp_path):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax'),
             W2X_JAX_CACHE_DIR=str(tmp_path / 'ours'))
  out = subprocess.run(
      [sys.executable, '-c', 'from w2x_jax import compilation_cache as c; print(c.enable())'],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
  assert out.strip() == str(tmp_path / 'jax')


# Runs the upscale command in a fresh process and reports JAX's persistent-cache hits.
_UPSCALE_COUNTING_HITS = '''
import json, sys
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
from w2x_jax import compilation_cache, conv, upscale
compilation_cache.MIN_COMPILE_SECONDS = 0  # this tiny image's programs compile in well under 0.5 s
# As on a GPU or a non-x86 CPU: programs without oneDNN's convolutions, which XLA can serialize.
conv.compiler_options = lambda *args, **kwargs: {}
code = upscale.main(sys.argv[1:])
print(json.dumps(dict(code=code, hits=len(hits))))
'''


def test_second_upscale_reads_the_compiled_tiles_back(tmp_path):
  cache = tmp_path / 'cache'
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(tmp_path / 'in.png')
  env = dict(os.environ, W2X_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  results = []
  for run in ('first', 'second'):
    out = tmp_path / f'{run}.png'
    proc = subprocess.run([sys.executable, '-c', _UPSCALE_COUNTING_HITS, '-i', str(tmp_path / 'in.png'),
                           '-o', str(out), '--quiet'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if run == 'first':
      entries = sorted(p.name for p in cache.iterdir() if p.name.endswith('-cache'))
      assert entries, 'the first run wrote no compiled program'
  assert [r['code'] for r in results] == [0, 0]
  assert results[0]['hits'] == 0 and results[1]['hits'] >= 1
  assert sorted(p.name for p in cache.iterdir() if p.name.endswith('-cache')) == entries
  first = np.asarray(Image.open(tmp_path / 'first.png'))
  assert np.array_equal(first, np.asarray(Image.open(tmp_path / 'second.png')))
  assert first.shape == (80, 112, 3)


def test_entries_it_cannot_write_or_read_are_one_warning_line(tmp_path):
  """A full disk (here a file size limit) fails JAX's writes and leaves an entry cut short, which
  every later run fails to read: one line each time, not JAX's two-line warning per program."""
  import resource  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(tmp_path / 'in.png')  # a small output
  env = dict(os.environ, W2X_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
  for run, preexec in (('full', limit), ('after', None)):
    proc = subprocess.run([sys.executable, '-c', _UPSCALE_COUNTING_HITS, '-i', str(tmp_path / 'in.png'),
                           '-o', str(tmp_path / f'{run}.png'), '--quiet'], preexec_fn=preexec,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])['code'] == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('w2x_jax.upscale: warning: compilation cache '), (
        proc.stderr)
    assert ('Error writing' if run == 'full' else 'Error reading') in lines[0]
