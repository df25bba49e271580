// A finished job's images with their seeds and parameters, a download link and
// "reuse these settings" for each.

const EXTENSIONS = { 'image/png': 'png', 'image/jpeg': 'jpg', 'image/webp': 'webp' };

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** Render `job` (a completed record, with images) into `root`. */
export function renderResults(root, job, { onReuse }) {
  const { images, seeds, parameters: p, timeTaken, contentType } = job.result;
  const ext = EXTENSIONS[contentType] ?? 'png';
  const summary = [
    `${p.width}×${p.height}`, `${p.steps} steps`, p.sampler, `guidance ${p.guidanceScale}`,
    p.model, `${(timeTaken / 1000).toFixed(2)} s`,
  ].filter(Boolean).join(' · ');
  const figures = images.map((src, i) => el('figure', { class: 'result' },
    el('img', { src, alt: `Generated image ${i + 1} (seed ${seeds[i]})`,
      width: p.width, height: p.height }),
    el('figcaption', {},
      el('strong', {}, `Seed ${seeds[i]}`),
      el('span', { class: 'hint' }, summary),
      el('div', { class: 'actions' },
        el('a', { class: 'button secondary', href: src, download: `${job.id}_${i}.${ext}` },
          'Download'),
        el('button', { type: 'button', class: 'secondary',
          onclick: () => onReuse(job, seeds[i]) }, 'Reuse these settings')))));
  const prompt = p.prompt ? el('p', { class: 'prompt' }, `“${p.prompt}”`) : null;
  root.replaceChildren(...[prompt, ...figures].filter(Boolean));
}

/** While `job` runs: its latest latent preview (`preview: true`), drawn at the image's size. */
export function renderForming(root, job) {
  const { step, image } = job.preview;
  const shown = root.querySelector('img.forming');
  if (shown && shown.dataset.step === String(step)) return;
  root.replaceChildren(el('figure', { class: 'result' },
    el('img', { class: 'forming', src: image, 'data-step': step,
      alt: `The image forming (step ${step})`,
      width: job.request.width, height: job.request.height }),
    el('figcaption', { class: 'hint' },
      `Step ${step} of ${job.request.steps}: a quick preview from the latents`)));
}

export function renderMessage(root, text) {
  root.replaceChildren(el('p', { class: 'hint' }, text));
}
