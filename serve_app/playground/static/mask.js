// The inpainting mask, painted with a brush on a canvas laid over the uploaded image. The
// canvas has the image's own pixel size (so the mask matches it exactly) and is scaled by
// CSS; strokes are drawn in a tint and exported as white (repaint) on black (keep).

const TINT = 'rgb(255, 56, 96)';

export class MaskPainter {
  constructor(canvas, { brushSize, eraser, clear }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d', { willReadFrequently: true });
    this.brushSize = brushSize;
    this.eraser = eraser;
    this.last = null;
    clear.addEventListener('click', () => this.clear());
    canvas.addEventListener('pointerdown', (e) => this.#down(e));
    canvas.addEventListener('pointermove', (e) => this.#move(e));
    for (const type of ['pointerup', 'pointercancel', 'lostpointercapture']) {
      canvas.addEventListener(type, () => { this.last = null; });
    }
  }

  /** Size the canvas to a loaded image and clear the mask. */
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  /** Whether any pixel would be repainted. */
  isEmpty() {
    const { data } = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return false;
    return true;
  }

  /** The mask as a PNG data URI: white where painted, black elsewhere. */
  toDataURL() {
    const { width, height } = this.canvas;
    const painted = this.ctx.getImageData(0, 0, width, height);
    const out = new ImageData(width, height);
    for (let i = 0; i < painted.data.length; i += 4) {
      const v = painted.data[i + 3]; // coverage, anti-aliased edges included
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    const exported = document.createElement('canvas');
    exported.width = width;
    exported.height = height;
    exported.getContext('2d').putImageData(out, 0, 0);
    return exported.toDataURL('image/png');
  }

  #point(e) {
    const rect = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / rect.width;
    return { x: (e.clientX - rect.left) * scale, y: (e.clientY - rect.top) * scale, scale };
  }

  #down(e) {
    if (e.button !== 0 || !this.canvas.width) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.#point(e);
    this.#stroke(this.last, this.last);
  }

  #move(e) {
    if (!this.last) return;
    const p = this.#point(e);
    this.#stroke(this.last, p);
    this.last = p;
  }

  #stroke(a, b) {
    const ctx = this.ctx;
    ctx.globalCompositeOperation = this.eraser.checked ? 'destination-out' : 'source-over';
    ctx.strokeStyle = TINT;
    ctx.lineWidth = Number(this.brushSize.value) * b.scale; // the slider is in screen pixels
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + 0.01, b.y); // a zero-length line draws nothing: nudge it into a dot
    ctx.stroke();
  }
}
