"""The local web page: `python -m w2x_jax.web [--port 8812] [--model DIR ...]`.

Serves a waifu2x-like page on 127.0.0.1: choose or drop an image, pick noise reduction, scale,
model, TTA and output format, watch the progress, compare the result with the input and download
it. The work is the upscale command's (`upscale.upscale_loaded`, the same options and the same
output format rule), done by one worker thread that takes the jobs one at a time from a queue.

Every model (the shipped ones that are installed in w2x_jax/weights/, and each `--model`) is loaded
once at start-up into one `inference.Upscaler` kept for the server's lifetime, so each tile shape
compiles once. Uploads are read with a byte limit and spooled into the server's own temporary
folder, checked (an image Pillow decodes, within the pixel limit) before they are queued; results
are written into that folder, served from it, and removed after a while; the folder goes at exit.
A request never names a file: jobs are looked up by a random id, the page's files are held in
memory. Built on Starlette (routing, streaming request bodies, file responses) served by uvicorn.
"""

import argparse
import asyncio
import dataclasses
import itertools
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
import uvicorn

from w2x_jax import compilation_cache
from w2x_jax import conv
from w2x_jax import image_io
from w2x_jax import inference
from w2x_jax import processes
from w2x_jax import upscale

PROG = 'w2x_jax.web'
DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8812
DEFAULT_MAX_PIXELS = '3000x3000'
DEFAULT_MAX_UPLOAD = '100M'
MIN_UPLOAD_RATE = 64 * 1024  # bytes/s on average, past the first --upload-timeout seconds
DEFAULT_MAX_QUEUE = 8
DEFAULT_UPLOAD_TIMEOUT = 30  # seconds an upload may send nothing before it is dropped (408)
LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '::1', '[::1]')
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web_static')
STATIC_TYPES = {'.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
                '.css': 'text/css; charset=utf-8'}
MEDIA_TYPES = {'png': 'image/png', 'webp': 'image/webp', 'jpeg': 'image/jpeg'}
# Formats Pillow decodes with an external program (Ghostscript), by their kind of content.
UNSAFE_FORMATS = {'EPS': 'PostScript'}
SHIPPED_ID = 'shipped'
MAX_PAGE_SCALE = 4  # the page offers 1x, 2x and 4x: 8x of a large image would not fit memory
KEEP_SECONDS = 30 * 60  # a finished job's files are removed after this ...
KEEP_BYTES = 1 << 30  # ... or when newer results fill this much disk (the newest always stays)
KEEP_FINISHED = 1000  # ... or when this many newer jobs have finished (the job table's memory)
NO_MODEL_MESSAGE = (
    'No model is installed: start the server with --model DIR (an exported model folder, a '
    'training workdir, or a folder of them), or install the shipped models in {weights}.')


class RequestError(Exception):
  """A request that is refused: HTTP status and a one-line message for the page."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status


class _Cancelled(Exception):
  pass


# Command-line values.

def parse_pixels(text):
  """'3000x3000' or '9000000' -> a pixel count."""
  m = re.fullmatch(r'\s*(\d+)\s*[xX*]\s*(\d+)\s*', text)
  value = int(m[1]) * int(m[2]) if m else int(text) if text.strip().isdigit() else 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected WIDTHxHEIGHT or a pixel count')
  return value


def parse_bytes(text):
  """'100M', '512K', '1G' or plain bytes -> bytes."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*', text)
  if not m or float(m[1]) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a size such as 100M, 512K or 1G')
  return int(float(m[1]) * 1024 ** ' KMG'.index(m[2].upper() or ' '))


def format_pixels(n):
  side = math.isqrt(n)
  square = f' ({side}x{side})' if side * side == n else ''
  return f'{n / 1e6:.3g} megapixels{square}'


# Models.

def _is_model_dir(path):
  from w2x_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return (os.path.isfile(os.path.join(path, checkpoint.PARAMS_FILE))
          or os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR))
          or os.path.isdir(os.path.join(path, 'params')))


def find_model_dirs(paths):
  """Absolute folders of the --model arguments: each a model, or a folder of models."""
  found = []
  for path in paths:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
      raise upscale.ModelError(f'{path}: no such model folder')
    if _is_model_dir(path):
      found.append(path)
      continue
    subs = [os.path.join(path, d) for d in sorted(os.listdir(path)) if not d.startswith('.')]
    subs = [d for d in subs if os.path.isdir(d) and _is_model_dir(d)]
    if not subs:
      raise upscale.ModelError(f'{path}: neither a model (an exported model or a training workdir) '
                               'nor a folder of them')
    found.extend(subs)
  return list(dict.fromkeys(found))


def installed_shipped(weights_dir):
  paths = {n: os.path.join(weights_dir, n) for n in upscale.shipped_names()}
  return [n for n, p in paths.items() if os.path.isdir(p) and _is_model_dir(p)]


def model_scales(scale):
  """The scales the page offers for a model of `scale`: its powers up to MAX_PAGE_SCALE."""
  if scale == 1:
    return [1]
  return [scale ** k for k in range(1, 8) if scale ** k <= max(MAX_PAGE_SCALE, scale)]


def _labels(paths):
  """Short unique labels: the folder name, with its parents' names while two are alike."""
  labels = {}
  for depth in range(1, 8):
    labels = {p: os.path.join(*p.split(os.sep)[-depth:]) for p in paths}
    if len(set(labels.values())) == len(paths):
      break
  return labels


# Jobs.

@dataclasses.dataclass(eq=False)
class Job:
  id: str
  seq: int
  dir: str
  name: str  # the uploaded file's name, for messages and the download
  args: argparse.Namespace = None
  fmt: str = 'png'
  state: str = 'uploading'  # uploading, queued, running, done, error, cancelled
  message: str = ''
  input_size: tuple = (0, 0)  # width, height
  result_size: tuple = (0, 0)
  result_bytes: int = 0
  pass_index: int = 0
  passes: int = 0
  tiles_done: int = 0
  tiles_total: int = 0
  tiles_all: int = 0  # of the finished passes
  created: float = dataclasses.field(default_factory=time.time)
  started: float = 0.0
  finished: float = 0.0
  cancel: bool = False
  downloads: int = 0  # results being sent: the files stay until the last one ends
  discarded: bool = False  # removed from the server; its folder goes once no download runs

  @property
  def upload(self):
    return os.path.join(self.dir, 'upload')

  @property
  def result(self):
    return os.path.join(self.dir, 'result' + image_io.SUFFIXES[self.fmt])

  @property
  def download_name(self):
    return os.path.splitext(self.name)[0] + '_w2x' + image_io.SUFFIXES[self.fmt]

  @property
  def active(self):
    return self.state in ('uploading', 'queued', 'running')


def _safe_name(text):
  """The basename of what the browser sent, without control or path characters."""
  name = urllib.parse.unquote(text or '').replace('\\', '/').rsplit('/', 1)[-1]
  name = ''.join(ch for ch in name if ch.isprintable() and ch not in '"<>|:*?').strip(' .')
  return name[:120] or 'image'


def _temp_prefix(pid):
  # The host and process in the name: a later server on this host can tell whose folder it is.
  return f'w2x-web-{socket.gethostname()}-{pid}-'


def remove_stale_temp_dirs(temp_dir=None):
  """Removes the temporary folders (uploads, results) of this user's servers on this host that
  ended without removing them (killed, or the machine stopped); returns how many. Other hosts' and
  users' folders (a shared disk, a shared /tmp) and those of running servers are left alone."""
  temp_dir = temp_dir or tempfile.gettempdir()
  # The whole name, mkdtemp's suffix included: host 'node' must not read host 'node-2''s
  # w2x-web-node-2-PID-xxxxxxxx as the folder of its own process 2.
  pattern = re.compile(re.escape(_temp_prefix('')[:-1]) + r'(\d+)-[a-z0-9_]+')
  removed = 0
  try:
    names = os.listdir(temp_dir)
  except OSError:  # the system's temporary folder unlistable: nothing to clear, not a failed start
    return 0
  for name in names:
    match = pattern.fullmatch(name)
    try:
      st = os.lstat(os.path.join(temp_dir, name))
    except OSError:
      continue
    # This user's folders only: another user's killed server's (a shared /tmp) cannot be
    # removed, and had been counted and said as removed at every start; a link is no server's.
    if not match or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
      continue
    if processes.pid_alive(int(match.group(1))):
      continue  # that server (or a process that took its id) still runs
    shutil.rmtree(os.path.join(temp_dir, name), ignore_errors=True)
    removed += 1
  if removed:
    print(f'{PROG}: removed {removed} temporary folder(s) left in {temp_dir} by servers that '
          'stopped without removing them', file=sys.stderr)
  return removed


class Server:
  """The models, the job table, the queue and its one worker thread, and the temporary folder."""

  def __init__(self, args, load_fn=None):
    self.args = args
    self.max_pixels = args.max_pixels
    # Pillow's own guard against decompression bombs must not refuse what the limit allows.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, args.max_pixels)
    self.max_upload = args.max_upload
    self.max_queue = args.max_queue
    self.weights_dir = os.path.abspath(args.weights_dir or upscale.WEIGHTS_DIR)
    load_fn = load_fn or (lambda key: upscale.load_model(key, self.weights_dir))
    base = argparse.Namespace(tile_size=args.tile_size, batch_size=args.batch_size, quiet=False)
    self.upscalers = {}  # model key -> Upscaler, shared by every job's upscale.Runner
    loader = upscale.Runner(base, load_fn, upscalers=self.upscalers)
    self.shipped = installed_shipped(self.weights_dir)
    for name in self.shipped:
      loader.upscaler(name)
    self.models = []  # what the page lists
    if self.shipped:
      self.models.append({'id': SHIPPED_ID, 'label': 'waifu2x (shipped models)', 'key': None,
                          'scales': [s for s in upscale.SCALES if s <= MAX_PAGE_SCALE],
                          'noise': True})
    paths = find_model_dirs(args.model or [])
    labels = _labels(paths)
    for i, path in enumerate(paths):
      scale = loader.upscaler(path).scale
      self.models.append({'id': f'm{i}', 'label': f'{labels[path]} ({scale}x)', 'key': path,
                          'scales': model_scales(scale), 'noise': False})
    self.message = '' if self.models else NO_MODEL_MESSAGE.format(weights=self.weights_dir)
    self._static = {}
    for name in sorted(os.listdir(STATIC_DIR)):
      suffix = os.path.splitext(name)[1]
      if suffix in STATIC_TYPES:
        with open(os.path.join(STATIC_DIR, name), 'rb') as f:
          self._static[name] = (f.read(), STATIC_TYPES[suffix])
    remove_stale_temp_dirs(args.temp_dir)
    self.tmp = tempfile.mkdtemp(prefix=_temp_prefix(os.getpid()), dir=args.temp_dir)
    self.jobs = {}
    self.lock = threading.Lock()
    self.queue = queue.Queue()
    self._seq = itertools.count()
    self.upload_timeout = args.upload_timeout
    self._probe_lock = None  # an asyncio.Lock, made in the event loop
    self.worker = threading.Thread(target=self._work, name='w2x-web-worker', daemon=True)
    self.worker.start()

  def close(self):
    with self.lock:
      for job in self.jobs.values():
        job.cancel = True
    self.queue.put(None)
    self.worker.join(timeout=30)
    shutil.rmtree(self.tmp, ignore_errors=True)

  # The worker.

  def _work(self):
    while True:
      try:
        job = self.queue.get(timeout=60)
      except queue.Empty:
        self._sweep()  # old results go even when nobody asks for more
        continue
      if job is None:
        return
      if job.cancel:
        continue
      try:
        self._run(job)
      finally:
        self._sweep()

  def _run(self, job):
    job.state, job.started = 'running', time.time()

    def pass_progress(i, n):
      job.pass_index, job.passes, job.tiles_done, job.tiles_total = i, n, 0, 0

      def progress(done, total):
        job.tiles_done, job.tiles_total = done, total
        if done == total:
          job.tiles_all += total
        if job.cancel:
          raise _Cancelled()
      return progress
    try:
      runner = upscale.Runner(job.args, self._not_loaded, upscalers=self.upscalers)
      try:
        # As the command: an error, not the server killed for memory with every job.
        upscale.check_memory(job.upload, runner, 'choose a smaller scale, or a smaller image')
        image, info = image_io.read_image(job.upload)
      finally:
        _remove(job.upload)
      if job.cancel:
        raise _Cancelled()
      if info.frames > 1:  # as the command says it
        job.message = (f'{job.name}: {info.frames} frames (an animation or pages); only the '
                       'first is upscaled')
      out = upscale.upscale_loaded(image, info, job.fmt, runner, job.args, job.name,
                                   pass_progress)
      del image
      image_io.write_image(job.result, out, info, job.fmt, job.args.quality)
      job.result_size, job.result_bytes = (out.shape[1], out.shape[0]), os.path.getsize(job.result)
      with self.lock:  # cancelled while it was written: the page said so, the result goes too
        if job.cancel:
          raise _Cancelled()
        job.state = 'done'
    except _Cancelled:
      job.state = 'cancelled'
    except (upscale.JobError, upscale.ModelError, image_io.ImageError) as e:
      job.state, job.message = 'error', str(e).replace(job.upload, job.name).replace(
          job.dir + os.sep, '')
    except MemoryError:
      job.state, job.message = 'error', f'{job.name}: out of memory; try a smaller image or scale'
    except Exception as e:  # pylint: disable=broad-except (report it, keep serving)
      traceback.print_exc()
      job.state, job.message = 'error', f'{job.name}: internal error: {type(e).__name__}: {e}'
    finally:
      job.finished = time.time()
      if job.state != 'done':
        shutil.rmtree(job.dir, ignore_errors=True)

  def _not_loaded(self, key):
    raise upscale.ModelError(f'model {key!r} is not installed on this server')

  def _sweep(self):
    """Removes finished jobs older than KEEP_SECONDS, those past KEEP_BYTES of newer results, and
    all but the KEEP_FINISHED newest: a result shown on one person's page stays downloadable
    while others use the server (a count of 8 jobs in all had removed it within seconds)."""
    now = time.time()
    with self.lock:
      finished = sorted((j for j in self.jobs.values() if not j.active), key=lambda j: -j.seq)
      old, held = [], 0
      for i, job in enumerate(finished):
        held += job.result_bytes or 0
        if (i >= KEEP_FINISHED or now - job.finished > KEEP_SECONDS
            or (i > 0 and held > KEEP_BYTES)):
          old.append(job)
      for job in old:
        del self.jobs[job.id]
    for job in old:
      self._discard(job)

  def _discard(self, job):
    """Removes a job's folder (the job already out of `self.jobs`), or leaves that to the end of
    the downloads of its result still running (they would fail half way, or with a 500)."""
    with self.lock:
      job.discarded = True
      busy = job.downloads > 0
    if not busy:
      shutil.rmtree(job.dir, ignore_errors=True)

  def _download_ended(self, job):
    with self.lock:
      job.downloads -= 1
      gone = job.discarded and job.downloads == 0
    if gone:
      shutil.rmtree(job.dir, ignore_errors=True)

  # Requests.

  def options(self, query):
    """upscale's parsed arguments for the page's choices (RequestError if any is wrong)."""
    models = {m['id']: m for m in self.models}
    if not models:
      raise RequestError(409, self.message)
    model = models.get(query.get('model', ''))
    if model is None:
      raise RequestError(400, f'unknown model {query.get("model", "")!r}')

    def number(key, default, allowed):
      try:
        value = int(query.get(key, default))
      except ValueError:
        value = None
      if value not in allowed:
        raise RequestError(400, f'{key} must be ' + (
            f'{allowed.start} to {allowed.stop - 1}' if isinstance(allowed, range)
            else f'one of {", ".join(map(str, allowed))}'))
      return value
    default_scale = upscale.DEFAULT_SCALE if upscale.DEFAULT_SCALE in model['scales'] else \
        model['scales'][0]
    scale = number('scale', default_scale, model['scales'])
    fmt = query.get('format', 'png')
    if fmt not in MEDIA_TYPES:
      raise RequestError(400, 'format must be png, webp or jpeg')
    quality = number('quality', image_io.DEFAULT_QUALITY, range(101))
    argv = ['-i', 'upload', '-o', 'result', '-s', str(scale), '-f', fmt, '-q', str(quality),
            '--tile-size', str(self.args.tile_size), '--quiet']
    if self.args.batch_size:
      argv += ['--batch-size', str(self.args.batch_size)]
    if model['noise']:
      noise = number('noise', upscale.DEFAULT_NOISE, upscale.NOISE_LEVELS)
      if noise == -1 and scale == 1:
        raise RequestError(400, 'nothing to do: no noise reduction at 1x; choose a noise level '
                           'or a scale')
      argv += ['-n', str(noise)]
    else:
      argv += ['-m', model['key']]
    if query.get('tta', '0') not in ('0', '1', ''):
      raise RequestError(400, 'tta must be 0 or 1')
    if query.get('tta') == '1':
      argv.append('--tta')
    if query.get('background'):
      try:
        image_io.parse_color(query['background'])
      except ValueError as e:
        raise RequestError(400, str(e)) from e
      argv += ['--background', query['background']]
    elif fmt == 'jpeg':  # JPEG has no alpha: over white, as the page's default colour
      argv += ['--background', 'white']
    try:
      args = upscale.parse_args(argv)
    except SystemExit as e:  # not expected: every value was checked above
      raise RequestError(400, f'bad options: {" ".join(argv)}') from e
    if model['noise']:  # the shipped models this asks for must all be installed
      keys, _ = upscale.Runner(args, self._not_loaded, upscalers=self.upscalers).passes(1, 1)
      missing = [k for k in keys if k not in self.upscalers]
      if missing:
        raise RequestError(409, f'shipped model {missing[0]!r} is not installed (noise '
                           f'{args.noise_level}, scale {scale}); installed: '
                           f'{", ".join(self.shipped)}')
    return args, fmt

  def probe(self, job):
    """Checks the upload before it is queued: an image Pillow can decode, within the limit."""
    try:
      # This server's own limit below, with the size (Pillow's would refuse without it).
      with image_io.pixel_limit(None), image_io.open_image(job.upload) as im:
        if im.format in UNSAFE_FORMATS:
          # Pillow runs Ghostscript on PostScript: uploaded code, which can loop for ever (the
          # decode below held every later upload, and the server's exit, with it).
          raise RequestError(415, f'{job.name}: {im.format} ({UNSAFE_FORMATS[im.format]}) is not accepted here; '
                             'convert it to PNG first')
        width, height = im.size
        if width * height > self.max_pixels:
          raise RequestError(422, f'{job.name}: {width}x{height} is {width * height / 1e6:.4g} '
                             'megapixels, over the limit of this server: '
                             f'{format_pixels(self.max_pixels)}; shrink the image, or start the '
                             'server with a larger --max-pixels')
        im.load()  # damaged data shows here, not after waiting in the queue
      width, height = image_io.peek(job.upload)[:2]  # as EXIF orientation turns it
    except Image.UnidentifiedImageError as e:
      raise RequestError(415, f'{job.name}: not an image, or a damaged one (Pillow cannot '
                         'identify it)') from e
    except RequestError:
      raise
    except Exception as e:  # pylint: disable=broad-except (decoders raise many kinds)
      # (not called damaged: a whole file in a format whose codec is missing, say)
      reason = image_io.first_line(e)
      if 'truncated' in reason.lower():
        reason = 'the file is cut short (an incomplete upload or a damaged file)'
      raise RequestError(422, f'{job.name}: cannot read the image: {reason}') from e
    job.input_size = (width, height)

  def status(self, job):
    out = {'id': job.id, 'state': job.state, 'name': job.name, 'message': job.message,
           'input': {'width': job.input_size[0], 'height': job.input_size[1]}}
    if job.state == 'queued':
      with self.lock:
        out['queue_position'] = sum(1 for j in self.jobs.values()
                                    if j.state in ('queued', 'running') and j.seq < job.seq)
    if job.state == 'running' and job.passes:
      out.update(pass_index=job.pass_index, passes=job.passes, tiles_done=job.tiles_done,
                 tiles_total=job.tiles_total,
                 progress=(job.pass_index + job.tiles_done / max(job.tiles_total, 1))
                 / job.passes)
    if job.started:
      out['started_at'] = job.started
    if job.finished and job.started:
      out.update(finished_at=job.finished, seconds=round(job.finished - job.started, 3))
    if job.state == 'done':
      url = f'/api/jobs/{job.id}/result'
      out.update(progress=1.0, passes=job.passes, tiles_all=job.tiles_all, result={
          'url': url, 'download_url': url + '?download=1', 'name': job.download_name,
          'format': job.fmt, 'width': job.result_size[0], 'height': job.result_size[1],
          'bytes': job.result_bytes})
    return out

  def _job(self, request):
    job = self.jobs.get(request.path_params['job_id'])
    if job is None:
      raise RequestError(404, 'no such job (finished jobs are removed after a while)')
    return job

  # Endpoints.

  async def page(self, request):
    name = request.path_params.get('name', 'index.html')
    if name not in self._static:
      return _error(404, 'not found')
    body, media_type = self._static[name]
    return Response(body, media_type=media_type, headers={'Cache-Control': 'no-cache'})

  async def config(self, request):
    return _json({'models': [{k: v for k, v in m.items() if k != 'key'} for m in self.models],
                  'message': self.message, 'noise_levels': list(upscale.NOISE_LEVELS),
                  'default_noise': upscale.DEFAULT_NOISE, 'default_scale': upscale.DEFAULT_SCALE,
                  'formats': list(MEDIA_TYPES), 'default_quality': image_io.DEFAULT_QUALITY,
                  'max_pixels': self.max_pixels, 'max_pixels_text': format_pixels(self.max_pixels),
                  'max_upload_bytes': self.max_upload,
                  'max_upload_text': upscale.format_bytes(self.max_upload)})

  async def create_job(self, request):
    if 'x-filename' not in request.headers:  # also makes other sites' forms need a preflight
      return _error(400, 'upload with the page (the X-Filename header is missing)')
    name = _safe_name(request.headers['x-filename'])
    too_big = (f'{name}: larger than the upload limit of {upscale.format_bytes(self.max_upload)} '
               '(start the server with a larger --max-upload)')
    try:
      args, fmt = self.options(request.query_params)
      length = request.headers.get('content-length')
      if length is not None and length.isdigit() and int(length) > self.max_upload:
        raise RequestError(413, too_big)
    except RequestError as e:
      return _error(e.status, str(e))
    with self.lock:
      if sum(1 for j in self.jobs.values() if j.active) >= self.max_queue:
        return _error(503, f'the server is busy ({self.max_queue} jobs waiting); try again later')
      job = Job(id=secrets.token_urlsafe(12), seq=next(self._seq), name=name, args=args, fmt=fmt,
                dir=tempfile.mkdtemp(prefix='job-', dir=self.tmp))
      self.jobs[job.id] = job
    try:
      size, start = 0, time.monotonic()
      chunks = request.stream().__aiter__()
      with open(job.upload, 'xb') as f:
        while True:
          try:  # a client that stops sending must not hold a queue place for ever
            chunk = await asyncio.wait_for(chunks.__anext__(), self.upload_timeout)
          except StopAsyncIteration:
            break
          except asyncio.TimeoutError:
            raise RequestError(408, f'{name}: the upload stalled (nothing for '  # pylint: disable=raise-missing-from
                               f'{self.upload_timeout} s)')
          size += len(chunk)
          elapsed = time.monotonic() - start
          if elapsed > self.upload_timeout and size < MIN_UPLOAD_RATE * elapsed:
            # (nor one that sends a byte now and then: the gaps alone would let it stay)
            raise RequestError(408, f'{name}: the upload is too slow ({size / elapsed / 1024:.3g} '
                               f'KB/s on average, under {MIN_UPLOAD_RATE // 1024} KB/s)')
          if size > self.max_upload:
            raise RequestError(413, too_big)
          f.write(chunk)
      if size == 0:
        raise RequestError(400, f'{name}: the upload is empty')
      if self._probe_lock is None:
        self._probe_lock = asyncio.Lock()
      async with self._probe_lock:  # one decode at a time besides the worker's
        await run_in_threadpool(self.probe, job)
      if await request.is_disconnected():  # gone (the page cancelled): nobody would get the id
        raise ClientDisconnect()
    except (RequestError, ClientDisconnect, OSError, asyncio.CancelledError) as e:
      # CancelledError: the server stops (Ctrl+C) while this upload still arrives; answered
      # below instead of re-raised, which uvicorn would log as a traceback.
      job.state = 'error'
      with self.lock:
        self.jobs.pop(job.id, None)
      shutil.rmtree(job.dir, ignore_errors=True)
      if isinstance(e, RequestError):
        return _error(e.status, str(e))
      if isinstance(e, OSError):
        return _error(507, f'{name}: cannot store the upload: {e.strerror or e}')
      if isinstance(e, asyncio.CancelledError):
        return _error(503, f'{name}: the server is stopping')
      return Response(status_code=400)
    with self.lock:  # numbered as queued (the queue's order), not as its upload began
      job.seq = next(self._seq)
      job.state = 'queued'
    self.queue.put(job)
    self._sweep()
    return _json(self.status(job), status_code=202)

  async def job_status(self, request):
    try:
      return _json(self.status(self._job(request)))
    except RequestError as e:
      return _error(e.status, str(e))

  async def job_result(self, request):
    try:
      job = self._job(request)
    except RequestError as e:
      return _error(e.status, str(e))
    if job.state != 'done':
      return _error(409, f'{job.name}: no result ({job.state})')
    with self.lock:
      if job.discarded:
        return _error(404, f'{job.name}: the result was removed')
      job.downloads += 1
    download = request.query_params.get('download') == '1'
    return _CountedFileResponse(
        job.result, media_type=MEDIA_TYPES[job.fmt], filename=job.download_name,
        content_disposition_type='attachment' if download else 'inline',
        headers={'Cache-Control': 'no-store'}, on_end=lambda: self._download_ended(job))

  async def delete_job(self, request):
    try:
      job = self._job(request)
    except RequestError as e:
      return _error(e.status, str(e))
    job.cancel = True
    with self.lock:
      if job.state == 'running':
        return _json({'id': job.id, 'state': 'cancelling'})  # the worker stops it and cleans up
      self.jobs.pop(job.id, None)
      if job.state == 'queued':
        job.state = 'cancelled'
    self._discard(job)
    return _json({'id': job.id, 'state': 'removed'})


class _CountedFileResponse(FileResponse):
  """A FileResponse that calls `on_end()` however it ends: sent, cut, or refused (a bad Range
  header returns early, where a background task would never run)."""

  def __init__(self, *args, on_end, **kwargs):
    super().__init__(*args, **kwargs)
    self._on_end = on_end

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._on_end()


def _json(obj, status_code=200, headers=None):
  return JSONResponse(obj, status_code=status_code,
                      headers={'Cache-Control': 'no-store', **(headers or {})})


def _error(status, message, headers=None):
  return _json({'error': message}, status_code=status, headers=headers)


def _remove(path):
  try:
    os.remove(path)
  except OSError:
    pass


def make_app(server, allowed_hosts=None):
  """The Starlette app. With `allowed_hosts`, other Host headers are refused (DNS rebinding)."""
  routes = [
      Route('/', server.page),
      Route('/static/{name}', server.page),
      Route('/api/config', server.config),
      Route('/api/jobs', server.create_job, methods=['POST']),
      Route('/api/jobs/{job_id}', server.job_status),
      Route('/api/jobs/{job_id}', server.delete_job, methods=['DELETE']),
      Route('/api/jobs/{job_id}/result', server.job_result),
  ]
  middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts \
      else []
  return Starlette(routes=routes, middleware=middleware,
                   exception_handlers={HTTPException: _http_error})


async def _http_error(request, exc):  # pylint: disable=unused-argument
  """Starlette's own refusals (no such path 404, wrong method 405) as the API's JSON errors."""
  return _error(exc.status_code, f'{request.method} {request.url.path}: {exc.detail}',
                headers=exc.headers)  # (405's Allow)


def allowed_hosts(args):
  """The Host header values the server answers (others are refused, against DNS rebinding):
  loopback's names on loopback, plus --allowed-host; None (any) on a network address without it."""
  extra = list(args.allowed_host or [])
  if args.host in LOOPBACK_HOSTS:
    return list(LOOPBACK_HOSTS) + extra
  return extra or None


def _port(text):
  value = int(text)
  if not 0 <= value <= 65535:
    raise argparse.ArgumentTypeError(f'{value} is not a port (0..65535)')
  return value


def _folder(text):
  """--temp-dir: an existing folder this process can write in, checked before the models load
  (the folder is made after them: a traceback there)."""
  if not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f'{text}: no such folder')
  if not os.access(text, os.R_OK | os.W_OK | os.X_OK):  # read: killed servers' folders are looked for
    raise argparse.ArgumentTypeError(f'{text}: not readable and writable')
  return text


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog=f'python -m {PROG}', description='A local waifu2x web page: upscale and denoise '
      'images in the browser, on this machine.')
  p.add_argument('--host', default=DEFAULT_HOST, help='address to listen on (default '
                 '%(default)s: this machine only; another address lets the network in)')
  p.add_argument('--allowed-host', action='append', metavar='NAME',
                 help='a Host header value to answer, repeatable (on a network address, the names '
                 'and addresses clients use; others are refused); loopback\'s are always answered '
                 'on loopback')
  p.add_argument('--port', type=_port, default=DEFAULT_PORT,
                 help='port (default %(default)s; 0 picks a free one)')
  p.add_argument('-m', '--model', action='append', metavar='DIR',
                 help='an exported model folder, a training workdir, or a folder of them; '
                 'repeatable. The installed shipped models are listed too')
  p.add_argument('--weights-dir', default=None, help=f'where the shipped models are (default '
                 f'{upscale.WEIGHTS_DIR})')
  p.add_argument('--max-pixels', type=parse_pixels, default=parse_pixels(DEFAULT_MAX_PIXELS),
                 metavar='WxH', help=f'largest input, as WIDTHxHEIGHT or a pixel count (default '
                 f'{DEFAULT_MAX_PIXELS})')
  p.add_argument('--max-upload', type=parse_bytes, default=parse_bytes(DEFAULT_MAX_UPLOAD),
                 metavar='SIZE', help=f'largest upload, e.g. 100M (default {DEFAULT_MAX_UPLOAD})')
  positive = upscale.positive_int
  p.add_argument('--max-queue', type=positive, default=DEFAULT_MAX_QUEUE,
                 help='jobs waiting or running at most (default %(default)s)')
  p.add_argument('--upload-timeout', type=positive, default=DEFAULT_UPLOAD_TIMEOUT, metavar='S',
                 help='drop an upload that sends nothing for S seconds, or less than '
                 f'{MIN_UPLOAD_RATE // 1024} KB/s on average after S seconds (default %(default)s), '
                 'so that stalled or trickling clients hold no queue place')
  p.add_argument('--tile-size', type=positive, default=inference.DEFAULT_TILE_SIZE,
                 help='tile side in input pixels, margins included (default %(default)s)')
  p.add_argument('--batch-size', type=positive, default=None,
                 help='tiles per step (default: one per device)')
  p.add_argument('--temp-dir', type=_folder, default=None,
                 help='where the server makes its temporary folder (default: the system\'s)')
  return p.parse_args(argv)


def _interrupt(signum, frame):
  raise KeyboardInterrupt()


def main(argv=None):
  args = parse_args(argv)
  say = lambda msg: print(f'{PROG}: {msg}', flush=True)
  # SIGTERM as Ctrl+C: uvicorn shuts down gracefully, then re-raises it; the temporary folder goes.
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    return _serve(args, say)
  except KeyboardInterrupt:
    say('stopped')
    return 0


def _serve(args, say):
  import jax  # pylint: disable=g-import-not-at-top (after the arguments: --help stays quick)
  conv.keep_freed_memory_on_cpu()  # as the upscale command does
  compilation_cache.enable(program=PROG)
  devices = jax.local_devices()
  say(f'running on {len(devices)} device(s): ' + ', '.join(
      f'{d.platform}:{d.id} ({d.device_kind})' for d in devices))
  # The address first: a port in use is said at once, not after the models have loaded.
  family = socket.AF_INET6 if ':' in args.host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((args.host, args.port))
  except OSError as e:
    sock.close()
    hint = ('--host takes an address of this machine' if isinstance(e, socket.gaierror)
            else 'choose another --port')
    say(f'cannot listen on {args.host}:{args.port}: {e.strerror or e} ({hint})')
    return 1
  try:
    server = Server(args)
  except upscale.ModelError as e:
    sock.close()
    say(str(e))
    return 2
  if server.models:
    say('models: ' + '; '.join(
        m['label'] + (f' ({", ".join(server.shipped)})' if m['id'] == SHIPPED_ID else '')
        for m in server.models))
  else:
    say(server.message)

  def stop_now(signum, frame):  # a second Ctrl+C while stopping: the uploads still go
    del frame
    shutil.rmtree(server.tmp, ignore_errors=True)
    say('stopped (without waiting for the running job)')
    os._exit(128 + signum)  # (a normal exit would abort in the worker's running computation)

  try:
    sock.listen(64)
    port = sock.getsockname()[1]
    loopback = args.host in LOOPBACK_HOSTS
    if not loopback:
      say(f'warning: listening on {args.host}: other machines can reach this page')
    allowed = allowed_hosts(args)
    host = args.host
    if host in ('0.0.0.0', '::') and allowed:  # a wildcard is no address to give a browser
      host = allowed[0]
    host = f'[{host}]' if ':' in host and not host.startswith('[') else host
    if not loopback and allowed is None:
      say('warning: any Host header is accepted on a network address; --allowed-host NAME '
          '(the names and addresses clients use) refuses the others (DNS rebinding)')
    config = uvicorn.Config(make_app(server, allowed), log_level='warning', access_log=False,
                            lifespan='off', timeout_graceful_shutdown=5)
    say(f'serving http://{host}:{port}/ (Ctrl+C to stop); temporary files in {server.tmp}')
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    signal.signal(signal.SIGINT, stop_now)
    signal.signal(signal.SIGTERM, stop_now)
    server.close()
  say('stopped')
  return 0


if __name__ == '__main__':
  sys.exit(main())
