"""Orbax checkpoints of training runs, and small exported models (params + config) for shipping.

A training workdir holds `config.json` (the run's config) and `checkpoints/<step>/` with two Orbax
items: `params` and `train` (optimizer state, step, RNG key). Restoring for inference reads `params`
only. An exported model folder holds `config.json` and `params.msgpack`: no optimizer state.
"""

import ctypes
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile

from absl import logging
import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from w2x_jax import models

CONFIG_FILE = 'config.json'
PARAMS_FILE = 'params.msgpack'
CHECKPOINT_DIR = 'checkpoints'
BEST_METRIC = 'val_psnr'
# Model fields that change how the model computes, not its parameters: free to differ on resume.
COMPUTE_ONLY_FIELDS = ('conv', 'dtype')


class CheckpointError(ValueError):
  """A checkpoint or model folder that cannot be used (one-line message naming the path)."""


def config_to_dict(config):
  """A plain JSON-able dict (tuples become lists) so that saved and live configs compare equal."""
  return json.loads(config.to_json())


def load_config(path):
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


LOCK_FILE = '.lock'


def lock_workdir(workdir):
  """An open file holding an exclusive lock on `workdir` (released by close() or when the process
  ends, even by SIGKILL); CheckpointError if another run holds it: two runs in one workdir would
  overwrite each other's checkpoints and metrics. An exported model's folder is refused first:
  a lock file left in it, export_model would no longer replace it."""
  _refuse_export(workdir)
  f = open(os.path.join(workdir, LOCK_FILE), 'a+', encoding='ascii')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or 'unknown'
    f.close()
    raise CheckpointError(f'{workdir}: another training run is using it (pid {holder}); wait '
                          'for it to finish, or use another --workdir') from None
  except OSError as e:  # a file system without locks (some NFS or FUSE mounts): run unlocked
    logging.warning('%s: cannot lock it (%s); make sure no other run uses it', workdir,
                    e.strerror or e)
    return f
  f.seek(0)
  f.truncate()
  f.write(f'{os.getpid()}\n')
  f.flush()
  return f


def _write_json_atomic(path, obj):
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _layout(config_dict):
  """What fixes a checkpoint's arrays: the model's fields (less the compute-only ones) and the
  optimizer state's structure (Adam or AdamW, gradient clipping or not)."""
  train = config_dict.get('train', {})
  fields = {f'model.{k}': v for k, v in config_dict['model'].items() if k not in COMPUTE_ONLY_FIELDS}
  fields['train.optimizer'] = train.get('optimizer', 'adam')
  fields['train.grad_clip > 0'] = (train.get('grad_clip') or 0) > 0
  return fields


def has_checkpoint(workdir):
  """Whether `workdir` holds a finished checkpoint (Orbax names unfinished ones `<step>.orbax-...`)."""
  path = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def _refuse_export(workdir):
  if os.path.exists(os.path.join(workdir, PARAMS_FILE)):
    # Its config.json would be replaced by the run's, leaving params it no longer describes.
    raise CheckpointError(f'{workdir}: holds an exported model ({PARAMS_FILE}); use another '
                          '--workdir (config.train.init_from starts a run from this model)')


def save_run_config(workdir, config):
  """Writes the run's config beside its checkpoints; refuses one whose checkpoints it could not
  resume (another model, another optimizer state), and an exported model's folder. A workdir
  without a checkpoint yet (a run that stopped before its first) takes the new config."""
  _refuse_export(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  live = config_to_dict(config)
  if os.path.exists(path) and has_checkpoint(workdir):
    before = config_to_dict(load_config(path))
    saved, new = _layout(before), _layout(live)
    diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    if diff:
      raise CheckpointError(
          f'{workdir}: its checkpoints are of another model or optimizer (fields differ: '
          + ', '.join(f'{k}={saved.get(k)!r} saved vs {new.get(k)!r}' for k in diff)
          + '); use a new --workdir or the saved config')
    old_train, new_train = before.get('train', {}), live.get('train', {})
    if (new_train.get('schedule') == 'cosine' and old_train.get('schedule') == 'cosine'
        and new_train.get('num_steps', 0) > old_train.get('num_steps', 0)):
      logging.warning(
          'config.train.num_steps %s -> %s: the cosine schedule goes on as one of the new length '
          '(where the old had decayed, the learning rate rises again, without warmup); for a '
          'fresh schedule from these weights, use a new --workdir with '
          '--config.train.init_from=%s', old_train.get('num_steps'), new_train.get('num_steps'),
          workdir)
  _write_json_atomic(path, live)


def _score(metrics):
  """The validation PSNR to rank checkpoints by; a NaN (a diverged run) ranks last, not first."""
  value = metrics[BEST_METRIC]
  return value if math.isfinite(value) else -math.inf


def make_manager(workdir, keep=3, create=True):
  """Keeps the latest `keep` checkpoints plus the best one by validation PSNR."""
  policy = preservation_policy.AnyPreservationPolicy([
      preservation_policy.LatestN(n=keep),
      preservation_policy.BestN(get_metric_fn=_score, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      # best_fn also makes Orbax write each step's metrics to disk, so the best survives a restart.
      best_fn=_score, best_mode='max', create=create,
      # A save cut short (killed, a second Ctrl+C) leaves a STEP.orbax-checkpoint-tmp folder that
      # nothing else removes; a run (create=True, its workdir locked) clears them as it starts.
      cleanup_tmp_directories=create,
      # Synchronous: the models are small, and a step is never left half-written at exit.
      enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options,
      item_names=('params', 'train'))
  # Orbax clears them in a thread that only its first save waits for: a run that stops before
  # (a bad train.init_from) exited with that thread's traceback. It takes milliseconds: wait here.
  # (A private method: the pinned Orbax has it; another version without it just skips the wait.)
  getattr(manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
  return manager


def best_step(manager):
  """The kept step with the highest validation PSNR (the latest where none has one)."""
  scored = [(_score(m), s) for s in manager.all_steps()
            if (m := manager.metrics(s)) and BEST_METRIC in m]
  return max(scored)[1] if scored else manager.latest_step()


def save_train_state(manager, state, metrics=None, force=False):
  """Saves params and the rest of the train state (step, optimizer state, RNG key) at state.step."""
  step = int(jax.device_get(state.step))
  train = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train)),
      metrics=metrics, force=force)
  return step


def restore_train_state(manager, state, step=None):
  """Restores into the structure (and shardings) of `state`; returns it unchanged if no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return state
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  train = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract(state.params)),
      train=ocp.args.StandardRestore(abstract(train))))
  t = restored['train']
  return state.replace(step=t['step'], params=restored['params'], opt_state=t['opt_state'],
                       rng=t['rng'])


def _abstract_params(model, model_cfg):
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  x = jax.ShapeDtypeStruct((1, 8, 8, model_cfg.channels), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)['params'], x)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _is_export_or_empty(path):
  """An earlier export (its two files and nothing else) or an empty folder: safe to replace."""
  return (os.path.isdir(path) and not os.path.islink(path)
          and set(os.listdir(path)) <= {CONFIG_FILE, PARAMS_FILE})


_RENAME_EXCHANGE = 2  # renameat2's flag (Linux 3.15+): swaps two paths in one step
_AT_FDCWD = -100


def _exchange(a, b):
  """Swaps folders a and b atomically (Linux's renameat2); False where it is not available."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
  if renameat2 is None:
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or file system lacks it
    return False
  raise OSError(code, os.strerror(code), b)


def export_model(path, params, config):
  """Writes a shippable model folder (config.json + params.msgpack) atomically; refuses to replace
  anything but an earlier export or an empty folder (a workdir, a folder of other files)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  if os.path.lexists(path) and not _is_export_or_empty(path):
    raise CheckpointError(f'{path}: exists and is not an exported model; export to a new or empty '
                          'folder (an earlier export is replaced)')
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's 0700: shareable
    with open(os.path.join(tmp, PARAMS_FILE), 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
    _write_json_atomic(os.path.join(tmp, CONFIG_FILE), config_to_dict(config))
    # An earlier export is swapped out whole, never removed in place: killed at any point, the
    # folder holds the old export or the new one, not a part of one.
    if not os.path.isdir(path):
      os.replace(tmp, path)
    elif not _exchange(tmp, path):  # no atomic swap here: the old one waits aside meanwhile
      old = tempfile.mkdtemp(prefix='.export-old-', dir=parent)
      os.replace(path, old)
      os.replace(tmp, path)
      tmp = old
    shutil.rmtree(tmp, ignore_errors=True)  # the earlier export, if there was one
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def restore_model(path, step=None, best=False, with_step=False):
  """Returns (model, params, config) from an exported folder, a training workdir or one step folder
  (with_step=True: and the step read, None for an exported folder).

  From a workdir: the latest step, or `step`, or with best=True the best by validation PSNR.
  Only the parameters are read, never the optimizer state.
  """
  model, params, config, step_read = _restore(os.path.abspath(os.fspath(path)), step, best)
  return (model, params, config, step_read) if with_step else (model, params, config)


def _restore(path, step, best):
  """restore_model's (model, params, config, step read or None)."""
  if step is not None and best:
    raise CheckpointError(f'{path}: step={step} and best=True name different checkpoints; give one')
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such model folder')
  if os.path.exists(os.path.join(path, PARAMS_FILE)):  # an exported model
    if step is not None or best:
      raise CheckpointError(f'{path}: an exported model holds one set of parameters; step and best '
                            'choose among a workdir\'s checkpoints')
    model, config = _model_of(path)
    params_path = os.path.join(path, PARAMS_FILE)
    try:
      with open(params_path, 'rb') as f:
        params = flax.serialization.msgpack_restore(f.read())
    except (OSError, ValueError) as e:  # msgpack's errors are ValueErrors
      raise CheckpointError(f'{params_path}: cannot read it ({e})') from e
    _check_params(params_path, params, _abstract_params(model, config.model))
    return model, jax.tree.map(np.asarray, params), config, None
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):  # a workdir
    workdir, step_dir = path, None
  elif os.path.isdir(os.path.join(path, 'params')):  # one step folder: workdir/checkpoints/<step>
    workdir, step_dir = os.path.dirname(os.path.dirname(path)), path
    if best or (step is not None and str(step) != os.path.basename(path)):
      raise CheckpointError(f'{path}: a step folder is its own step; give the workdir to choose '
                            'another (step, best)')
  else:
    raise CheckpointError(f'{path}: neither an exported model ({PARAMS_FILE}) nor a training workdir')
  model, config = _model_of(workdir)
  abstract = _abstract_params(model, config.model)
  if step_dir is not None:
    params = _orbax_params(step_dir, lambda: ocp.StandardCheckpointer().restore(
        os.path.join(step_dir, 'params'), abstract))
    step_name = os.path.basename(step_dir)
    return model, params, config, int(step_name) if step_name.isdigit() else None
  folder = os.path.join(workdir, CHECKPOINT_DIR)
  for attempt in range(3):
    listed = sorted(os.listdir(folder))
    try:
      params, step_read = _restore_from_manager(workdir, abstract, step, best)
      return model, params, config, step_read
    except Exception:  # pylint: disable=broad-except (TensorStore's read errors are plain Exceptions)
      # A run training there saved and removed steps (an older best, a latest passed by newer
      # ones) while they were listed or read: look again at what it keeps now.
      if attempt == 2 or sorted(os.listdir(folder)) == listed:
        raise


def _restore_from_manager(workdir, abstract, step, best):
  """(params, step) of a workdir's latest checkpoint, or `step`, or the best."""
  # Not Orbax's read_only mode (it warns on every restore); this manager is only read from.
  manager = make_manager(workdir, create=False)
  if best:
    step = best_step(manager)
  elif step is None:
    step = manager.latest_step()
  if step is None:
    raise CheckpointError(f'{workdir}: holds no checkpoint yet')
  if step not in manager.all_steps():
    raise CheckpointError(f'{workdir}: no checkpoint of step {step} (it keeps steps '
                          f'{", ".join(map(str, manager.all_steps())) or "none"})')
  restored = _orbax_params(os.path.join(workdir, CHECKPOINT_DIR, str(step)), lambda: manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))))
  return restored['params'], step


def _model_of(folder):
  """(model, config) of folder/config.json; CheckpointError naming it where it gives no model (a
  file cut short, not JSON, of no model): not a traceback at the first image."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{folder}: {CONFIG_FILE} is missing')
  try:
    config = load_config(path)
    return models.build_model(config.model), config
  except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
    raise CheckpointError(f'{path}: not a model\'s config ({type(e).__name__}: {e})') from e


def _check_params(path, params, abstract):
  """CheckpointError unless `params` has the names and shapes the config's model needs (another
  model's params load fine and fail only inside model.apply, naming no file)."""
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(np.shape(v))
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = shapes(abstract), shapes(params)
  diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
  if diff:
    raise CheckpointError(
        f'{path}: not the parameters of {CONFIG_FILE}\'s model ({len(diff)} differ: '
        + ', '.join(f'{k} {got.get(k, "missing")} vs {want.get(k, "not in the model")}'
                    for k in diff[:3]) + (', ...' if len(diff) > 3 else '') + ')')


def _orbax_params(step_path, restore):
  """restore() with Orbax's mismatch error (dozens of lines) as one CheckpointError line."""
  try:
    return restore()
  except ValueError as e:
    reason = str(e).strip().splitlines()[0].rstrip(':')  # the first line names the kind of mismatch
    raise CheckpointError(f'{step_path}: cannot restore its parameters as {CONFIG_FILE}\'s model '
                          f'({reason})') from e


def main(argv=None):
  """`python -m w2x_jax.checkpoint export WORKDIR OUT [--best | --step N]`: a shippable model."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m w2x_jax.checkpoint',
                                   description='Exports params + config of a run (no optimizer state).')
  parser.add_argument('command', choices=['export'])
  parser.add_argument('workdir', help='a training workdir (or one of its step folders)')
  parser.add_argument('out', help='the model folder to write (replaced atomically)')
  which = parser.add_mutually_exclusive_group()
  which.add_argument('--best', action='store_true', help='the step with the best validation PSNR')
  which.add_argument('--step', type=int, help='this step (default: the latest)')
  args = parser.parse_args(argv)
  try:
    _, params, config, step = restore_model(args.workdir, step=args.step, best=args.best,
                                            with_step=True)
    path = export_model(args.out, params, config)
  except (CheckpointError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  source = '' if step is None else f'step {step}, '
  print(f'exported {path} ({source}{models.count_params(params):,} params)')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
