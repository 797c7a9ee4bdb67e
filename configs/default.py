"""Defaults shared by every config: data, training, checkpointing. Model presets set `config.model`.

Config arguments (`--config=configs/dcscn.py:noise=2,scale=1`) pick the noise level and scale;
`--config.train.batch_size=8` style flags override any field.
"""

import ml_collections

# Noise levels as waifu2x names them: -1 = no JPEG noise, 0..3 = increasingly strong JPEG artefacts.
NOISE_LEVELS = (-1, 0, 1, 2, 3)
SCALES = (1, 2, 3, 4)


def parse_arg(arg):
  """Parses 'noise=2,scale=1' into {'noise': 2, 'scale': 1} (empty or None gives {})."""
  known = {'noise', 'scale'}
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in known:
      raise ValueError(f'config argument {item!r}: expected one of {sorted(known)} as key=value')
    out[key] = int(value)
  if out.get('noise', -1) not in NOISE_LEVELS:
    raise ValueError(f'config argument noise={out["noise"]}: must be one of {NOISE_LEVELS}')
  if out.get('scale', 2) not in SCALES:
    raise ValueError(f'config argument scale={out["scale"]}: must be one of {SCALES}')
  return out


def get_config(arg=None):
  """The whole default run: the seed's DCSCN (configs/dcscn.py) with the shared data and training fields."""
  args = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The seed's DCSCN: 12 layers of 196 to 48 filters (exponential decay), SELU, RGB; 1,889,974 params at 2x.
  m = config.model = ml_collections.ConfigDict()
  m.name = 'dcscn'
  m.scale = args.get('scale', 2)
  m.channels = 3  # 3 = RGB, 1 = Y only
  m.layers = 12
  m.first_filters = 196
  m.last_filters = 48
  m.filter_decay = 'exp'  # exp (the seed) | power (the paper, with gamma)
  m.gamma = 1.5
  m.recon_a = 128  # branch A: conv1x1
  m.recon_b1 = 64  # branch B: conv1x1 ...
  m.recon_b2 = 128  # ... then conv3x3
  m.upsampler_filters = 32
  m.final_bias = False
  m.activation = 'selu'  # selu | prelu | relu | leaky_relu
  m.skip_interpolation = 'bilinear'  # bilinear (the seed) | bicubic (the paper)
  m.conv = 'auto'  # xla | matmul (matmul backward pass) | winograd (F(4x4,3x3)) | auto (per layer: fastest measured)
  m.dtype = 'float32'  # compute dtype of the convolutions (bfloat16 on accelerators); params stay float32

  config.data = ml_collections.ConfigDict()
  # '' means the embedded default: photographs shipped inside scikit-image's wheel (no network).
  config.data.train_dir = ''
  # '' means: hold out `val_count` images of the training folder for validation.
  config.data.val_dir = ''
  config.data.val_count = 4
  config.data.val_max_side = 256  # validation images are centre-cropped to this (speed)
  # Drawings of flat colour and line art (data.synthetic_flat_images) added to the training images
  # (not to validation): photographs lack the flat fills of anime-style art. 0: none.
  config.data.synthetic_images = 0
  config.data.patch_size = 48  # low-resolution patch side; the high-resolution side is scale times it
  config.data.noise_level = args.get('noise', -1)
  config.data.nr_rate = -1.0  # probability that a pair gets JPEG noise; -1: 0.65 for levels 0-2, 1.0 for 3
  # Relative weights of the downscaling filters (Pillow). 0 removes a filter.
  config.data.filter_weights = ml_collections.ConfigDict(
      dict(box=1.0, bilinear=1.0, bicubic=1.0, lanczos=1.0))
  config.data.num_threads = 2  # producer threads; batches do not depend on it
  # Worker processes making the patches (0: the threads make them). Threads stop scaling at a few
  # cores; an accelerator needs more: about one worker per spare core. Batches do not depend on it.
  config.data.num_workers = 0
  config.data.prefetch = 4  # batches queued ahead of the training loop (at least one per worker)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 25  # global batch, over all devices and processes
  config.train.num_steps = 100_000
  config.train.loss = 'l1'  # l1 | mse (RGB-weighted) | huber (waifu2x's clipped) | charbonnier
  config.train.optimizer = 'adam'  # adam | adamw
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-4  # adamw only
  config.train.schedule = 'cosine'  # constant | cosine (warmup + cosine) | step (DCSCN's decay)
  config.train.warmup_steps = 500
  config.train.decay_every = 20_000  # step schedule: multiply by decay_rate every this many steps
  config.train.decay_rate = 0.5
  config.train.grad_clip = 1.0  # global-norm clipping; 0 disables
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  # Fine-tuning: start a fresh run from this model's params (a shipped model's name, an exported
  # model or a workdir); params whose name and shape differ (the upsampler at another scale) keep
  # their fresh init. Ignored once the workdir holds a checkpoint (resuming wins).
  config.train.init_from = ''
  return config
