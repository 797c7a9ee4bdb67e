"""Joining a multi-process run on JAX's distributed runtime (training and the upscale command).

Every process runs the same command with its own `process_id`; process 0's host serves as the
coordinator. With none of the three values given the run is a single process, unless
`mode='auto'` (`--distributed=auto`, or W2X_DISTRIBUTED=auto) asks JAX to read them from the
cluster (SLURM, Open MPI, TPU pods, ...). On CPU, the processes exchange gradients over gloo
(TCP); on GPU over NCCL.
"""

import os

import numpy as np

# jax is imported inside the functions: main.py imports this module for its flags, and patch worker
# processes re-import main.py without needing JAX.

ENV_VAR = 'W2X_DISTRIBUTED'
MODES = ('off', 'auto')


class DistributedError(RuntimeError):
  """A multi-process setup that cannot work (one line)."""


def gloo_available():
  """Whether this jaxlib was built with the gloo CPU collectives."""
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  return hasattr(_jax, 'make_gloo_tcp_collectives')


def initialize(coordinator_address=None, num_processes=None, process_id=None, mode=None):
  """Joins the run described by the arguments (or the cluster); returns True if multi-process.

  Must be called before anything touches a JAX device. `mode` is 'off' (default: single process
  unless the three values are given) or 'auto' (JAX's cluster auto-detection fills in what is
  not given); None reads W2X_DISTRIBUTED.
  """
  mode = (mode or os.environ.get(ENV_VAR) or 'off').lower()
  if mode not in MODES:
    raise DistributedError(f'distributed mode {mode!r}: must be one of {list(MODES)}')
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if all(v is None for v in given.values()) and mode == 'off':
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing and mode != 'auto':
    raise DistributedError(f'--{" --".join(missing)} missing: give all of --coordinator_address, '
                           '--num_processes and --process_id, or --distributed=auto on a cluster '
                           'that JAX detects')
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f'--num_processes={num_processes}: must be >= 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f'--process_id={process_id}: must be in [0, {num_processes})')
  # JAX takes the port after the last ':' (an IndexError traceback where there is none).
  if coordinator_address is not None and not coordinator_address.rpartition(':')[2].isdigit():
    raise DistributedError(f'--coordinator_address={coordinator_address}: must be HOST:PORT')
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU need an implementation; gloo (TCP) needs nothing installed.
  # The flag only concerns the CPU client, so it is harmless on GPU hosts. An explicit choice
  # (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept.
  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    raise DistributedError(f'cannot join the distributed run: {str(e).splitlines()[0]}') from e
  return jax.process_count() > 1


def allgather(values):
  """A small int vector from every process: (process_count, len) numpy, the same on all."""
  import jax  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # int32: x64 is off, and collectives on int64 would silently truncate anyway.
  return np.asarray(multihost_utils.process_allgather(values.astype(np.int32))).reshape(
      jax.process_count(), -1).astype(np.int64)


def broadcast_from_0(value):
  """Process 0's int (e.g. an error flag) on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
