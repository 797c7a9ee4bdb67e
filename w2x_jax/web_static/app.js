// The page of `python -m w2x_jax.web`: no framework, no build step.
'use strict';

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;

const state = {
  config: null,
  file: null,
  inputUrl: null,  // an object URL of the chosen file
  job: null,  // the job being worked on (its id)
  upload: null,  // the AbortController of an upload under way
  busy: false,
};

function formatBytes(n) {
  for (const [unit, size] of [['GB', 1 << 30], ['MB', 1 << 20], ['KB', 1 << 10]]) {
    if (n >= size) return `${(n / size).toPrecision(3)} ${unit}`;
  }
  return `${n} bytes`;
}

function setStatus(text) {
  $('status').textContent = text;
}

function showError(text) {
  $('error').textContent = text;
  $('error').hidden = !text;
}

function setProgress(fraction) {
  const bar = $('progress');
  bar.hidden = fraction === null;
  if (fraction === null) return;
  if (fraction === undefined) bar.removeAttribute('value');  // indeterminate
  else bar.value = fraction;
}

function currentModel() {
  if (!state.config) return null;
  return state.config.models.find((m) => m.id === $('model').value) || null;
}

function updateOptions() {
  const model = currentModel();
  const scale = $('scale');
  const previous = Number(scale.value) || (state.config && state.config.default_scale);
  scale.replaceChildren();
  for (const s of model ? model.scales : []) {
    scale.append(new Option(`${s}x`, String(s), false, s === previous));
  }
  if (model && !model.scales.includes(previous)) {
    const fallback = model.scales.includes(2) ? 2 : model.scales[0];
    scale.value = String(fallback);
  }
  $('noise').disabled = !model || !model.noise;
  $('model-note').textContent = model && !model.noise
      ? 'This model decides what noise it removes: the noise level does not apply.' : '';
  const fmt = $('format').value;
  $('quality-label').hidden = fmt === 'png';
  $('background-label').hidden = fmt !== 'jpeg';
  $('start').disabled = state.busy || !state.file || !model;
  $('cancel').hidden = !state.busy;
}

async function loadConfig() {
  let config;
  try {
    const response = await fetch('/api/config');
    config = await response.json();
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
    return;
  }
  state.config = config;
  const select = $('model');
  for (const m of config.models) select.append(new Option(m.label, m.id));
  $('no-models').textContent = config.message;
  $('no-models').hidden = !config.message;
  $('options').disabled = !config.models.length;
  $('noise').value = String(config.default_noise);
  $('quality').value = String(config.default_quality);
  $('limits').textContent =
      `Up to ${config.max_pixels_text} and ${config.max_upload_text}.`;
  updateOptions();
}

function forgetJob() {
  if (state.upload) {
    state.upload.abort();
    state.upload = null;
  }
  // The server removes a finished job's files after a while; this frees them now.
  if (state.job) {
    fetch(`/api/jobs/${state.job}`, {method: 'DELETE'}).catch(() => {});
    state.job = null;
  }
}

function chooseFile(file) {
  if (!file) return;
  forgetJob();
  state.file = file;
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.inputUrl = URL.createObjectURL(file);
  const thumb = $('thumb');
  thumb.hidden = false;
  thumb.onerror = () => { thumb.hidden = true; };
  thumb.src = state.inputUrl;
  $('drop-text').textContent = `${file.name} (${formatBytes(file.size)})`;
  $('result-section').hidden = true;
  showError('');
  setStatus('');
  setProgress(null);
  state.busy = false;
  updateOptions();
}

function describe(job) {
  if (job.state === 'queued') {
    const ahead = job.queue_position || 0;
    return ahead ? `Waiting: ${ahead} job${ahead > 1 ? 's' : ''} ahead` : 'Starting…';
  }
  if (job.state === 'running') {
    if (!job.passes) return 'Reading the image…';
    const pass = job.passes > 1 ? `pass ${job.pass_index + 1} of ${job.passes}` : '';
    if (!job.tiles_total) return `Upscaling${pass ? ': ' + pass : ''}…`;
    return `Upscaling: ${pass ? pass + ', ' : ''}tile ${job.tiles_done} of ${job.tiles_total}`;
  }
  return job.state;
}

async function poll(id) {
  if (state.job !== id) return;  // another image was chosen meanwhile
  let job;
  try {
    const response = await fetch(`/api/jobs/${id}`);
    job = await response.json();
    if (!response.ok) throw new Error(job.error || `HTTP ${response.status}`);
  } catch (e) {
    finish();
    showError(`Lost the job: ${e.message}`);
    return;
  }
  if (state.job !== id) return;
  if (job.state === 'done') {
    finish();
    showResult(job);
  } else if (job.state === 'error' || job.state === 'cancelled') {
    finish();
    setStatus('');
    showError(job.message || 'Cancelled.');
  } else {
    setStatus(describe(job));
    setProgress(job.state === 'running' && job.passes ? job.progress : undefined);
    setTimeout(() => poll(id), POLL_MS);
  }
}

function finish() {
  state.busy = false;
  setProgress(null);
  updateOptions();
}

async function start(event) {
  event.preventDefault();
  const file = state.file;
  const model = currentModel();
  if (!file || !model || state.busy) return;
  showError('');
  forgetJob();
  const config = state.config;
  if (file.size > config.max_upload_bytes) {
    // The server refuses it too; this spares sending it.
    showError(`${file.name}: larger than the upload limit of ${config.max_upload_text} ` +
              '(start the server with a larger --max-upload)');
    return;
  }
  const params = new URLSearchParams({
    model: model.id, scale: $('scale').value, tta: $('tta').checked ? '1' : '0',
    format: $('format').value,
  });
  if (model.noise) params.set('noise', $('noise').value);
  if ($('format').value !== 'png') params.set('quality', $('quality').value);
  if ($('format').value === 'jpeg') params.set('background', $('background').value);
  state.busy = true;
  updateOptions();
  $('result-section').hidden = true;
  setStatus('Uploading…');
  setProgress(undefined);
  let response, body;
  const upload = new AbortController();
  state.upload = upload;
  try {
    response = await fetch(`/api/jobs?${params}`, {
      method: 'POST',
      headers: {'X-Filename': encodeURIComponent(file.name),
                'Content-Type': 'application/octet-stream'},
      body: file,
      signal: upload.signal,
    });
    body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  } catch (e) {
    if (upload.signal.aborted) return;  // cancelled, or another image chosen
    state.upload = null;
    finish();
    setStatus('');
    showError(`Upload failed: ${e.message}`);
    return;
  }
  if (upload.signal.aborted) {
    if (response.ok) fetch(`/api/jobs/${body.id}`, {method: 'DELETE'}).catch(() => {});
    return;
  }
  state.upload = null;
  if (!response.ok) {
    finish();
    setStatus('');
    showError(body.error || `HTTP ${response.status}`);
    return;
  }
  state.job = body.id;
  setStatus(describe(body));
  poll(body.id);
}

function cancel() {
  forgetJob();  // the server drops it from the queue, or stops it after the current tiles
  finish();
  setStatus('Cancelled.');
}

function showResult(job) {
  const r = job.result;
  const seconds = job.seconds !== undefined ? ` in ${job.seconds.toFixed(1)} s` : '';
  const passes = job.passes > 1 ? `${job.passes} passes, ` : '';
  const tiles = job.tiles_all ? ` (${passes}${job.tiles_all} tile${job.tiles_all > 1 ? 's' : ''})` : '';
  setStatus(`Done${seconds}${tiles}.`);
  const resultImg = $('result-img');
  const inputImg = $('input-img');
  resultImg.onload = () => { $('result-section').hidden = false; };
  resultImg.onerror = () => {
    $('result-section').hidden = false;
    showError('The browser cannot show this result; download it instead.');
  };
  inputImg.onerror = () => { inputImg.hidden = true; };
  inputImg.hidden = false;
  inputImg.src = state.inputUrl;
  resultImg.src = r.url;
  const link = $('download');
  link.href = r.download_url;
  link.download = r.name;
  link.textContent = `Download ${r.name}`;
  $('sizes').textContent = `Input ${job.input.width}×${job.input.height} → result ` +
      `${r.width}×${r.height}, ${r.format.toUpperCase()}, ${formatBytes(r.bytes)}.` +
      (job.message ? ` Note: ${job.message}.` : '');
  setView('compare');
}

function setSplit(percent) {
  const compare = $('compare');
  compare.style.setProperty('--split', `${percent}%`);
}

function setView(view) {
  $('compare').dataset.view = view;
  for (const name of ['compare', 'input', 'result']) {
    $(`view-${name}`).classList.toggle('active', name === view);
    $(`view-${name}`).setAttribute('aria-pressed', String(name === view));
  }
  $('slider').disabled = view !== 'compare';
}

function setupDrop() {
  const drop = $('drop');
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add('over');
    });
  }
  for (const type of ['dragleave', 'drop']) {
    drop.addEventListener(type, () => drop.classList.remove('over'));
  }
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    e.stopPropagation();  // (the document's listener below would take it a second time)
    if (e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
  });
  // A file dropped elsewhere on the page is taken too, rather than opened by the browser.
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
  });
}

function setupCompare() {
  const compare = $('compare');
  $('slider').addEventListener('input', (e) => setSplit(e.target.value));
  // Dragging on the picture moves the split line too.
  const follow = (e) => {
    if (compare.dataset.view !== 'compare') return;
    const rect = compare.getBoundingClientRect();
    const percent = Math.min(100, Math.max(0, 100 * (e.clientX - rect.left) / rect.width));
    $('slider').value = String(percent);
    setSplit(percent);
  };
  compare.addEventListener('pointerdown', (e) => {
    compare.setPointerCapture(e.pointerId);
    follow(e);
  });
  compare.addEventListener('pointermove', (e) => {
    if (compare.hasPointerCapture(e.pointerId)) follow(e);
  });
  for (const name of ['compare', 'input', 'result']) {
    $(`view-${name}`).addEventListener('click', () => setView(name));
  }
  setSplit($('slider').value);
}

window.addEventListener('DOMContentLoaded', () => {
  $('file').addEventListener('change', (e) => chooseFile(e.target.files[0]));
  $('model').addEventListener('change', updateOptions);
  $('format').addEventListener('change', updateOptions);
  $('form').addEventListener('submit', start);
  $('cancel').addEventListener('click', cancel);
  setupDrop();
  setupCompare();
  loadConfig();
});
