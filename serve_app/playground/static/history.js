// Recent jobs from GET /jobs, newest first, a page at a time (the server's nextCursor;
// the cursors of earlier pages are kept to go back). Thumbnails come from
// GET /jobs/{id}/images/0, fetched with the API key.

import { api } from './api.js';
import { el } from './results.js';

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 12;
const GLYPHS = { failed: '!', cancelled: '×' };

export class History {
  constructor({ onOpen, onError }) {
    this.list = $('history-list');
    this.cursors = [null]; // cursor of each page seen; the last is the current page's
    this.next = null;
    this.urls = [];
    this.onOpen = onOpen;
    this.onError = onError;
    $('history-refresh').addEventListener('click', () => this.first());
    $('history-status').addEventListener('change', () => this.first());
    $('history-older').addEventListener('click', () => {
      this.cursors.push(this.next);
      this.load();
    });
    $('history-newer').addEventListener('click', () => {
      this.cursors.pop();
      this.load();
    });
  }

  first() {
    this.cursors = [null];
    return this.load();
  }

  async load() {
    const params = { limit: Number(this.list.dataset.pageSize) || PAGE_SIZE };
    const cursor = this.cursors.at(-1);
    if (cursor) params.cursor = cursor;
    const status = $('history-status').value;
    if (status) params.status = status;
    let page;
    try {
      page = await api.jobs(params);
    } catch (err) {
      this.onError(err.message);
      return;
    }
    this.next = page.nextCursor ?? null;
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    this.list.replaceChildren(...page.jobs.map((job) => this.#item(job)));
    if (!page.jobs.length) this.list.append(el('li', { class: 'hint' }, 'No jobs yet.'));
    $('history-newer').disabled = this.cursors.length === 1;
    $('history-older').disabled = !this.next;
    $('history-page').textContent = `Page ${this.cursors.length}`;
  }

  #item(job) {
    const when = new Date(job.createdAt).toLocaleString();
    const thumb = el('div', { class: 'thumb' });
    if (job.status === 'completed') this.#thumbnail(thumb, job);
    else thumb.append(el('span', { 'aria-hidden': 'true' }, GLYPHS[job.status] ?? '…'));
    const label = `Open ${job.type} job from ${when}, ${job.status}`;
    return el('li', {},
      el('button', { type: 'button', class: 'history-item', 'aria-label': label,
        title: job.error ?? job.id, onclick: () => this.onOpen(job.id) },
        thumb,
        el('span', { class: `badge ${job.status}` }, job.status),
        el('span', { class: 'meta' }, `${job.type} · ${job.model}`),
        el('span', { class: 'meta hint' }, when)));
  }

  async #thumbnail(holder, job) {
    try {
      const url = await api.imageUrl(job.id, 0);
      this.urls.push(url);
      // Not "Generated image ...": that alt text belongs to the current results.
      holder.append(el('img', { src: url, alt: `Earlier result of ${job.type} job ${job.id}` }));
    } catch {
      holder.append(el('span', {}, '?'));
    }
  }
}
