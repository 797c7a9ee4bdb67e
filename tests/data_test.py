"""Patch generator: loading, pair shapes, waifu2x degradation, determinism, the background producer."""

from multiprocessing import shared_memory
import os
import signal
import threading
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest

from w2x_jax import data

FILTERS_ONLY = {name: {n: float(n == name) for n in data.FILTERS} for name in data.FILTERS}
ALL_FILTERS = {name: 1.0 for name in data.FILTERS}


def photo_like(rng, height, width):
  """Smooth colour field plus sharp rectangles and grain: enough structure for JPEG to damage."""
  coarse = rng.uniform(0, 255, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float64)
  for _ in range(6):
    y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
    image[y:y + rng.integers(3, height // 2), x:x + rng.integers(3, width // 2)] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 6, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return [photo_like(rng, 64, 80), photo_like(rng, 72, 72), photo_like(rng, 40, 90)]


def data_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      patch_size=8, noise_level=2, nr_rate=-1.0, filter_weights=ml_collections.ConfigDict(ALL_FILTERS),
      num_threads=2, num_workers=0, prefetch=2))
  cfg.update(overrides)
  return cfg


def pair_options(**overrides):
  options = dict(patch_size=8, scale=2, noise_level=2, nr_rate=-1.0, filter_weights=ALL_FILTERS)
  options.update(overrides)
  return options


def save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def generator_threads():
  return [t for t in threading.enumerate() if t.name.startswith('PatchGenerator') and t.is_alive()]


# --- loading -----------------------------------------------------------------------------------------


def test_load_images_modes_formats_order_and_skips(tmp_path, caplog):
  rng = np.random.default_rng(1)
  rgb = photo_like(rng, 20, 24)
  save(tmp_path / 'b' / 'nested' / 'grey.png', rgb[:, :, 0])
  save(tmp_path / 'a.webp', rgb, lossless=True)
  save(tmp_path / 'c.PNG', np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))  # RGBA
  save(tmp_path / 'd.jpg', rgb, quality=95, subsampling=0)
  save(tmp_path / 'e.bmp', rgb)
  save(tmp_path / 'f.tif', rgb)
  save(tmp_path / 'small.png', rgb[:15])
  (tmp_path / 'notes.txt').write_text('not an image')
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  with caplog.at_level('WARNING'):
    loaded = data.load_images(tmp_path, min_size=16)
  assert len(loaded) == 6
  assert all(im.dtype == np.uint8 and im.shape == (20, 24, 3) for im in loaded)
  # Sorted by relative path: a.webp, b/nested/grey.png, c.PNG, d.jpg, e.bmp, f.tif.
  np.testing.assert_array_equal(loaded[0], rgb)  # lossless webp
  np.testing.assert_array_equal(loaded[1], np.repeat(rgb[:, :, :1], 3, axis=2))  # grey expanded
  np.testing.assert_array_equal(loaded[2], rgb)  # opaque alpha: the colour as it is
  assert 0 < np.abs(loaded[3].astype(int) - rgb).mean() < 6  # lossy jpeg
  np.testing.assert_array_equal(loaded[4], rgb)
  np.testing.assert_array_equal(loaded[5], rgb)
  messages = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('broken.png' in m and 'unreadable' in m for m in messages), messages
  assert any('small.png' in m and 'smaller than one patch' in m for m in messages), messages
  assert len(messages) == 2, messages


def test_load_images_16_bit(tmp_path):
  ramp = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160)
  Image.fromarray(ramp).save(tmp_path / 'deep.png')
  (image,) = data.load_images(tmp_path, min_size=8)
  np.testing.assert_array_equal(image[..., 1], np.round(ramp / 257.0).astype(np.uint8))


def test_load_images_float(tmp_path):
  """A 32-bit float TIFF holds [0, 1] (as the upscale command reads it), not 0..255."""
  ramp = np.linspace(0, 1, 20 * 20, dtype=np.float32).reshape(20, 20)
  Image.fromarray(ramp).save(tmp_path / 'float.tif')
  (image,) = data.load_images(tmp_path, min_size=8)
  np.testing.assert_array_equal(image[..., 0], np.round(ramp * 255.0).astype(np.uint8))


def test_missing_empty_and_unusable_folders_are_one_line_errors(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('no images here')
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'x.jpg').write_bytes(b'\xff\xd8\xff garbage')
  for folder, reason in [(tmp_path / 'nowhere', 'no such folder'), (empty, 'no image files'),
                         (corrupt, 'none of its 1 image files is readable')]:
    with pytest.raises(data.DataError, match=reason) as error:
      data.load_images(folder, 8)
    message = str(error.value)
    assert message.startswith(str(folder)) and '\n' not in message


def test_default_images_are_the_embedded_photographs():
  loaded = data.load_default_images(min_size=96)
  assert len(loaded) == len(data.DEFAULT_IMAGE_FILES)
  assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in loaded)
  assert data.default_image_dir().endswith('data')


def test_noise_nr_rate():
  assert data.noise_nr_rate(-1, -1.0) == 0.0
  assert data.noise_nr_rate(0, -1.0) == data.noise_nr_rate(2, -1.0) == 0.65
  assert data.noise_nr_rate(3, -1.0) == 1.0
  assert data.noise_nr_rate(1, 0.3) == 0.3
  with pytest.raises(data.DataError, match='noise level'):
    data.noise_nr_rate(4, -1.0)


def test_jpeg_qualities_by_level():
  """waifu2x's schedule: levels 0 and 1 one encoding at 85-95 and 65-85; levels 2 and 3 one, two
  or three encodings (60/30/10%) with falling qualities, never below 27 nor above 70."""
  rng = np.random.default_rng(0)
  for level, low, high in [(0, 85, 95), (1, 65, 85)]:
    drawn = [data._jpeg_qualities(level, rng) for _ in range(500)]  # pylint: disable=protected-access
    assert all(len(q) == 1 and low <= q[0] <= high for q in drawn)
  drawn = [data._jpeg_qualities(2, rng) for _ in range(4000)]  # pylint: disable=protected-access
  assert min(min(q) for q in drawn) >= 27 and max(max(q) for q in drawn) <= 70
  assert all(q == sorted(q, reverse=True) for q in drawn)
  counts = np.bincount([len(q) for q in drawn], minlength=4)[1:] / len(drawn)
  np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.03)


def test_chroma_subsampling_is_one_per_pair(images, monkeypatch):
  """As waifu2x and nunif: the pair's encodings share one subsampling (both kinds are drawn)."""
  calls, jpeg = [], data._jpeg  # pylint: disable=protected-access
  monkeypatch.setattr(data, '_jpeg',
                      lambda im, q, subsampling: calls.append(subsampling) or jpeg(im, q, subsampling))
  layouts = set()
  for i in range(60):
    calls.clear()
    data.make_pair(images[i % 3], np.random.default_rng(i), **pair_options(noise_level=3))
    assert len(set(calls)) == 1, calls
    layouts.add(calls[0])
  assert layouts == {0, 2}  # 4:4:4 and 4:2:0


# --- pairs and batches -------------------------------------------------------------------------------


@pytest.mark.parametrize('scale', [1, 2, 3, 4])
def test_batch_shapes_dtypes_and_ranges(images, scale):
  batch = data.make_batch(images, seed=3, step=5, indices=range(4), **pair_options(scale=scale))
  assert batch['lr'].shape == (4, 8, 8, 3) and batch['hr'].shape == (4, 8 * scale, 8 * scale, 3)
  for x in batch.values():
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert x.max() > 0.5 and x.std() > 0.05  # real content, not a blank crop


def test_crops_and_variants_vary(images):
  batch = data.make_batch(images, seed=0, step=0, indices=range(16), **pair_options(noise_level=-1))
  hr = batch['hr'].reshape(16, -1)
  assert len({row.tobytes() for row in hr}) == 16
  other = data.make_batch(images, seed=0, step=1, indices=range(16), **pair_options(noise_level=-1))
  assert not np.array_equal(batch['hr'], other['hr'])


def test_dihedral_table_turns_as_numpy_views_do():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  for (k, flip), op in data._DIHEDRAL.items():  # pylint: disable=protected-access
    view = np.rot90(image, k)[:, ::-1] if flip else np.rot90(image, k)
    turned = Image.fromarray(image) if op is None else Image.fromarray(image).transpose(op)
    np.testing.assert_array_equal(np.asarray(turned), view, err_msg=str((k, flip)))


def test_crops_reach_every_part_of_the_image():
  """Patches start anywhere (the borders included), not only where a context margin fits."""
  h, w = 40, 48
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0], image[..., 1] = np.mgrid[0:h, 0:w]  # each pixel holds its own position
  count = np.zeros((h, w))
  for i in range(1000):
    _, hr = data.make_pair(image, np.random.default_rng(i), **pair_options(noise_level=-1))
    np.add.at(count, (hr[..., 0].ravel(), hr[..., 1].ravel()), 1)
  assert count[0, 16:32].min() > 0 and count[h - 1, 16:32].min() > 0  # top and bottom rows
  assert count[16:24, 0].min() > 0 and count[16:24, w - 1].min() > 0  # left and right columns
  assert count.max() < 3 * count.mean()  # the centre no more than random crops favour it


def test_pair_is_aligned_with_box_filter(images):
  """With only the box filter and no noise, lr is the 2x2 mean of hr: the crop is aligned.

  (Up to 1 level: Pillow rounds between its two passes and picks their order by the image's shape.)
  """
  for i in range(8):
    lr, hr = data.make_pair(images[i % 3], np.random.default_rng(i),
                            **pair_options(noise_level=-1, filter_weights=FILTERS_ONLY['box']))
    mean = hr.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
    assert np.abs(lr - mean).max() <= 1.0


def identify_filter(lr, hr):
  """The Pillow filter whose downscale of hr best matches lr away from the patch border."""
  inner = slice(3, -3)
  errors = {name: np.abs(np.asarray(Image.fromarray(hr).resize(lr.shape[1::-1], f), int)[inner, inner]
                         - lr[inner, inner]).mean() for name, f in data.FILTERS.items()}
  return min(errors, key=errors.get), errors


def test_configured_filter_set_is_honoured(images):
  for name, weights in FILTERS_ONLY.items():
    for i in range(3):
      lr, hr = data.make_pair(images[i], np.random.default_rng(i), **pair_options(
          patch_size=12, noise_level=-1, filter_weights=weights))
      found, errors = identify_filter(lr, hr)
      assert found == name and errors[name] < 0.5, (name, errors)
  two = dict(box=0.0, bilinear=1.0, bicubic=0.0, lanczos=3.0)
  seen = set()
  for i in range(24):
    lr, hr = data.make_pair(images[i % 3], np.random.default_rng(i), **pair_options(
        patch_size=12, noise_level=-1, filter_weights=two))
    seen.add(identify_filter(lr, hr)[0])
  assert seen == {'bilinear', 'lanczos'}
  with pytest.raises(data.DataError, match='at least one'):
    data.make_pair(images[0], np.random.default_rng(0), **pair_options(filter_weights={'box': 0}))


def mean_psnr(noisy, clean):
  mse = np.mean((noisy.astype(np.float64) - clean) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


@pytest.mark.parametrize('scale', [1, 2])
def test_degradation_strength_orders_by_noise_level(images, scale):
  """Same rng seeds give the same clean pairs at every level, so noisy vs clean isolates the JPEG."""
  def pairs(level):
    out = [data.make_pair(images[i % 3], np.random.default_rng(i), **pair_options(
        patch_size=16, scale=scale, noise_level=level, nr_rate=1.0)) for i in range(24)]
    return np.stack([lr for lr, _ in out]), np.stack([hr for _, hr in out])
  clean, clean_hr = pairs(-1)
  psnrs = []
  for level in (0, 1, 2):
    noisy, hr = pairs(level)
    np.testing.assert_array_equal(hr, clean_hr)
    psnrs.append(mean_psnr(noisy, clean))
  assert psnrs[0] > psnrs[1] > psnrs[2] > 20, psnrs
  assert psnrs[0] < 50, psnrs  # level 0 does change the pixels


def test_nr_rate_is_the_fraction_degraded(images):
  def degraded_fraction(nr_rate, level=1):
    count = 0
    for i in range(40):
      options = pair_options(scale=1, patch_size=16, nr_rate=nr_rate)
      clean, _ = data.make_pair(images[i % 3], np.random.default_rng(i), **{**options, 'noise_level': -1})
      noisy, _ = data.make_pair(images[i % 3], np.random.default_rng(i), **{**options, 'noise_level': level})
      count += not np.array_equal(noisy, clean)
    return count / 40
  assert degraded_fraction(0.0) == 0.0
  assert degraded_fraction(1.0) == 1.0
  assert 0.4 < degraded_fraction(-1.0) < 0.9  # level default 0.65
  assert degraded_fraction(-1.0, level=3) == 1.0


def test_make_batch_samples_depend_only_on_seed_step_and_position(images):
  options = pair_options()
  whole = data.make_batch(images, seed=7, step=2, indices=range(6), **options)
  part = data.make_batch(images, seed=7, step=2, indices=[4, 1], **options)
  for key in ('lr', 'hr'):
    np.testing.assert_array_equal(part[key], whole[key][[4, 1]])
  other_seed = data.make_batch(images, seed=8, step=2, indices=range(6), **options)
  assert not np.array_equal(other_seed['hr'], whole['hr'])


# --- the background producer -------------------------------------------------------------------------


def take(generator, count):
  return [next(generator) for _ in range(count)]


def run_generator(images, num_threads, process_index=0, process_count=1, start_step=0, count=5):
  with data.PatchGenerator(images, data_config(num_threads=num_threads), scale=2, batch_size=4, seed=1,
                           start_step=start_step, process_index=process_index,
                           process_count=process_count) as generator:
    return take(generator, count)


def test_generator_is_deterministic_across_threads_and_processes(images):
  one = run_generator(images, 1)
  assert [step for step, _ in one] == list(range(5))
  for step, batch in one:
    assert batch['lr'].shape == (4, 8, 8, 3) and batch['hr'].shape == (4, 16, 16, 3)
    direct = data.make_batch(images, seed=1, step=step, indices=range(4), **pair_options())
    np.testing.assert_array_equal(batch['lr'], direct['lr'])
  for (step_a, a), (step_b, b) in zip(one, run_generator(images, 3)):
    assert step_a == step_b
    np.testing.assert_array_equal(a['lr'], b['lr'])
    np.testing.assert_array_equal(a['hr'], b['hr'])
  halves = [run_generator(images, 2, process_index=k, process_count=2) for k in (0, 1)]
  for (_, whole), (_, first), (_, second) in zip(one, *halves):
    assert first['lr'].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([first['hr'], second['hr']]), whole['hr'])
    np.testing.assert_array_equal(np.concatenate([first['lr'], second['lr']]), whole['lr'])


def test_start_step_resumes_the_stream(images):
  from_zero = run_generator(images, 2, count=5)
  resumed = run_generator(images, 2, start_step=3, count=2)
  assert [step for step, _ in resumed] == [3, 4]
  for (_, a), (_, b) in zip(resumed, from_zero[3:]):
    np.testing.assert_array_equal(a['lr'], b['lr'])
    np.testing.assert_array_equal(a['hr'], b['hr'])


def test_close_stops_threads_blocked_on_a_full_queue(images):
  before = generator_threads()
  generator = data.PatchGenerator(images, data_config(num_threads=3, prefetch=1), scale=2, batch_size=2,
                                  seed=0)
  next(generator)
  assert len(generator_threads()) == len(before) + 3
  time.sleep(0.3)  # the queues fill and the workers block on put
  start = time.perf_counter()
  generator.close()
  assert time.perf_counter() - start < 2.0
  assert generator_threads() == before
  with pytest.raises(StopIteration):
    next(generator)


def test_worker_error_is_raised_in_the_consumer(images, monkeypatch):
  real_make_batch = data.make_batch

  def failing_make_batch(images, *, step, **kwargs):
    if step == 2:
      raise RuntimeError('boom at step 2')
    return real_make_batch(images, step=step, **kwargs)

  monkeypatch.setattr(data, 'make_batch', failing_make_batch)
  with data.PatchGenerator(images, data_config(), scale=1, batch_size=2, seed=0) as generator:
    assert [step for step, _ in take(generator, 2)] == [0, 1]
    with pytest.raises(RuntimeError, match='boom at step 2'):
      next(generator)
  assert not generator_threads()


def test_worker_processes_make_the_same_batches_and_clean_up(images):
  """num_workers > 0: the same batches as the threads, and close() ends the workers and frees the
  shared images."""
  threads = run_generator(images, 1, count=4)
  generator = data.PatchGenerator(images, data_config(num_workers=2), scale=2, batch_size=4, seed=1)
  with generator:
    in_workers = take(generator, 4)
    workers = worker_processes(generator)
    name = generator._pool.shared.block.name  # pylint: disable=protected-access
    assert len(workers) == 2
  for (step_a, a), (step_b, b) in zip(threads, in_workers):
    assert step_a == step_b and a['lr'].dtype == b['lr'].dtype == np.float32
    np.testing.assert_array_equal(a['lr'], b['lr'])
    np.testing.assert_array_equal(a['hr'], b['hr'])
  assert not any(w.is_alive() for w in workers)
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(name=name)
  assert not generator_threads()


def worker_processes(generator):
  return list(generator._pool.executor._processes.values())  # pylint: disable=protected-access


@pytest.mark.parametrize('num_workers', [1, 2])
def test_a_dead_worker_is_a_clear_error(images, num_workers):
  """One worker killed (the others, which ignore SIGTERM, must not hang close()), busy or idle."""
  start = time.perf_counter()
  with data.PatchGenerator(images, data_config(num_workers=num_workers, prefetch=1), scale=2,
                           batch_size=2, seed=0) as generator:
    take(generator, 2 * num_workers)  # every worker has started
    workers = worker_processes(generator)
    time.sleep(0.2)  # the queues fill: the workers go idle
    os.kill(workers[0].pid, signal.SIGKILL)
    with pytest.raises(data.DataError, match='patch worker process died'):
      take(generator, 50)  # the batches already made come first
  assert time.perf_counter() - start < 30
  assert not any(w.is_alive() for w in workers)
  assert not generator_threads()


def test_an_error_in_a_worker_reaches_the_consumer(images):
  generator = data.PatchGenerator(images, data_config(num_workers=1, prefetch=1), scale=2,
                                  batch_size=2, seed=0)
  with generator:
    generator._options['patch_size'] = 1000  # pylint: disable=protected-access; fails in the worker
    with pytest.raises(data.DataError, match='smaller than one patch'):
      take(generator, 50)
  assert not generator_threads()


def test_blocks_of_killed_runs_are_removed(images, tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'SHM_DIR', str(tmp_path))
  stale = tmp_path / f'{data.SHM_PREFIX}{2 ** 22 + 12345}_dead'  # above Linux's largest pid
  alive = tmp_path / f'{data.SHM_PREFIX}{os.getpid()}_mine'
  other = tmp_path / 'psm_someone_else'
  for path in (stale, alive, other):
    path.write_bytes(b'x')
  data.remove_stale_blocks()
  assert not stale.exists() and alive.exists() and other.exists()


def test_too_little_shared_memory_is_a_clear_error(images, monkeypatch):
  monkeypatch.setattr(data, 'shm_free_bytes', lambda: 1000)
  with pytest.raises(data.DataError, match=r'/dev/shm: 0 MB free.*--shm-size.*num_workers=0'):
    data.PatchGenerator(images, data_config(num_workers=2), scale=2, batch_size=2, seed=0)
  assert not generator_threads()


def test_generator_rejects_bad_setups(images):
  with pytest.raises(data.DataError, match='multiple of the process count'):
    data.PatchGenerator(images, data_config(), scale=2, batch_size=5, seed=0, process_count=2)
  with pytest.raises(data.DataError, match='smaller than one'):
    data.PatchGenerator(images, data_config(patch_size=30), scale=2, batch_size=2, seed=0)
  with pytest.raises(data.DataError, match='noise level'):
    data.PatchGenerator(images, data_config(noise_level=5), scale=2, batch_size=2, seed=0)
  assert not generator_threads()


def test_load_images_follows_linked_folders_once(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  os.makedirs(tmp_path / 'elsewhere')
  os.makedirs(tmp_path / 'train' / '.hidden')
  Image.fromarray(rgb).save(tmp_path / 'train' / 'a.png')
  Image.fromarray(rgb[::-1]).save(tmp_path / 'elsewhere' / 'b.png')
  Image.fromarray(rgb).save(tmp_path / 'train' / '.hidden' / 'c.png')  # hidden folders: skipped
  os.symlink(tmp_path / 'elsewhere', tmp_path / 'train' / 'linked')  # followed ...
  os.symlink(tmp_path / 'train', tmp_path / 'elsewhere' / 'loop')  # ... and a loop ends
  images = data.load_images(tmp_path / 'train', min_size=8)
  assert len(images) == 2
  np.testing.assert_array_equal(images[0], rgb)
  np.testing.assert_array_equal(images[1], rgb[::-1])


def test_a_subfolder_that_cannot_be_listed_is_said(tmp_path, caplog, monkeypatch):
  rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  os.makedirs(tmp_path / 'locked')
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  Image.fromarray(rgb).save(tmp_path / 'locked' / 'b.png')
  scandir = os.scandir

  def denied(path='.'):  # as chmod 000 would, for a user other than root
    if os.fspath(path).endswith('locked'):
      raise PermissionError(13, 'Permission denied', os.fspath(path))
    return scandir(path)
  monkeypatch.setattr(os, 'scandir', denied)
  with caplog.at_level('WARNING'):
    assert len(data.load_images(tmp_path, min_size=8)) == 1
  assert any('locked: cannot list it (Permission denied)' in r.getMessage() for r in caplog.records)


def test_large_training_images_are_not_refused_as_bombs(tmp_path, monkeypatch):
  """The user's own images: Pillow's decompression-bomb limit (179 MP) had skipped large ones as
  unreadable; the limit is off while loading and back after."""
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # stands for 179 MP
  Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / 'large.png')
  (loaded,) = data.load_images(tmp_path, min_size=8)
  assert loaded.shape == (40, 40, 3)
  assert Image.MAX_IMAGE_PIXELS == 100


def test_synthetic_flat_images_are_flat_art_and_repeatable():
  first, again = data.synthetic_flat_images(6, seed=3), data.synthetic_flat_images(6, seed=3)
  assert len(first) == 6 and all(im.shape == (256, 256, 3) and im.dtype == np.uint8 for im in first)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not np.array_equal(first[0], data.synthetic_flat_images(1, seed=4)[0])
  pixels = np.concatenate([im.reshape(-1, 3) for im in first])
  assert ((pixels == 0) | (pixels == 255)).mean() > 0.3  # extreme channels, as in flat fills
  # Flat: most pixels equal their right-hand neighbour.
  assert np.mean([(im[:, 1:] == im[:, :-1]).all(-1).mean() for im in first]) > 0.9


def test_transparent_training_images_over_white():
  """The colour under transparent pixels (noise, black) is not trained on: composited over
  white, as the art is seen."""
  rng = np.random.default_rng(0)
  rgba = np.concatenate([rng.integers(0, 256, (32, 32, 3)), np.zeros((32, 32, 1))], -1)
  rgba[8:24, 8:24] = [200, 40, 40, 255]
  rgba[4, 4] = [0, 0, 0, 128]  # half covered: half white
  out = data._to_rgb_uint8(Image.fromarray(rgba.astype(np.uint8), 'RGBA'))  # pylint: disable=protected-access
  assert (out[:2] == 255).all() and (out[8:24, 8:24] == [200, 40, 40]).all()
  assert abs(int(out[4, 4, 0]) - 127) <= 1
  la = Image.fromarray(np.stack([np.full((8, 8), 30), np.zeros((8, 8))], -1).astype(np.uint8), 'LA')
  assert (data._to_rgb_uint8(la) == 255).all()  # pylint: disable=protected-access
  pal = Image.fromarray(np.zeros((8, 8), np.uint8), 'P')
  pal.info['transparency'] = 0
  assert (data._to_rgb_uint8(pal) == 255).all()  # pylint: disable=protected-access
  grey16 = Image.fromarray(np.full((4, 4), 1000, np.uint16))  # 16-bit grey, its tRNS value
  grey16.info['transparency'] = 1000
  assert (data._to_rgb_uint8(grey16) == 255).all()  # pylint: disable=protected-access
