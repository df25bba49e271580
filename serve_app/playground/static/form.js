// The generation form: modes, the model list with its warm/cold state, and the request
// body it builds (camelCase, as the API takes it). Fields left empty are left out, so the
// server applies the model's defaults.

import { api } from './api.js';

const $ = (id) => document.getElementById(id);
const MAX_INPUT_SIDE = 1024; // an uploaded image sets the size, scaled down to this

export class GenerateForm {
  constructor() {
    this.form = $('generate-form');
    this.models = new Map();
    this.modelsLoaded = false;
    this.signature = '';
    for (const radio of this.form.elements.mode) {
      radio.addEventListener('change', () => this.#showMode());
    }
    for (const range of this.form.querySelectorAll('input[type=range]')) {
      range.addEventListener('input', () => this.#syncOutput(range));
    }
    $('random-seed').addEventListener('click', () => {
      $('seed').value = crypto.getRandomValues(new Uint32Array(1))[0];
    });
    $('hires').addEventListener('change', () => {
      $('hires-options').hidden = !$('hires').checked;
    });
    $('model').addEventListener('change', () => {
      this.#applyDefaults();
      this.#showModelStatus();
    });
    this.#showMode();
  }

  get mode() {
    return this.form.elements.mode.value;
  }

  set mode(mode) {
    this.form.elements.mode.value = mode;
    this.#showMode();
  }

  /** Refresh the model list and its warm/cold state, keeping the selection. */
  async loadModels() {
    const { models } = await api.models();
    const select = $('model');
    const chosen = select.value;
    this.models = new Map(models.map((m) => [m.id, m]));
    const options = models.map((m) => [m.id, modelLabel(m), m.served]);
    const signature = JSON.stringify(options);
    if (signature !== this.signature) { // rebuilding an open list would close it
      this.signature = signature;
      select.replaceChildren(...options.map(([id, text, served]) => {
        const option = new Option(text, id);
        option.disabled = !served;
        return option;
      }));
    }
    const fallback = models.find((m) => m.default && m.served) ?? models.find((m) => m.served);
    select.value = this.models.get(chosen)?.served ? chosen : (fallback?.id ?? '');
    if (!this.modelsLoaded) this.#applyDefaults();
    this.modelsLoaded = true;
    this.#showModelStatus();
  }

  /** Width and height from an uploaded image: its size rounded down to multiples of 8. */
  sizeFrom(img) {
    const scale = Math.min(1, MAX_INPUT_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const side = (n) => Math.max(64, Math.floor((n * scale) / 8) * 8);
    $('width').value = side(img.naturalWidth);
    $('height').value = side(img.naturalHeight);
  }

  /** The upscalers the service offers, into the Upscale mode's list. */
  async loadUpscalers() {
    const { upscalers } = await api.upscalers();
    const select = $('upscaler');
    const chosen = select.value;
    select.replaceChildren(...upscalers.map((u) => {
      const option = new Option(u.scale ? `${u.name} (x${u.scale} model)` : u.name, u.name);
      option.disabled = !u.present;
      return option;
    }));
    select.value = upscalers.some((u) => u.name === chosen) ? chosen : 'lanczos';
  }

  /** The request body for the current mode; `images` holds the mode's data URIs. */
  body(images) {
    if (this.mode === 'upscale') {
      return {
        scale: number('upscale-scale'), upscaler: $('upscaler').value,
        model: $('model').value || undefined, priority: $('priority').value, ...images,
      };
    }
    const body = {
      prompt: $('prompt').value.trim(),
      model: $('model').value || undefined,
      sampler: $('sampler').value,
      width: number('width'),
      height: number('height'),
      steps: number('steps'),
      guidanceScale: number('guidance'),
      seed: number('seed'),
      numImages: number('num-images'),
      priority: $('priority').value,
      preview: true, // the image forming, shown while it runs
    };
    const negative = $('negative-prompt').value.trim();
    if (negative) body.negativePrompt = negative;
    if (this.mode === 'text2img' && $('hires').checked) {
      body.hires = {
        scale: number('hires-scale'),
        upscaler: $('hires-upscaler').value,
        steps: number('hires-steps'),
        denoisingStrength: number('hires-strength'),
      };
    }
    if (this.mode === 'img2img') body.strength = number('strength');
    if (this.mode === 'inpaint') body.inpaintingStrength = number('inpainting-strength');
    if (this.mode === 'outpaint') {
      delete body.width; // the output is the image plus the padding
      delete body.height;
      for (const side of ['left', 'top', 'right', 'bottom']) body[side] = number(`pad-${side}`);
      body.seam = number('seam');
    }
    if (this.mode === 'style-transfer') {
      body.styleStrength = number('style-strength');
      body.contentStrength = number('content-strength');
      if (!body.prompt) delete body.prompt;
    }
    return { ...body, ...images };
  }

  /** Fill the form from a job's request echo ("reuse these settings"). */
  apply(type, request, seed) {
    this.mode = type;
    const set = (id, value) => {
      if (value !== undefined && value !== null) $(id).value = value;
    };
    set('prompt', request.prompt);
    set('negative-prompt', request.negativePrompt ?? '');
    if (this.models.get(request.model)?.served) $('model').value = request.model;
    set('sampler', request.sampler);
    set('width', request.width);
    set('height', request.height);
    set('steps', request.steps);
    set('guidance', request.guidanceScale);
    set('seed', seed ?? request.seed);
    set('num-images', seed === undefined ? request.numImages : 1);
    set('priority', request.priority);
    set('strength', request.strength);
    set('inpainting-strength', request.inpaintingStrength);
    set('style-strength', request.styleStrength);
    set('content-strength', request.contentStrength);
    for (const side of ['left', 'top', 'right', 'bottom']) set(`pad-${side}`, request[side]);
    set('seam', request.seam);
    set('upscale-scale', request.scale);
    set('upscaler', request.upscaler);
    const hires = request.hires;
    $('hires').checked = Boolean(hires);
    $('hires-options').hidden = !hires;
    if (hires) {
      set('hires-scale', hires.scale ?? (request.width ? hires.width / request.width : undefined));
      set('hires-upscaler', hires.upscaler);
      set('hires-steps', hires.steps);
      set('hires-strength', hires.denoisingStrength);
    }
    for (const range of this.form.querySelectorAll('input[type=range]')) this.#syncOutput(range);
    this.#showModelStatus();
  }

  #showMode() {
    const mode = this.mode;
    for (const section of this.form.querySelectorAll('.mode-only')) {
      section.hidden = !section.dataset.modes.split(' ').includes(mode);
    }
    $('prompt').placeholder = mode === 'style-transfer'
      ? 'Optional for style transfer'
      : 'a small yellow triangle at the top on a black background';
  }

  #syncOutput(range) {
    const output = this.form.querySelector(`output[for="${range.id}"]`);
    if (output) output.value = range.value;
  }

  #applyDefaults() {
    const d = this.models.get($('model').value)?.defaults;
    if (!d) return;
    $('width').value = d.width;
    $('height').value = d.height;
    $('steps').value = d.steps;
    $('guidance').value = d.guidanceScale;
    $('sampler').value = d.sampler;
  }

  #showModelStatus() {
    const m = this.models.get($('model').value);
    const status = $('model-status');
    status.classList.remove('warm', 'cold');
    $('model-description').textContent = m?.description ?? '';
    if (!m) {
      status.textContent = 'No model is served.';
      return;
    }
    const warm = m.replicas > 0;
    status.classList.add(warm ? 'warm' : 'cold');
    status.textContent = warm
      ? `Warm: ${m.replicas} replica${m.replicas === 1 ? '' : 's'} ready`
      : 'Cold start: no replica is running; the first job starts one';
  }
}

function number(id) {
  const el = $(id);
  return el.value === '' ? undefined : Number(el.value);
}

function modelLabel(m) {
  const state = !m.served ? 'not available' : m.replicas > 0 ? 'warm' : 'cold start';
  const kind = m.type && m.type !== 'base' ? `, ${m.type}` : '';
  return `${m.name} (${state}${kind})`;
}
