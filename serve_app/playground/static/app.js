// The playground: submit a job from the form, follow its event stream (progress, phase,
// queue position) with a working Cancel, then show its images; history and queue status
// around it. One job at a time per page.

import { api, ApiError, apiKey, jobEvents, setApiKey, TERMINAL } from './api.js';
import { GenerateForm } from './form.js';
import { History } from './history.js';
import { ImageInput } from './inputs.js';
import { MaskPainter } from './mask.js';
import { renderForming, renderMessage, renderResults } from './results.js';

const $ = (id) => document.getElementById(id);
const POLL_MS = 500; // only when the event stream broke off
const QUEUE_REFRESH_MS = 3000;
const MODELS_REFRESH_MS = 15000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const form = new GenerateForm();
const results = $('results');
let current = null; // the id of the job this page follows

// -- errors and the API key -----------------------------------------------------------

function showError(message) {
  $('error').textContent = message;
}

function handle(err) {
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    $('auth').open = true;
  }
  showError(err.message);
}

$('api-key').value = apiKey();
$('auth').open = Boolean(apiKey());
function saveKey(event) {
  event.preventDefault();
  setApiKey($('api-key').value.trim());
  showError('');
  refreshAll();
}
$('api-key').addEventListener('change', saveKey);
$('auth-form').addEventListener('submit', saveKey);

// -- image inputs ------------------------------------------------------------------------

const painter = new MaskPainter($('mask-canvas'), {
  brushSize: $('brush-size'), eraser: $('eraser'), clear: $('clear-mask'),
});
const onError = showError;
const sizeFrom = (_, img) => form.sizeFrom(img);
const inputs = {
  initImage: new ImageInput($('init-image'), { onImage: sizeFrom, onError }),
  image: new ImageInput($('inpaint-image'), {
    onError,
    onImage(uri, img) {
      $('inpaint-preview').src = uri;
      $('paint').hidden = false;
      painter.reset(img.naturalWidth, img.naturalHeight);
      form.sizeFrom(img);
    },
  }),
  contentImage: new ImageInput($('content-image'), { onImage: sizeFrom, onError }),
  styleImage: new ImageInput($('style-image'), { onError }),
  outpaintImage: new ImageInput($('outpaint-image'), { onError }),
  upscaleImage: new ImageInput($('upscale-image'), { onError }),
};

function need(input, message) {
  if (!input.dataUri) throw new Error(message);
  return input.dataUri;
}

/** The images the current mode sends, checked before anything is submitted. */
function modeImages(mode) {
  if (mode === 'img2img') {
    return { initImage: need(inputs.initImage, 'Choose an input image first.') };
  }
  if (mode === 'inpaint') {
    const image = need(inputs.image, 'Choose an image to inpaint first.');
    if (painter.isEmpty()) throw new Error('Paint over the part of the image to repaint.');
    return { image, mask: painter.toDataURL() };
  }
  if (mode === 'outpaint') {
    return { image: need(inputs.outpaintImage, 'Choose an image to extend first.') };
  }
  if (mode === 'upscale') {
    return { image: need(inputs.upscaleImage, 'Choose an image to upscale first.') };
  }
  if (mode === 'style-transfer') {
    return {
      contentImage: need(inputs.contentImage, 'Choose a content image first.'),
      styleImage: need(inputs.styleImage, 'Choose a style image first.'),
    };
  }
  return {};
}

// -- a job's progress ----------------------------------------------------------------------

function describe(r) {
  if (r.status === 'completed') return `Completed in ${(r.result.timeTaken / 1000).toFixed(2)} s`;
  if (r.status === 'failed') return 'Failed';
  if (r.status === 'cancelled') return `Cancelled at ${r.progress}%`;
  const phase = r.phase ?? '';
  if (phase === 'loading_model') return 'Loading the model (cold start: no replica was ready)…';
  if (phase === 'waiting_for_replica') return 'Waiting for a free replica…';
  if (phase === 'retrying') return `Retrying (${r.retryReason ?? 'its replica was lost'})…`;
  if (phase === 'hires') return `Hires fix: refining at the larger size… ${r.progress}%`;
  if (r.status === 'processing') return `Generating… ${r.progress}%`;
  return r.queuePosition ? `Queued: position ${r.queuePosition}` : 'Queued';
}

function showRecord(r) {
  const bar = $('progress');
  bar.value = r.progress;
  bar.setAttribute('aria-valuenow', r.progress);
  bar.textContent = `${r.progress}%`;
  $('phase').textContent = describe(r);
  $('phase').dataset.status = r.status;
  $('job-meta').textContent = `${r.id} · ${r.type} · ${r.model} · ${r.priority} priority`;
  if (r.preview && r.status === 'processing') renderForming(results, r);
}

function setBusy(busy) {
  $('generate').disabled = busy;
  $('cancel').disabled = !busy;
  results.setAttribute('aria-busy', String(busy));
}

/** Follow a job to its end: its event stream, or polling if the stream breaks off. */
async function follow(job) {
  current = job.id;
  setBusy(true);
  showRecord(job);
  let last = job;
  try {
    for await (const record of jobEvents(job.id)) {
      last = record;
      showRecord(record);
    }
  } catch (err) {
    console.warn('event stream broke off; polling', err);
  }
  try {
    while (!TERMINAL.has(last.status)) {
      await sleep(POLL_MS);
      last = await api.job(job.id);
      showRecord(last);
    }
    finish(await api.job(job.id)); // the stream's records carry no images
  } catch (err) {
    handle(err);
  } finally {
    current = null;
    setBusy(false);
    refreshAll();
  }
}

function finish(job) {
  showRecord(job);
  if (job.status === 'completed') {
    renderResults(results, job, { onReuse: reuse });
    const seeds = job.result.seeds.join(', ');
    $('seed-used').textContent = `Used seed${job.result.seeds.length > 1 ? 's' : ''}: ${seeds}`;
  } else if (job.status === 'failed') {
    showError(job.error ?? 'The job failed.');
    renderMessage(results, 'The job failed; nothing to show.');
  } else {
    renderMessage(results, 'The job was cancelled.');
  }
}

function reuse(job, seed) {
  form.apply(job.type, job.request, seed);
  $('prompt').focus();
}

// -- actions ----------------------------------------------------------------------------

form.form.addEventListener('submit', async (event) => {
  event.preventDefault();
  if (current) return;
  showError('');
  let body;
  try {
    body = form.body(modeImages(form.mode));
  } catch (err) {
    showError(err.message);
    return;
  }
  setBusy(true);
  renderMessage(results, 'Working on it…');
  let job;
  try {
    job = await api.submit(form.mode, body);
  } catch (err) {
    setBusy(false);
    handle(err);
    renderMessage(results, 'Nothing was submitted.');
    return;
  }
  await follow(job);
});

$('cancel').addEventListener('click', async () => {
  if (!current) return;
  $('cancel').disabled = true;
  try {
    await api.cancel(current);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 409)) handle(err); // 409: already over
  }
});

const history = new History({
  onError: showError,
  async onOpen(id) {
    if (current) return;
    showError('');
    try {
      const job = await api.job(id);
      if (TERMINAL.has(job.status)) finish(job);
      else await follow(job);
    } catch (err) {
      handle(err);
    }
  },
});

// -- queue, models, history ---------------------------------------------------------------

async function refreshQueue() {
  try {
    const q = await api.queueStatus();
    const avg = (q.averageProcessingTime / 1000).toFixed(1);
    $('queue-status').textContent = `Queue: ${q.queuedJobs} waiting · ${q.processingJobs} `
      + `running · ${q.completedJobs} done · ${q.failedJobs} failed · average ${avg} s`;
  } catch (err) {
    $('queue-status').textContent = `Queue: unavailable (${err.message})`;
    if (err instanceof ApiError && err.status === 401) $('auth').open = true;
  }
}

async function refreshModels() {
  try {
    await form.loadModels();
    await form.loadUpscalers();
  } catch (err) {
    handle(err);
  }
}

function refreshAll() {
  refreshQueue();
  refreshModels();
  history.first();
}

refreshAll();
setInterval(refreshQueue, QUEUE_REFRESH_MS);
setInterval(refreshModels, MODELS_REFRESH_MS);
