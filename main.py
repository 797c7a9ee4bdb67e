"""Trains a w2x-jax model: `python main.py --config=configs/dcscn.py --workdir=runs/dcscn`.

As in the flax examples, this file only parses flags; the work is in w2x_jax/train.py.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from w2x_jax import distributed

# JAX and the training code are imported in main(): patch worker processes (config.data.num_workers)
# re-import this file as Python's spawn does, and need none of it.

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and the config; reused to resume.')
config_flags.DEFINE_config_file(
    'config', None, 'A config file, e.g. configs/dcscn.py or configs/dcscn.py:noise=2,scale=1. '
    'Set any of its fields with --config.FIELD=VALUE, e.g. --config.train.num_steps=700 (the '
    'fields, with comments: configs/default.py).', lock_config=True)
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, to join a multi-process run (with --num_processes and '
                    '--process_id); every process runs the same command')
flags.DEFINE_integer('num_processes', None, 'Processes in the multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes).')
flags.DEFINE_enum('distributed', None, list(distributed.MODES),
                  'auto: let JAX read the multi-process setup from the cluster (SLURM, Open MPI, '
                  f'TPU); default: ${distributed.ENV_VAR}, else off (single process unless the '
                  'three flags above are given).')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(pylogging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the training log; its warnings still show, but
  for the one at each checkpoint saved without a validation (eval_every != checkpoint_every, a
  stop between validations): such a checkpoint is simply not ranked among the best. Also JAX's
  INFO lines on the backends it tries and skips ('tpu', 'proxy' on every CPU machine): nothing to
  act on; where a GPU or TPU is present and fails, JAX warns on its own."""

  def filter(self, record):
    if record.pathname.endswith('/jax/_src/xla_bridge.py'):
      return (record.levelno >= pylogging.WARNING
              or not record.getMessage().startswith('Unable to initialize backend'))
    if '/orbax/' not in record.pathname:
      return True
    return record.levelno >= pylogging.WARNING and 'did not provide metrics' not in record.getMessage()


def _config_arg(argv):
  """The --config value as given (--config=PATH or --config PATH; the last, as absl takes it)."""
  value = ''
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def parse_flags(argv):
  """absl's parsing, with a config override error (unknown field, bad value) as one clear line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # a file that failed to load raises at first use (ml_collections)
    return rest
  except OSError as e:  # the config file cannot be loaded (missing, unreadable)
    lines = [line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip()]
    sys.exit(f'main.py: error: --config={_config_arg(argv)}: cannot load it: {lines[-1]}')
  except (SyntaxError, ImportError) as e:  # the file's own Python, raised as it is imported
    sys.exit(f'main.py: error: --config={_config_arg(argv)}: cannot load it: '
             f'{type(e).__name__}: {e}')
  except flags.Error as e:
    message = str(e)
    if 'Traceback (most recent call last)' in message:  # a config file's own error: its last line
      lines = [line for line in message.splitlines() if line.strip()]
      message = f'{lines[0]} {lines[-1]}'
    sys.exit(f'main.py: error: {message}\nPass --helpfull to see the flags.')
  except (KeyError, ValueError, TypeError, AttributeError) as e:
    missing = e if isinstance(e, KeyError) else e.args[0] if e.args else None
    if isinstance(missing, KeyError):  # an unknown field: ml_collections names its last part only
      # ("'num_step'", or with a near name "'num_step'\nDid you mean "num_steps" instead of ...?")
      key, _, hint = str(missing.args[0]).partition('\n') if missing.args else ('', '', '')
      key = key.strip("'")
      # The flag whose path holds it: the last part, or a group (--config.trian.num_steps).
      flag = next((arg.split('=')[0] for arg in argv if arg.startswith('--config.')
                   and f'.{key}.' in arg.split('=')[0] + '.'), key)
      sys.exit(f'main.py: error: unknown config field {flag}' + (f'. {hint}' if hint else ''))
    sys.exit(f'main.py: error: bad config override: {e}')


def main(argv):
  import jax  # pylint: disable=g-import-not-at-top
  from w2x_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from w2x_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  from w2x_jax import conv  # pylint: disable=g-import-not-at-top
  from w2x_jax import data  # pylint: disable=g-import-not-at-top
  from w2x_jax import train  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  conv.keep_freed_memory_on_cpu()  # before JAX's backend starts its threads (conv.py)
  compilation_cache.enable(program='main.py')  # a resumed run skips compiling its step
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed)
  except distributed.DistributedError as e:
    sys.exit(f'main.py: error: {e}')
  if jax.process_index() != 0:  # one log: process 0's; the others only warn
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX process %d of %d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Stopped as e:  # logged; 130 or 143 as the shell's, not 0: the run is not done
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl+C, during the stop's checkpoint: no traceback
    print('main.py: interrupted; running the same command resumes from the last complete '
          'checkpoint', file=sys.stderr)
    sys.exit(130)
  except (train.ConfigError, train.Diverged, data.DataError, checkpoint.CheckpointError) as e:
    sys.exit(f'main.py: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
