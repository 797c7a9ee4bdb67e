"""The web page: `python -m w2x_jax.web` in a subprocess with a tiny exported model, driven over
HTTP and, end to end, in headless Chromium (Debian's chromium + chromedriver through selenium;
those tests skip where they are absent, .ci/run installs them)."""

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from w2x_jax import checkpoint
from w2x_jax import models
from w2x_jax import upscale
from w2x_jax import web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Debian's packages (chromium, chromium-driver); the variables point elsewhere, never a download.
CHROMIUM = os.environ.get('W2X_CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('W2X_CHROMEDRIVER', '/usr/bin/chromedriver')
MAX_PIXELS = '160x160'
MAX_UPLOAD = 300 * 1024
TILE = '48'
UPLOAD_TIMEOUT = 4  # seconds (a stalled upload is dropped after them)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1


def _export(path, scale):
  config = test_config.get_config(f'scale={scale}')
  model = models.build_model(config.model)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
  params = jax.tree.map(np.asarray, params)
  params['final']['kernel'] = params['final']['kernel'] * 0.1  # a visible residual, still sane
  return checkpoint.export_model(path, params, config)


def _real_image(path):
  """A real photograph (scikit-image's cat), cropped small: 128x96."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(data.chelsea()[60:156, 120:248]).save(path)
  return path


def _tree(root):
  """{relative path: sha1} of every file under root."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out


class Served:
  """A server subprocess: its URL, its output lines, and the folders it was given."""

  def __init__(self, argv, root):
    self.tmp = root / 'tmp'  # TMPDIR: the server makes its temporary folder in it
    self.cwd = root / 'cwd'
    os.makedirs(self.tmp)
    os.makedirs(self.cwd)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='',
               TMPDIR=str(self.tmp), PYTHONDONTWRITEBYTECODE='1',
               JAX_DISABLE_MOST_OPTIMIZATIONS='1')  # compile time dominates these tiny jobs
    self.proc = subprocess.Popen([sys.executable, '-m', 'w2x_jax.web', '--port', '0', *argv],
                                 cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._ready = threading.Event()
    threading.Thread(target=self._read, daemon=True).start()
    if not self._ready.wait(120) or self.proc.poll() is not None:
      self.stop()
      raise AssertionError('the server did not start:\n' + self.output)
    self.url = re.search(r'serving (http://127\.0\.0\.1:\d+/)', self.output)[1]
    self.temp_folder = re.search(r'temporary files in (\S+)', self.output)[1]

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      if 'serving http' in line:
        self._ready.set()
    self._ready.set()

  @property
  def output(self):
    return ''.join(self.lines)

  def stop(self, sig=signal.SIGTERM):
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode

  def request(self, path, method='GET', data=None, headers=None):
    """(status, headers, body) of a request; JSON bodies are decoded."""
    req = urllib.request.Request(self.url + path.lstrip('/'), data=data, method=method,
                                 headers=headers or {})
    try:
      with OPENER.open(req, timeout=60) as r:
        status, head, body = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
      status, head, body = e.code, e.headers, e.read()
    if head.get('content-type', '').startswith('application/json'):
      body = json.loads(body)
    return status, head, body

  def upload(self, data, name='image.png', **options):
    query = '&'.join(f'{k}={v}' for k, v in {'model': 'm0', **options}.items())
    return self.request(f'/api/jobs?{query}', 'POST', data, {'X-Filename': name})

  def wait(self, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
      _, _, status = self.request(f'/api/jobs/{job_id}')
      if status['state'] not in ('queued', 'running'):
        return status
      time.sleep(0.05)
    raise AssertionError(f'job {job_id} did not finish: {status}')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('web_files')
  model = _export(root / 'models' / 'tiny2x', 2)
  shutil.copytree(model, root / 'weights' / 'scale2x_noise0')  # one "shipped" model
  image = _real_image(root / 'images' / 'chelsea.png')
  return {'root': root, 'models': root / 'models', 'model': model, 'weights': root / 'weights',
          'image': image}


@pytest.fixture(scope='module')
def server(files, tmp_path_factory):
  served = Served(['--model', str(files['models']), '--weights-dir', str(files['weights']),
                   '--tile-size', TILE, '--max-pixels', MAX_PIXELS, '--max-upload',
                   f'{MAX_UPLOAD // 1024}K', '--upload-timeout', str(UPLOAD_TIMEOUT)],
                  tmp_path_factory.mktemp('server'))
  yield served
  served.stop()


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f'{CHROMIUM} or {CHROMEDRIVER} is missing (Debian packages chromium and '
                'chromium-driver; .ci/run installs them)')
  webdriver = pytest.importorskip('selenium.webdriver')
  downloads = tmp_path_factory.mktemp('downloads')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               '--disable-dev-shm-usage', '--no-proxy-server', '--window-size=1200,1000',
               f'--user-data-dir={tmp_path_factory.mktemp("chromium_profile")}'):
    options.add_argument(flag)
  options.add_experimental_option('prefs', {'download.default_directory': str(downloads),
                                            'download.prompt_for_download': False})
  # An explicit chromedriver: selenium does not run Selenium Manager, nothing is downloaded.
  service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
  driver = webdriver.Chrome(service=service, options=options)
  driver.execute_cdp_cmd('Browser.setDownloadBehavior',
                         {'behavior': 'allow', 'downloadPath': str(downloads)})
  driver.set_script_timeout(30)
  yield driver, downloads
  driver.quit()


def _wait_for(fn, timeout=60, what='condition'):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = fn()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f'timed out waiting for {what}')


def _open_page(driver, url):
  driver.get(url)
  _wait_for(lambda: driver.execute_script(
      'return document.getElementById("model").options.length > 0 || '
      '!document.getElementById("no-models").hidden'), 30, 'the page to load its models')
  # Every status text the page shows, to see its progress after the fact.
  driver.execute_script("""
    window.statusLog = [];
    new MutationObserver(() => window.statusLog.push(document.getElementById('status').textContent))
        .observe(document.getElementById('status'), {childList: true, characterData: true,
                                                     subtree: true});""")


def _choose(driver, path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  driver.find_element(By.ID, 'file').send_keys(str(path))


def _visible_text(driver, element_id):
  return driver.execute_script(
      f'const e = document.getElementById("{element_id}"); return e.hidden ? "" : e.textContent;')


def test_page_upscales_a_real_image(server, browser, files, tmp_path, capsys):
  driver, downloads = browser
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  _open_page(driver, server.url)
  options = [o.text for o in driver.find_elements(By.CSS_SELECTOR, '#model option')]
  assert options == ['waifu2x (shipped models)', 'tiny2x (2x)']
  assert _visible_text(driver, 'no-models') == ''
  assert [o.text for o in driver.find_elements(By.CSS_SELECTOR, '#scale option')] == [
      '1x', '2x', '4x']
  # Defaults as the command's: noise 0, scale 2, PNG; here scale2x_noise0 does it.
  _choose(driver, files['image'])
  start = driver.find_element(By.ID, 'start')
  _wait_for(start.is_enabled, 10, 'the Upscale button')
  start.click()
  _wait_for(lambda: driver.execute_script(
      'return !document.getElementById("result-section").hidden && '
      'document.getElementById("result-img").naturalWidth > 0') or _visible_text(driver, 'error'),
            60, 'the result')
  assert _visible_text(driver, 'error') == ''
  log = [s for s in driver.execute_script('return window.statusLog') if s]
  assert log[0] == 'Uploading…', log
  assert any(re.match(r'(Starting|Waiting|Upscaling)', s) for s in log), log  # progress shown
  assert re.fullmatch(r'Done in \d+\.\d s \(\d+ tiles\)\.', _visible_text(driver, 'status'))
  sizes = driver.execute_script(
      'const r = document.getElementById("result-img"), i = document.getElementById("input-img");'
      'return [r.naturalWidth, r.naturalHeight, i.naturalWidth, i.naturalHeight,'
      '        r.clientWidth, i.clientWidth];')
  assert sizes[:4] == [256, 192, 128, 96]
  assert sizes[4] == sizes[5]  # the input is shown enlarged over the result
  # The compare slider moves the split; the toggle shows one picture or the other.
  slider = driver.find_element(By.ID, 'slider')
  driver.execute_script('arguments[0].value = 20; arguments[0].dispatchEvent(new Event("input"))',
                        slider)
  clip = lambda: driver.execute_script(
      'return getComputedStyle(document.getElementById("input-img")).clipPath')
  assert driver.execute_script(
      'return document.getElementById("compare").style.getPropertyValue("--split")') == '20%'
  assert clip().startswith('inset('), clip()
  driver.find_element(By.ID, 'view-result').click()
  assert driver.execute_script(
      'return getComputedStyle(document.getElementById("input-img")).display') == 'none'
  driver.find_element(By.ID, 'view-input').click()
  assert clip() == 'none'
  driver.find_element(By.ID, 'view-compare').click()

  link = driver.find_element(By.ID, 'download')
  assert link.text == 'Download chelsea_w2x.png'
  link.click()
  path = downloads / 'chelsea_w2x.png'
  _wait_for(lambda: path.exists() and not list(downloads.glob('*.crdownload')), 30,
            'the download')
  with Image.open(path) as im:
    assert (im.format, im.mode, im.size) == ('PNG', 'RGB', (256, 192))
    got = np.asarray(im).astype(np.float64)
  with Image.open(files['image']) as im:
    bicubic = np.asarray(im.resize((256, 192), Image.Resampling.BICUBIC)).astype(np.float64)
  diff = np.abs(got - bicubic).mean()
  psnr = 10 * np.log10(255.0 ** 2 / np.mean((got - bicubic) ** 2))
  assert diff > 2.0, diff  # not a plain bicubic enlargement ...
  assert psnr > 18, psnr  # ... yet the same picture
  # The command line with the same model writes the same pixels.
  cli_out = tmp_path / 'cli.png'
  assert upscale.main(['-i', str(files['image']), '-o', str(cli_out), '-m', str(files['model']),
                       '--tile-size', TILE, '--quiet']) == 0
  capsys.readouterr()
  with Image.open(cli_out) as im:
    assert np.abs(np.asarray(im).astype(np.float64) - got).max() <= 1


def test_page_shows_upload_errors(server, browser, files, tmp_path):
  driver, _ = browser
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  _open_page(driver, server.url)
  text = tmp_path / 'notes.txt'
  text.write_text('not an image')
  big = tmp_path / 'large.png'
  Image.fromarray(np.zeros((170, 170, 3), np.uint8)).save(big)  # 28,900 > 160x160 pixels
  heavy = tmp_path / 'heavy.bmp'
  heavy.write_bytes(os.urandom(MAX_UPLOAD + 1))
  want = {text: 'notes.txt: not an image, or a damaged one',
          big: 'large.png: 170x170 is 0.0289 megapixels, over the limit of this server',
          heavy: 'heavy.bmp: larger than the upload limit of 300 KB'}
  for path, message in want.items():
    _choose(driver, path)
    start = driver.find_element(By.ID, 'start')
    _wait_for(start.is_enabled, 10, 'the Upscale button')
    start.click()
    shown = _wait_for(lambda: path.name in _visible_text(driver, 'error') and _visible_text(
        driver, 'error'), 30, f'the error for {path.name}')
    assert shown.startswith(message), shown
    assert driver.execute_script('return document.getElementById("result-section").hidden')


def test_http_errors_leave_nothing_behind(server, files):
  before = _tree(files['root'])
  with open(files['image'], 'rb') as f:
    png = f.read()
  cases = {
      'a text file': (server.upload(b'plain text, no image\n', 'notes.txt'),
                      415, 'notes.txt: not an image, or a damaged one'),
      'a corrupt PNG': (server.upload(png[:len(png) // 2], 'cut.png'),
                        422, 'cut.png: cannot read the image: the file is cut short'),
      'over the pixel limit': (server.upload(_png_bytes((161, 160)), 'wide.png'),
                               422, 'wide.png: 161x160 is 0.02576 megapixels, over the limit '
                               'of this server: 0.0256 megapixels (160x160); shrink the image'),
      'over the byte limit': (server.upload(os.urandom(MAX_UPLOAD + 1), 'heavy.png'),
                              413, 'heavy.png: larger than the upload limit of 300 KB'),
      'an empty upload': (server.upload(b'', 'empty.png'), 400, 'empty.png: the upload is empty'),
      # Pillow would run Ghostscript on it, where installed: uploaded PostScript, never run.
      'an EPS': (server.upload(b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n',
                               'page.eps'),
                 415, 'page.eps: EPS (PostScript) is not accepted here'),
      'a wrong option': (server.upload(png, scale=3), 400, 'scale must be one of 2, 4'),
      'a wrong quality': (server.upload(png, quality=101), 400, 'quality must be 0 to 100'),
      'nothing to do': (server.upload(png, model='shipped', noise=-1, scale=1), 400,
                        'nothing to do: no noise reduction at 1x'),
      'a missing shipped model': (server.upload(png, model='shipped', noise=2), 409,
                                  "shipped model 'scale2x_noise2' is not installed"),
      'no X-Filename header': (server.request('/api/jobs?model=m0', 'POST', png), 400,
                               'upload with the page'),
      'an unknown job': (server.request('/api/jobs/nope'), 404, 'no such job'),
  }
  for what, ((status, _, body), want_status, message) in cases.items():
    assert status == want_status, (what, status, body)
    assert body['error'].startswith(message), (what, body)
  # An upload without Content-Length is cut off at the limit as well.
  host, port = server.url.split('/')[2].split(':')
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.request('POST', '/api/jobs?model=m0', body=iter([os.urandom(65536)] * 6),
               headers={'X-Filename': 'stream.png'}, encode_chunked=True)
  response = conn.getresponse()
  assert response.status == 413
  assert json.loads(response.read())['error'].startswith('stream.png: larger than the upload')
  conn.close()
  # An upload that stops sending is dropped (408) and holds no queue place: all 8 of them stalled
  # at once, then an upload goes through.
  stalled = []
  for i in range(web.DEFAULT_MAX_QUEUE):
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest('POST', '/api/jobs?model=m0')
    conn.putheader('X-Filename', f'slow{i}.png')
    conn.putheader('Content-Length', '100000')
    conn.endheaders()
    conn.send(png[:40])
    stalled.append(conn)
  for i, conn in enumerate(stalled):
    response = conn.getresponse()
    assert response.status == 408
    assert json.loads(response.read())['error'] == (
        f'slow{i}.png: the upload stalled (nothing for {UPLOAD_TIMEOUT} s)')
    conn.close()
  # Nor one that sends a byte now and then (the gaps alone would let it stay for hours).
  conn = http.client.HTTPConnection(host, int(port), timeout=60)
  conn.putrequest('POST', '/api/jobs?model=m0')
  conn.putheader('X-Filename', 'trickle.png')
  conn.putheader('Content-Length', '100000')
  conn.endheaders()
  try:
    for _ in range(4 * UPLOAD_TIMEOUT):
      conn.send(b'0')
      time.sleep(0.5)
  except OSError:
    pass  # dropped: the server may close before all are sent
  response = conn.getresponse()
  assert response.status == 408
  assert 'trickle.png: the upload is too slow' in json.loads(response.read())['error']
  conn.close()
  status, _, body = server.upload(png, 'after.png')
  assert status == 202, body
  assert server.wait(body['id'])['state'] == 'done'
  # Starlette's own refusals answer as the API does: one-line JSON.
  status, _, body = server.request('/api/nothing')
  assert (status, body) == (404, {'error': 'GET /api/nothing: Not Found'})
  status, head, body = server.request('/api/config', 'DELETE')
  assert (status, body) == (405, {'error': 'DELETE /api/config: Method Not Allowed'})
  assert 'GET' in head['allow']
  # Another Host header (DNS rebinding) is refused.
  status, _, _ = server.request('/api/config', headers={'Host': 'evil.example'})
  assert status == 400
  # Nothing was written anywhere but the server's folder, and no refused upload stayed there.
  assert _tree(files['root']) == before
  assert os.listdir(server.cwd) == []
  assert os.listdir(server.tmp) == [os.path.basename(server.temp_folder)]
  kept = _tree(server.temp_folder)
  assert all(re.fullmatch(r'job-[^/]+/result\.png', p) for p in kept), kept


def _png_bytes(size, seed=0):
  buf = io.BytesIO()
  data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(data).save(buf, 'PNG')
  return buf.getvalue()


def test_jobs_run_one_at_a_time(server):
  png = _png_bytes((40, 30), seed=1)
  # TTA and 4x (two passes): the first job compiles, so the others queue behind it.
  ids = []
  for i in range(3):
    status, _, body = server.upload(png, f'q{i}.png', tta=1, scale=4, format='webp')
    assert status == 202, body
    assert body['state'] == 'queued'
    ids.append(body['id'])
  assert body['queue_position'] >= 1
  done = [server.wait(i) for i in ids]
  assert [d['state'] for d in done] == ['done'] * 3, done
  spans = sorted((d['started_at'], d['finished_at']) for d in done)
  assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two at once
  assert [(d['result']['width'], d['result']['height'], d['passes']) for d in done] == [
      (160, 120, 2)] * 3
  status, head, body = server.request(done[0]['result']['download_url'])
  assert status == 200 and head['content-type'] == 'image/webp'
  assert 'attachment' in head['content-disposition'] and 'q0_w2x.webp' in head[
      'content-disposition']
  with Image.open(io.BytesIO(body)) as im:
    assert (im.format, im.size) == ('WEBP', (160, 120))
  # A queued job can be cancelled: its files go at once.
  first = server.upload(_png_bytes((150, 150)), 'a.png', tta=1, scale=2, format='webp')[2]['id']
  second = server.upload(png, 'b.png', tta=1, scale=4)[2]['id']
  status, _, body = server.request(f'/api/jobs/{second}', 'DELETE')
  assert status == 200 and body['state'] in ('removed', 'cancelling')
  assert server.wait(first)['state'] == 'done'
  assert server.request(f'/api/jobs/{second}')[0] == 404 or server.wait(second)['state'] == (
      'cancelled')


def test_results_stay_while_others_use_the_server_and_jobs_say_what_they_left(server):
  """A result stays downloadable after many other people's jobs (8 in all had removed it within
  seconds); an animation says only its first frame was upscaled; a turned JPEG's input size is
  its upright one."""
  first = server.upload(_png_bytes((20, 16)), 'mine.png')[2]['id']
  assert server.wait(first)['state'] == 'done'
  for i in range(10):
    assert server.wait(server.upload(_png_bytes((20, 16), seed=i), f'other{i}.png')[2]['id'])[
        'state'] == 'done'
  done = server.wait(first)
  assert server.request(done['result']['download_url'])[0] == 200
  frames = [Image.fromarray(np.full((16, 20, 3), v, np.uint8)) for v in (0, 128, 255)]
  buf = io.BytesIO()
  frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:])
  done = server.wait(server.upload(buf.getvalue(), 'anim.gif')[2]['id'])
  assert done['state'] == 'done' and done['message'] == (
      'anim.gif: 3 frames (an animation or pages); only the first is upscaled')
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(buf, 'JPEG', exif=exif)
  done = server.wait(server.upload(buf.getvalue(), 'turned.jpg')[2]['id'])
  assert done['input'] == {'width': 16, 'height': 20}
  assert (done['result']['width'], done['result']['height']) == (32, 40)


def _server_in_process(files, tmp_path):
  """A web.Server of the test models in this process (no HTTP): its requests called directly."""
  return web.Server(web.parse_args(['--model', str(files['models']), '--weights-dir',
                                    str(tmp_path / 'none'), '--tile-size', TILE, '--temp-dir',
                                    str(tmp_path)]))


def test_an_upload_whose_page_left_is_not_run(files, tmp_path):
  """Sent whole, then gone before the answer (Cancel while "Uploading", a closed tab): no job
  runs for nobody, holding the queue. (In process: the request's next message says it left.)"""
  import asyncio  # pylint: disable=g-import-not-at-top
  from starlette.requests import Request  # pylint: disable=g-import-not-at-top
  server = _server_in_process(files, tmp_path)
  try:
    messages = [{'type': 'http.request', 'body': _png_bytes((20, 16)), 'more_body': False}]

    async def receive():
      return messages.pop(0) if messages else {'type': 'http.disconnect'}
    scope = {'type': 'http', 'method': 'POST', 'path': '/api/jobs', 'query_string': b'model=m0',
             'headers': [(b'x-filename', b'gone.png')]}
    response = asyncio.run(server.create_job(Request(scope, receive)))
    assert response.status_code == 400 and server.jobs == {}
    assert os.listdir(server.tmp) == []
  finally:
    server.close()


def _queue_in_process(server, body, query, name):
  """The job of an upload to `server` (a web.Server in this process), queued: 202."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from starlette.requests import Request  # pylint: disable=g-import-not-at-top
  messages = [{'type': 'http.request', 'body': body, 'more_body': False}]

  async def receive():  # (the page waits for the answer: no disconnect)
    if messages:
      return messages.pop(0)
    await asyncio.sleep(3600)
  scope = {'type': 'http', 'method': 'POST', 'path': '/api/jobs', 'query_string': query,
           'headers': [(b'x-filename', name)]}
  response = asyncio.run(server.create_job(Request(scope, receive)))
  assert response.status_code == 202, response.body
  return server.jobs[json.loads(response.body)['id']]


def test_an_image_over_the_free_memory_is_an_error_not_run(files, tmp_path, monkeypatch):
  """As the command refuses it: run, it had the server killed for memory, every job with it."""
  server = _server_in_process(files, tmp_path)
  try:
    monkeypatch.setattr(upscale, 'available_memory', lambda: 1 << 20)  # 1 MB free
    job = _queue_in_process(server, _png_bytes((150, 150)), b'model=m0&scale=4', b'huge.png')
    _wait_for(lambda: not job.active, 60, 'the job')
    assert job.state == 'error' and re.fullmatch(
        r'huge\.png: 150x150 needs about [\d.]+ MB of memory, 1 MB free; choose a smaller scale, '
        r'or a smaller image', job.message), job.message
    assert os.listdir(server.tmp) == []
  finally:
    server.close()


def test_a_job_cancelled_while_its_result_is_written_keeps_no_result(files, tmp_path, monkeypatch):
  """Cancel after the last tile (the page says "Cancelled."): the job had ended 'done', its result
  kept for 30 minutes."""
  server = _server_in_process(files, tmp_path)
  try:
    write = web.image_io.write_image

    def write_then_cancel(*a, **k):  # the page's DELETE arrives while the file is written
      write(*a, **k)
      for j in server.jobs.values():
        j.cancel = True
    monkeypatch.setattr(web.image_io, 'write_image', write_then_cancel)
    job = _queue_in_process(server, _png_bytes((20, 16)), b'model=m0', b'late.png')
    _wait_for(lambda: not job.active, 60, 'the job')
    assert job.state == 'cancelled'
    assert os.listdir(server.tmp) == []
  finally:
    server.close()


def test_second_ctrl_c_stops_at_once_and_removes_the_uploads(files, tmp_path):
  served = Served(['--model', str(files['models']), '--tile-size', TILE], tmp_path)
  for i in range(2):  # one running, one queued
    assert served.upload(_png_bytes((150, 150), seed=i), f'big{i}.png', tta=1, scale=4)[0] == 202
  time.sleep(1)
  served.proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  code = served.stop(signal.SIGINT)
  # 130 where the second came while stopping; 0 where the first had done it all, or -SIGINT where
  # the second came after that, as the interpreter ended (Python's handlers gone by then).
  assert code in (0, 128 + signal.SIGINT, -signal.SIGINT), served.output
  assert 'terminate called' not in served.output and 'Traceback' not in served.output
  assert not os.path.exists(served.temp_folder)


def test_jpeg_of_a_transparent_image_without_a_colour_goes_over_white(server):
  buf = io.BytesIO()
  rgba = np.zeros((20, 30, 4), np.uint8)  # wholly transparent black: white once composited
  Image.fromarray(rgba).save(buf, 'PNG')
  status, _, body = server.upload(buf.getvalue(), 'clear.png', format='jpeg')
  assert status == 202, body
  done = server.wait(body['id'])
  assert done['state'] == 'done', done
  status, head, data = server.request(done['result']['download_url'])
  assert status == 200 and head['content-type'] == 'image/jpeg'
  with Image.open(io.BytesIO(data)) as im:
    assert im.mode == 'RGB' and np.asarray(im).mean() > 240  # (the test's model is untrained)


def test_results_deleted_while_downloading_are_sent_whole_or_not_found(server, files):
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  with open(files['image'], 'rb') as f:
    png = f.read()
  statuses = []
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(6):
      status, _, body = server.upload(png, 'race.png')
      assert status == 202, body
      done = server.wait(body['id'])
      assert done['state'] == 'done', done
      url, size = done['result']['download_url'], done['result']['bytes']
      gets = [pool.submit(server.request, url) for _ in range(3)]
      pool.submit(server.request, f'/api/jobs/{body["id"]}', 'DELETE').result()
      for got in gets:
        status, _, data = got.result()
        statuses.append(status)
        assert status in (200, 404), status
        assert status != 200 or len(data) == size
  assert 'Traceback' not in server.output, server.output
  assert 200 in statuses
  # A download refused for its Range header (416) ends too: the folder still goes with the job.
  status, _, body = server.upload(png, 'range.png')
  done = server.wait(body['id'])
  status, _, _ = server.request(done['result']['download_url'], headers={'Range': 'bytes=99999999-'})
  assert status == 416
  before = set(os.listdir(server.temp_folder))
  assert server.request(f'/api/jobs/{body["id"]}', 'DELETE')[0] == 200
  assert len(before - set(os.listdir(server.temp_folder))) == 1


def test_allowed_hosts():
  parse = web.parse_args
  assert web.allowed_hosts(parse([])) == list(web.LOOPBACK_HOSTS)
  assert web.allowed_hosts(parse(['--allowed-host', 'pc.lan'])) == [*web.LOOPBACK_HOSTS, 'pc.lan']
  assert web.allowed_hosts(parse(['--host', '0.0.0.0'])) is None  # any, with a warning
  assert web.allowed_hosts(parse(['--host', '0.0.0.0', '--allowed-host', 'nas.local',
                                  '--allowed-host', '192.168.1.5'])) == ['nas.local', '192.168.1.5']


def test_stop_removes_the_temporary_folder(server):
  assert os.path.isdir(server.temp_folder)
  # An upload still arriving when the server stops (after its graceful wait): answered, not a
  # traceback in the server's output.
  host, port = server.url.split('/')[2].split(':')
  conn = http.client.HTTPConnection(host, int(port), timeout=60)
  conn.putrequest('POST', '/api/jobs?model=m0')
  conn.putheader('X-Filename', 'arriving.png')
  conn.putheader('Content-Length', '100000')
  conn.endheaders()
  sending = threading.Event()
  sending.set()

  def trickle():  # a byte more often than --upload-timeout: never dropped as stalled
    try:
      while sending.is_set():
        conn.send(b'0')
        time.sleep(0.5)
    except OSError:
      pass
  threading.Thread(target=trickle, daemon=True).start()
  time.sleep(1)
  assert server.stop(signal.SIGINT) == 0
  sending.clear()
  assert 'Traceback' not in server.output, server.output
  assert not os.path.exists(server.temp_folder)
  assert os.listdir(server.tmp) == [] and os.listdir(server.cwd) == []
  assert server.output.rstrip().endswith('w2x_jax.web: stopped')


def test_folders_of_servers_that_were_killed_are_removed_at_start(tmp_path, capsys, monkeypatch):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  host = socket.gethostname()
  names = {'stale': f'w2x-web-{host}-{dead.pid}-abc', 'running': f'w2x-web-{host}-{os.getpid()}-def',
           'other_host': f'w2x-web-{host}x-{dead.pid}-ghi', 'not_ours': f'w2x-web-{host}-x-jkl',
           # host HOST-PID's folder (a shared disk): not this host's process PID
           'longer_host': f'w2x-web-{host}-{dead.pid}-{os.getpid()}-mno'}
  for name in names.values():
    os.makedirs(tmp_path / name / 'job-1')
  assert web.remove_stale_temp_dirs(str(tmp_path)) == 1
  assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k != 'stale')
  assert 'removed 1 temporary folder(s)' in capsys.readouterr().err
  # Another user's (a shared /tmp): left alone, not said as removed at every start.
  os.makedirs(tmp_path / names['stale'])
  (tmp_path / 'link').mkdir()
  os.symlink(tmp_path / 'link', tmp_path / f'w2x-web-{host}-{dead.pid}-lnk')
  uid = os.getuid()
  monkeypatch.setattr(os, 'getuid', lambda: uid + 1)
  assert web.remove_stale_temp_dirs(str(tmp_path)) == 0
  monkeypatch.undo()
  assert os.path.isdir(tmp_path / names['stale'])
  assert web.remove_stale_temp_dirs(str(tmp_path)) == 1  # the link is no server's folder
  assert os.path.isdir(tmp_path / 'link')
  assert web.remove_stale_temp_dirs(str(tmp_path / 'gone')) == 0  # unlistable: not a failed start
  # --temp-dir must be readable too (where killed servers' folders are looked for); as root,
  # os.access says yes to all, so it answers as for a write-only folder here.
  monkeypatch.setattr(os, 'access', lambda path, mode: not mode & os.R_OK)
  with pytest.raises(SystemExit):
    web.parse_args(['--temp-dir', str(tmp_path)])
  assert 'not readable and writable' in capsys.readouterr().err


def test_no_model_installed(tmp_path, browser_or_none):
  served = Served(['--weights-dir', str(tmp_path / 'empty')], tmp_path)
  try:
    assert 'No model is installed: start the server with --model DIR' in served.output
    status, _, config = served.request('/api/config')
    assert status == 200 and config['models'] == []
    assert config['message'].startswith('No model is installed')
    status, _, body = served.upload(_png_bytes((8, 8)), model='shipped')
    assert status == 409 and body['error'].startswith('No model is installed')
    if browser_or_none is not None:  # the page says it too
      driver, _ = browser_or_none
      _open_page(driver, served.url)
      assert _visible_text(driver, 'no-models').startswith('No model is installed')
      assert driver.execute_script('return document.getElementById("start").disabled')
  finally:
    served.stop()
  assert not os.path.exists(served.temp_folder)


@pytest.fixture
def browser_or_none(request):
  try:
    return request.getfixturevalue('browser')
  except pytest.skip.Exception:
    return None


def test_bad_model_folder_and_limits_parsing(tmp_path, capsys):
  assert web.parse_pixels('3000x3000') == 9_000_000 and web.parse_pixels('1234') == 1234
  assert web.parse_bytes('100M') == 100 << 20 and web.parse_bytes('512k') == 512 << 10
  assert web.format_pixels(9_000_000) == '9 megapixels (3000x3000)'
  with pytest.raises(SystemExit):
    web.parse_args(['--max-pixels', 'big'])
  with pytest.raises(SystemExit):
    web.parse_args(['--port', '70000'])
  with pytest.raises(SystemExit):  # (had been a traceback after every model had loaded)
    web.parse_args(['--temp-dir', str(tmp_path / 'nowhere')])
  assert 'nowhere: no such folder' in capsys.readouterr().err
  assert web.parse_args(['--temp-dir', str(tmp_path)]).temp_dir == str(tmp_path)
  capsys.readouterr()
  # An address that is not this machine's: said before any model loads.
  old_handler = signal.getsignal(signal.SIGTERM)
  try:
    assert web.main(['--host', 'nosuchhost.invalid', '--port', '0', '--weights-dir',
                     str(tmp_path / 'empty')]) == 1
  finally:
    signal.signal(signal.SIGTERM, old_handler)
  out = capsys.readouterr().out
  assert 'cannot listen on nosuchhost.invalid:0' in out and '--host takes an address' in out
  assert 'models:' not in out and 'No model is installed' not in out
  os.makedirs(tmp_path / 'notes')
  with pytest.raises(upscale.ModelError, match='neither a model'):
    web.find_model_dirs([str(tmp_path / 'notes')])
  with pytest.raises(upscale.ModelError, match='no such model folder'):
    web.find_model_dirs([str(tmp_path / 'nowhere')])
