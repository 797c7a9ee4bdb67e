"""Training: the train state, a jitted data-parallel train step, validation, checkpoints and the loop.

The loop follows the flax examples: `train_and_evaluate(config, workdir)` builds everything from the
config, resumes from the newest checkpoint in `workdir`, and writes metrics as JSON lines there.
"""

import functools
import json
import math
import os
import signal
import sys
import time

from absl import logging
import flax.struct
import flax.traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
from PIL import Image

from w2x_jax import checkpoint
from w2x_jax import conv
from w2x_jax import data
from w2x_jax import distributed
from w2x_jax import evaluate
from w2x_jax import image_io
from w2x_jax import losses
from w2x_jax import metrics as metrics_lib
from w2x_jax import models
from w2x_jax import upscale

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'progress.png'
SAMPLES_FILE = 'samples.png'  # held-out crops: input, bicubic, model, truth (rewritten at validation)
DATA_AXIS = 'data'


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (flax's TrainState) plus an RNG key, all saved and restored."""
  rng: jax.Array


# Validation images smaller than this (pixels a side) are skipped: all are cropped to the smallest,
# and PSNR's border crop would leave nothing of a sliver (a NaN that once outranked real scores).
VAL_MIN_SIDE = 32


class ConfigError(ValueError):
  """A config value that cannot work (one line naming the field)."""


class Diverged(RuntimeError):
  """The loss, its gradient or the parameters became NaN or infinite: the run stops in one line;
  no checkpoint with non-finite parameters is saved."""


class Stopped(KeyboardInterrupt):
  """A run stopped by SIGINT/SIGTERM (its own or another process's) after saving a checkpoint.
  `exit_code` is the shell's 128 + signal, so that a scheduler or a retry loop can tell it from a
  finished run."""

  def __init__(self, message, signal_name):
    super().__init__(message)
    self.exit_code = 128 + getattr(signal.Signals, signal_name, signal.SIGTERM)


def check_config(config):
  """Fails early, with the field's name, on values the run cannot use."""
  tc, dc = config.train, config.data
  positive = {'train.batch_size': tc.batch_size, 'train.num_steps': tc.num_steps,
              'train.log_every': tc.log_every, 'train.eval_every': tc.eval_every,
              'train.checkpoint_every': tc.checkpoint_every,
              'train.keep_checkpoints': tc.keep_checkpoints, 'data.patch_size': dc.patch_size,
              'train.learning_rate': tc.learning_rate, 'data.val_count': dc.val_count}
  if tc.schedule == 'step':
    positive.update({'train.decay_every': tc.decay_every, 'train.decay_rate': tc.decay_rate})
  for name, value in positive.items():
    if not value > 0:
      raise ConfigError(f'config.{name}={value!r}: must be > 0')
  choices = {'train.loss': (tc.loss, losses.LOSS_NAMES), 'train.optimizer': (tc.optimizer, ('adam', 'adamw')),
             'train.schedule': (tc.schedule, ('constant', 'cosine', 'step')),
             'data.noise_level': (dc.noise_level, data.NOISE_LEVELS),
             'model.scale': (config.model.scale, (1, 2, 3, 4)), 'model.channels': (config.model.channels, (1, 3))}
  for name, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'config.{name}={value!r}: must be one of {list(allowed)}')
  if config.model.scale == 1 and dc.noise_level == -1:
    raise ConfigError('config.model.scale=1 with config.data.noise_level=-1: nothing to learn (the '
                      'target is the input); a noise level 0-3, or a scale above 1')
  if not math.isfinite(tc.learning_rate):
    raise ConfigError(f'config.train.learning_rate={tc.learning_rate!r}: must be finite')
  nonnegative = {'data.synthetic_images': dc.get('synthetic_images', 0),
                 'train.warmup_steps': tc.warmup_steps, 'train.grad_clip': tc.grad_clip,
                 'train.weight_decay': tc.weight_decay, 'seed': config.seed}
  for name, value in nonnegative.items():
    if not value >= 0:
      raise ConfigError(f'config.{name}={value!r}: must be >= 0')
  if config.seed >= 2 ** 32:  # JAX's key takes 32 bits (x64 off) and numpy raised past 64
    raise ConfigError(f'config.seed={config.seed!r}: must be < 2**32')
  # The model's own fields (names, filter counts, dtype), before any file is written.
  try:
    models.build_model(config.model)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ConfigError(str(e).replace('models.py: model.', 'config.model.', 1)) from e
  try:
    data.check_data_config(dc, config.model.scale)
  except data.DataError as e:
    raise ConfigError(f'config.data.{e}') from e
  if dc.val_max_side < VAL_MIN_SIDE:
    raise ConfigError(f'config.data.val_max_side={dc.val_max_side!r}: must be >= {VAL_MIN_SIDE}')
  if tc.batch_size % jax.process_count():
    raise ConfigError(f'config.train.batch_size={tc.batch_size}: must be divisible by the '
                      f'{jax.process_count()} processes')


def make_schedule(tc):
  """The learning rate against step: constant, linear warmup + cosine to 0, or DCSCN's step decay."""
  if tc.schedule == 'constant':
    return optax.constant_schedule(tc.learning_rate)
  if tc.schedule == 'cosine':
    warmup = min(tc.warmup_steps, tc.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, tc.num_steps)
  return optax.exponential_decay(tc.learning_rate, transition_steps=tc.decay_every,
                                 decay_rate=tc.decay_rate, staircase=True)


def make_optimizer(tc):
  schedule = make_schedule(tc)
  if tc.optimizer == 'adamw':
    opt = optax.adamw(schedule, weight_decay=tc.weight_decay)
  else:
    opt = optax.adam(schedule)
  if tc.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  return opt


def create_train_state(config, rng):
  """A fresh train state (host-resident); the model and optimizer come from the config."""
  model = models.build_model(config.model)
  p = config.data.patch_size
  init_rng, state_rng = jax.random.split(rng)
  x = jnp.zeros((1, p, p, config.model.channels), jnp.float32)
  # Initialisation runs once: compiling it without XLA's optimisations takes 1.4 s instead of 7 s
  # for the seed DCSCN (measured here), and the values are the same.
  init = jax.jit(model.init, compiler_options={'xla_backend_optimization_level': 0})
  params = init(init_rng, x)['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config.train),
                           rng=state_rng)


def init_params_from(params, source):
  """`params` with every leaf that `source` (a shipped model's name, an exported model or a
  workdir) has under the same name and shape replaced by the source's value; (params, counts)."""
  try:
    _, source_params, _ = upscale.load_model(source)
  except upscale.ModelError as e:
    raise ConfigError(f'config.train.init_from: {e}') from e
  flat_source = flax.traverse_util.flatten_dict(source_params)
  flat = flax.traverse_util.flatten_dict(params)
  copied = 0
  for key, value in flat.items():
    other = flat_source.get(key)
    if other is not None and np.shape(other) == np.shape(value):
      flat[key] = jnp.asarray(other, value.dtype)
      copied += 1
  if not copied:
    raise ConfigError(f'config.train.init_from={source!r}: no parameter matches this model '
                      f'(name and shape)')
  return flax.traverse_util.unflatten_dict(flat), (copied, len(flat))


def to_model_channels(images, channels):
  """RGB in [0, 1] to what the model sees: RGB, or luma (Y of full-range YCbCr, as Pillow's) for Y models."""
  if channels == 3:
    return images
  return jnp.tensordot(images, jnp.array([0.299, 0.587, 0.114], images.dtype), axes=1)[..., None]


def make_train_step(config):
  """A pure step: (state, batch) -> (state, metrics). `batch['weight']` masks padding samples."""
  loss_fn = losses.get_loss(config.train.loss)
  channels = config.model.channels

  def train_step(state, batch):
    lr = to_model_channels(batch['lr'], channels)
    hr = to_model_channels(batch['hr'], channels)

    def total_loss(params):
      pred = state.apply_fn({'params': params}, lr)
      # One loss per sample, so that padding samples (weight 0) change nothing and the result is
      # the same whatever the device count.
      per_sample = jax.vmap(lambda p, t: loss_fn(p[None], t[None]))(pred, hr)
      return jnp.sum(per_sample * batch['weight']) / jnp.sum(batch['weight'])

    loss, grads = jax.value_and_grad(total_loss)(state.params)
    new_state = state.apply_gradients(grads=grads)
    new_state = new_state.replace(rng=jax.random.fold_in(state.rng, state.step))
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return train_step


def make_mesh(devices=None):
  """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def pad_local_batch(batch, multiple):
  """Pads this process's slice to a multiple of its device count; padding samples get weight 0."""
  n = len(batch['lr'])
  pad = (-n) % multiple
  out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
         for k, v in batch.items()}
  out['weight'] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return out


def shard_batch(batch, mesh):
  """Assembles the global batch from every process's local slice (the cookbook's way)."""
  local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  batch = pad_local_batch(batch, len(local_devices))
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class Validator:
  """PSNR (Y channel, border cropped) of the model and of bicubic on held-out images, same inputs."""

  def __init__(self, images, config):
    scale, channels = config.model.scale, config.model.channels
    side = min([config.data.val_max_side] + [min(im.shape[:2]) for im in images])
    side -= side % scale
    crops = [_centre_crop(im, side) for im in images]
    self.scale = scale
    self.hr = np.stack(crops)
    self.lr = np.stack([evaluate.degrade_for_eval(im, scale, config.data.noise_level) for im in crops])
    self.bicubic = np.stack([evaluate.bicubic_upscale(lr, scale) for lr in self.lr])
    self.bicubic_psnr = float(np.mean([metrics_lib.psnr_y(b, hr, border=scale)
                                       for b, hr in zip(self.bicubic, self.hr)]))
    self.channels = channels
    self.outputs = None  # the last validation's outputs (uint8), for the samples picture
    margin = models.receptive_margin(config.model)
    model = models.build_model(config.model)

    @functools.partial(jax.jit, compiler_options=conv.compiler_options())
    def predict(params, lr_uint8):
      x = lr_uint8.astype(jnp.float32) / 255.0
      # Edge-replicate by the receptive margin, as tiled inference does.
      x = jnp.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)), mode='edge')
      y = model.apply({'params': params}, to_model_channels(x, channels))
      y = y[:, margin * scale:y.shape[1] - margin * scale, margin * scale:y.shape[2] - margin * scale]
      if channels == 1:  # luma model: the chroma is measured off the Y channel anyway
        y = jnp.repeat(y, 3, axis=-1)
      return jnp.clip(y, 0.0, 1.0)

    self._predict = predict

  def __call__(self, params):
    # On this process's default device, from a host copy of the (replicated) params: no collective,
    # so every process computes the same figures on its own and none waits for another.
    out = metrics_lib.to_uint8_range(jax.device_get(self._predict(jax.device_get(params), self.lr)))
    model_psnr = float(np.mean([metrics_lib.psnr_y(o, h, border=self.scale)
                                for o, h in zip(out, self.hr)]))
    self.outputs = out.astype(np.uint8)
    return {'val_psnr': model_psnr, 'val_bicubic_psnr': self.bicubic_psnr,
            'val_gain': model_psnr - self.bicubic_psnr}


  def write_samples(self, path):
    """Input (nearest), bicubic, model and ground truth side by side, written atomically."""
    outputs = self.outputs
    if self.channels == 1:  # a luma model: show its Y with bicubic's colour
      outputs = [_with_chroma_of(o, b) for o, b in zip(outputs, self.bicubic)]
    picture = evaluate.side_by_side(list(zip(self.lr, self.bicubic, outputs, self.hr)), self.scale)
    image_io.atomic_write(path, lambda f: Image.fromarray(picture).save(f, 'PNG'))


def _with_chroma_of(luma_rgb, colour_rgb):
  ycbcr = np.asarray(Image.fromarray(colour_rgb).convert('YCbCr')).copy()
  ycbcr[..., 0] = luma_rgb[..., 0]
  return np.asarray(Image.fromarray(ycbcr, 'YCbCr').convert('RGB'))


def _centre_crop(image, side):
  h, w = image.shape[:2]
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


class MetricsLog:
  """One JSON-lines file per run (big_vision style); only process 0 writes."""

  def __init__(self, workdir, resume_step):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(self.path):
      # Rows past the restored step belong to a run that was killed before its next checkpoint.
      self._rewrite([r for r in self.rows() if r['step'] <= resume_step])

  def _rewrite(self, rows):
    text = ''.join(json.dumps(r) + '\n' for r in rows).encode()
    image_io.atomic_write(self.path, lambda f: f.write(text))

  def write(self, step, **values):
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')

  def rows(self):
    """The rows so far; a line cut short (a full disk, a power loss) is skipped with a warning,
    and dropped from the file by the next resume's rewrite."""
    if not os.path.exists(self.path):
      return []
    rows = []
    with open(self.path) as f:
      for number, line in enumerate(f, 1):
        try:
          row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
          row = None
          logging.warning('%s:%d: not a JSON row (cut short?), skipped', self.path, number)
        if isinstance(row, dict) and isinstance(row.get('step'), int):
          rows.append(row)
    return rows


def write_plot(rows, path):
  """Loss and validation PSNR against step, as a PNG (rewritten atomically)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  loss = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  val = [(r['step'], r['val_psnr'], r['val_bicubic_psnr']) for r in rows if 'val_psnr' in r]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  if loss:  # a line without markers draws nothing of a single point (a run's first picture)
    ax1.plot(*zip(*loss), marker='o' if len(loss) == 1 else None)
    ax1.set_yscale('log')
  ax1.set(xlabel='step', ylabel='training loss', title='loss')
  if val:
    steps, model_psnr, bicubic = zip(*val)
    ax2.plot(steps, model_psnr, 'o-', label='model')
    ax2.plot(steps, bicubic, '_--', markersize=16, label='bicubic')  # at the first validation too
    ax2.legend()
  ax2.set(xlabel='step', ylabel='PSNR (dB, Y)', title='validation')
  fig.tight_layout()
  image_io.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=80))
  plt.close(fig)


def load_datasets(config):
  """(train images, validation images) as uint8 RGB arrays, loaded once; the synthetic drawings
  (config.data.synthetic_images) join the training images only."""
  train_images, val_images = _load_real_datasets(config)
  count = config.data.get('synthetic_images', 0)
  if count:
    logging.info('Adding %d synthetic flat-colour drawings to the training images', count)
    size = max(256, data.min_image_size(config.data.patch_size, config.model.scale))
    train_images = train_images + data.synthetic_flat_images(count, seed=config.seed, size=size)
  return train_images, val_images


def _load_real_datasets(config):
  dc = config.data
  min_size = data.min_image_size(dc.patch_size, config.model.scale)
  if dc.train_dir:
    logging.info('Training data: %s', dc.train_dir)
    images = data.load_images(dc.train_dir, min_size)
  else:  # it logs which photographs, from where
    images = data.load_default_images(min_size)
  if dc.val_dir:
    return images, data.load_images(dc.val_dir, max(2 * config.model.scale, VAL_MIN_SIDE))
  if len(images) <= dc.val_count:
    raise data.DataError(f'{dc.train_dir or "default data"}: {len(images)} usable images, need more than '
                         f'config.data.val_count={dc.val_count} to hold some out for validation')
  # Hold out evenly spaced images (deterministic: the list is sorted by path).
  held = set(np.linspace(0, len(images) - 1, dc.val_count).round().astype(int).tolist())
  return ([im for i, im in enumerate(images) if i not in held],
          [im for i, im in enumerate(images) if i in held])


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is written before exit."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def _unraisable(self, info):
    # The second signal's KeyboardInterrupt raised where Python cannot pass it on (a garbage
    # collector callback of JAX's, a destructor) is dropped, not printed as a traceback: the
    # first signal's stop, at the next step, still ends the run in one line.
    if not issubclass(info.exc_type, KeyboardInterrupt):
      self._old_hook(info)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    sys.unraisablehook = self._old_hook


class _StopAgreement:
  """Makes every process stop at the same step when any of them got a signal (multi-process).

  A process that left the loop alone would leave the others waiting forever in the next
  collective. Each step every process contributes its flag to a tiny all-reduce; the result read is
  the previous step's, which is done by then, so the host still runs a step ahead of the devices.
  """

  def __init__(self, mesh):
    self._sharding = NamedSharding(mesh, P(DATA_AXIS))
    self._local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None

  def __call__(self, local_flag):
    """Submits this process's flag; returns whether any process had raised its flag last call."""
    flags = np.full((self._local,), int(bool(local_flag)), np.int32)
    new = self._any(jax.make_array_from_process_local_data(self._sharding, flags))
    previous, self._pending = self._pending, new
    return previous is not None and bool(jax.device_get(previous))


def train_and_evaluate(config, workdir, devices=None):
  """Trains (or resumes) the configured model in `workdir`; returns the final train state."""
  check_config(config)
  conv.keep_freed_memory_on_cpu()  # XLA:CPU re-faults its activations each step otherwise
  refused = lock = None
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      lock = checkpoint.lock_workdir(workdir)
      checkpoint.save_run_config(workdir, config)
    except checkpoint.CheckpointError as e:
      refused = e
    except OSError as e:  # a read-only or missing place: one line, not a traceback
      refused = checkpoint.CheckpointError(f'{workdir}: cannot write there: {e.strerror or e}')
  try:
    # The other processes must stop too, not wait for process 0 in a collective.
    if distributed.broadcast_from_0(refused is not None):
      raise refused or checkpoint.CheckpointError(
          f'{workdir}: process 0 refused the run (see its log)')
    if jax.process_index() != 0:  # the other processes' own, where not shared
      os.makedirs(workdir, exist_ok=True)
    return _train(config, workdir, devices)
  finally:
    if lock is not None:
      lock.close()


def _train(config, workdir, devices):
  """train_and_evaluate's run, once the config is checked and the workdir is this run's."""
  tc = config.train
  train_images, val_images = load_datasets(config)
  logging.info('%d training images, %d validation images', len(train_images), len(val_images))

  mesh = make_mesh(devices)
  replicated = NamedSharding(mesh, P())
  state = create_train_state(config, jax.random.PRNGKey(config.seed))
  logging.info('Model %s: %s parameters', config.model.name, f'{models.count_params(state.params):,}')
  manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)
  if tc.get('init_from') and manager.latest_step() is None:
    params, (copied, total) = init_params_from(state.params, tc.init_from)
    state = state.replace(params=params)
    logging.info('Initialised %d of %d parameter arrays from %s', copied, total, tc.init_from)
  # Every process holds the same initial values (same seed), so placing them is enough to make
  # global replicated arrays; restoring into them reads the checkpoint with those shardings.
  state = jax.device_put(state, replicated)
  state = checkpoint.restore_train_state(manager, state)
  start_step = int(state.step)
  if start_step >= tc.num_steps:
    logging.info('Already done: step %d of %d in %s; nothing to train (a larger '
                 'config.train.num_steps goes on from here, on a schedule of that length)',
                 start_step, tc.num_steps, workdir)
    return state
  if start_step:
    logging.info('Resuming from step %d in %s', start_step, workdir)
  train_step = jax.jit(make_train_step(config), out_shardings=(replicated, replicated),
                       donate_argnums=(0,),
                       compiler_options=conv.compiler_options(mesh.devices.flat[0].platform))
  validate = Validator(val_images, config)
  log = MetricsLog(workdir, start_step)
  logging.info('Devices: %d (%s), processes: %d, global batch %d', mesh.size,
               mesh.devices.flat[0].platform, jax.process_count(), tc.batch_size)

  def checkpoint_now(val=None, force=False):
    if manager.latest_step() != int(state.step):  # a stop right after a periodic save: nothing new
      if not bool(params_finite(state.params)):  # never saved: a resume would start from it
        raise_diverged('non-finite parameters')
      checkpoint.save_train_state(manager, state, metrics=val, force=force)

  def check_finite(summary):
    for name in ('loss', 'grad_norm'):  # (the grads make the params this step saves)
      if name in summary and not math.isfinite(summary[name]):
        raise_diverged(f'{name} {summary[name]}')

  def raise_diverged(what):
    latest = manager.latest_step()
    raise Diverged(f'{what} by step {step}: the run diverged; '
                   + (f'its checkpoints stop at step {latest}, before it: run again with a lower '
                      'config.train.learning_rate (a new workdir if it diverges again)'
                      if latest is not None else
                      'no checkpoint was saved: lower config.train.learning_rate'))

  def save_before_data_error():
    if jax.process_count() == 1:  # with several, the save is a collective the others would not join
      if pending:
        log_losses()
      checkpoint_now(force=True)
      logging.warning('Checkpoint saved before stopping: run the same command to resume.')

  def validate_now(step):
    val = validate(state.params)
    logging.info('step %d: validation PSNR %.2f dB (bicubic %.2f dB, %+.2f dB)', step,
                 val['val_psnr'], val['val_bicubic_psnr'], val['val_gain'])
    log.write(step, **val)
    if jax.process_index() == 0:
      write_plot(log.rows(), os.path.join(workdir, PLOT_FILE))
      validate.write_samples(os.path.join(workdir, SAMPLES_FILE))
    return val

  generator = data.PatchGenerator(
      train_images, config.data, scale=config.model.scale, batch_size=tc.batch_size,
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  step = start_step
  last_val = last_val_step = None
  pending, last_time, last_step = [], time.time(), start_step

  def log_losses():
    nonlocal pending, last_time, last_step
    summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    check_finite(summary)
    now = time.time()
    patches_per_s = (step - last_step) * tc.batch_size / max(now - last_time, 1e-9)
    lr = float(make_schedule(tc)(step - 1))  # the rate of this step's update (counted from 0)
    eta = (tc.num_steps - step) * tc.batch_size / max(patches_per_s, 1e-9)
    logging.info('step %d/%d  loss %.5f  lr %.2e  %.1f patches/s  ETA %s', step, tc.num_steps,
                 summary['loss'], lr, patches_per_s, _format_seconds(eta))
    log.write(step, lr=lr, patches_per_s=patches_per_s, **summary)
    pending, last_time, last_step = [], now, step

  params_finite = jax.jit(lambda params: jnp.all(jnp.stack(
      [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(params)])))
  agree = _StopAgreement(mesh) if jax.process_count() > 1 else None
  stopping = None
  try:
    with _StopRequest() as stop, generator:
      for step_index, batch in _SavingOnDataError(generator, save_before_data_error):
        if agree is None:
          stopping = stop.signal
        elif agree(stop.signal):  # every process sees this at the same step
          stopping = stop.signal or 'a signal to another process'
        if step_index >= tc.num_steps or stopping:
          break
        state, step_metrics = train_step(state, shard_batch(batch, mesh))
        step = step_index + 1
        pending.append(step_metrics)
        if step == start_step + 1:
          # The first step's time is mostly compiling (seconds to minutes): said (the first step
          # line is log_every steps away), and left out of the first window, where it made that
          # line's patches/s too low and its ETA too long; unless this step's line is the window.
          jax.block_until_ready(step_metrics)
          logging.info('step %d: compiled and ran in %s; a line every %d steps', step,
                       _format_seconds(time.time() - last_time), tc.log_every)
          if step % tc.log_every and step != tc.num_steps:
            last_time, last_step = time.time(), step
        if step % tc.log_every == 0 or step == tc.num_steps:
          log_losses()
        val = None
        if step % tc.eval_every == 0 or step == tc.num_steps:
          val = last_val = validate_now(step)
          last_val_step = step
        if step % tc.checkpoint_every == 0 or step == tc.num_steps:
          checkpoint_now(val)
      if stopping and step < tc.num_steps:
        if pending:  # the losses since the last row, so that the log misses no step
          log_losses()
        # This step's validation, if it ran, ranks the stop checkpoint among the best.
        checkpoint_now(last_val if last_val_step == step else None, force=True)
        message = f'Stopped by {stopping} at step {step}; checkpoint saved. Run the same command to resume.'
        logging.warning(message)
        raise Stopped(message, stopping)
  finally:
    manager.wait_until_finished()
  if step >= tc.num_steps and last_val is not None and jax.process_index() == 0:
    logging.info('Done: %d steps. Validation PSNR %.2f dB vs bicubic %.2f dB (%+.2f dB). '
                 'Checkpoints in %s, curves in %s, samples in %s', step, last_val['val_psnr'],
                 last_val['val_bicubic_psnr'], last_val['val_gain'],
                 os.path.join(workdir, checkpoint.CHECKPOINT_DIR), os.path.join(workdir, PLOT_FILE),
                 os.path.join(workdir, SAMPLES_FILE))
  return state


class _SavingOnDataError:
  """The generator's batches; where it fails (a patch worker killed, say, for memory), `save()`
  keeps the steps done before the error goes on. (Not a generator function: its close() on a
  `break` would stop the data pipeline before the stop's checkpoint, delaying it.)"""

  def __init__(self, generator, save):
    self._generator, self._save = generator, save

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._generator)
    except data.DataError:
      self._save()
      raise


def _format_seconds(seconds):
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
