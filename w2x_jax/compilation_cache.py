"""JAX's persistent compilation cache for the commands, so a second run skips XLA compilation.

The training command, the upscale command, the web page and the evaluation command call `enable()`
before their first compilation: a compiled train step or tile function is written to a folder and
read back by the next process that compiles the same program with the same JAX, devices and flags
(a resumed run, the next `upscale` call). On this 2-core CPU the seed DCSCN's init + first train
step took 28 s cold and 8 s from the cache. The library itself never sets it (no hidden global
state): a script calls `enable()` itself if it wants it. `python -m w2x_jax.bench` leaves it off, as
its compile column measures compilation.

Not on x86-64 CPUs: there the models' programs hold oneDNN's convolutions
(`conv.compiler_options`), which XLA cannot serialize (jaxlib 0.12: std::bad_alloc when JAX writes
the entry, and a warning per program), and the faster convolutions win: the compact DCSCN's train
step runs 1.5x faster with them, against 5 s saved per start by the cache (28 s and 8 s above were
measured without them). So the cache serves GPUs, TPUs and other CPUs.

Where: $W2X_JAX_CACHE_DIR if set (empty or 'off': no cache), else $XDG_CACHE_HOME/w2x-jax/xla
(~/.cache/w2x-jax/xla). A folder already given to JAX (JAX_COMPILATION_CACHE_DIR) is kept.
The folder is capped at MAX_BYTES, least recently used entries evicted first (JAX's own LRU, which
needs the `filelock` package); only process 0 of a multi-process run writes to it.
"""

import os
import pathlib
import sys
import warnings

from w2x_jax import conv

ENV_VAR = 'W2X_JAX_CACHE_DIR'
MAX_BYTES = 1 << 30  # entries are 0.1-2 MB each (a train step, a tile function)
# Programs that compile faster than this are not worth a file (JAX's default is 1 s; the compact
# model's tile functions compile in about 1 s on 2 CPU cores).
MIN_COMPILE_SECONDS = 0.5
_OFF = ('', 'off', '0', 'false', 'none')


def default_dir(environ=None):
  """The cache folder the commands use, or None where $W2X_JAX_CACHE_DIR turns it off."""
  environ = os.environ if environ is None else environ
  if ENV_VAR in environ:
    value = environ[ENV_VAR].strip()
    return None if value.lower() in _OFF else pathlib.Path(value).expanduser()
  base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'w2x-jax' / 'xla'


def enable(directory=None, *, program='w2x_jax'):
  """Points JAX's persistent compilation cache at `directory` (default: `default_dir()`) unless
  JAX already has one; returns the folder in use, or None (turned off, programs that use oneDNN's
  convolutions, or a folder that cannot be made: one warning line on stderr). Call it before JAX's
  backend starts or after, and before the first compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  current = jax.config.jax_compilation_cache_dir
  if current:
    _one_line_warnings(program, current, 'JAX_COMPILATION_CACHE_DIR')
    return pathlib.Path(current)
  # Decided without starting the backend (the upscale command joins jax.distributed after this).
  if conv.compiler_options('cpu' if conv.runs_on_cpu_only() else 'accelerator'):
    return None
  path = pathlib.Path(directory).expanduser() if directory is not None else default_dir()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError('not writable')
  except OSError as e:
    print(f'{program}: warning: compilation cache {path}: {e.strerror or e}; running uncached '
          f'(set {ENV_VAR}=off to silence)', file=sys.stderr)
    return None
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  _one_line_warnings(program, path, f'{ENV_VAR}=off')
  return path


def _one_line_warnings(program, path, off):
  """JAX warns of each entry it cannot write or read (a full disk; an entry cut short, which it
  then fails to read in every later run) in two lines naming its own source: said here in one
  line, the first time; other warnings are shown as before."""
  show, said = warnings.showwarning, []

  def showwarning(message, category, filename, lineno, file=None, line=None):
    if 'persistent compilation cache' not in str(message):
      return show(message, category, filename, lineno, file, line)
    if not said:
      said.append(message)
      print(f'{program}: warning: compilation cache {path}: {message} (emptying the folder or '
            f'{off} ends it)', file=sys.stderr)
    return None

  warnings.showwarning = showwarning
