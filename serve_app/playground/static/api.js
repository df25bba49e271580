// The HTTP API as the page uses it. URLs are relative to the page, so the playground works
// wherever the app is mounted. Every error becomes an ApiError carrying the server's
// `{"error": ...}` message.

import { parseEventStream } from './sse.js';

const KEY_STORAGE = 'imagegen.apiKey';
export const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || '';
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const out = { ...extra };
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function send(method, path, { body, accept = 'application/json' } = {}) {
  const init = { method, headers: headers({ Accept: accept }) };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new ApiError(`Cannot reach the service: ${err.message}`, 0);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  try {
    const body = await resp.json();
    if (body && typeof body.error === 'string') message = body.error;
  } catch {
    // not JSON: keep the status line
  }
  const retry = resp.headers.get('Retry-After');
  if (retry && (resp.status === 429 || resp.status === 503)) message += ` (retry in ${retry} s)`;
  return new ApiError(message, resp.status);
}

const json = async (method, path, options) => (await send(method, path, options)).json();
const jobPath = (id) => `jobs/${encodeURIComponent(id)}`;

export const api = {
  models: () => json('GET', 'models'),
  upscalers: () => json('GET', 'upscalers'),
  queueStatus: () => json('GET', 'queue/status'),
  submit: (mode, body) => json('POST', `generate/${mode}`, { body }),
  job: (id) => json('GET', jobPath(id)),
  cancel: (id) => json('POST', `${jobPath(id)}/cancel`),
  jobs: (params) => json('GET', `jobs?${new URLSearchParams(params)}`),
  async imageUrl(id, index) {
    const resp = await send('GET', `${jobPath(id)}/images/${index}`, { accept: 'image/*' });
    return URL.createObjectURL(await resp.blob());
  },
};

/** The job's records from GET /jobs/{id}/events, as they change, until it ends. Events of
 *  other types are ignored. */
export async function* jobEvents(id) {
  const resp = await send('GET', `${jobPath(id)}/events`, { accept: 'text/event-stream' });
  for await (const ev of parseEventStream(resp.body)) {
    if (ev.event !== 'job') continue;
    yield JSON.parse(ev.data);
  }
}
