// Image inputs: a file field that also takes a dropped file, read as a data URI (the API's
// image format), with a preview.

export function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('The file is not an image this browser can read'));
    img.src = src;
  });
}

/** One image field. `onImage(dataUri, img)` runs after each new file. */
export class ImageInput {
  constructor(input, { onImage, onError }) {
    this.input = input;
    this.dataUri = null;
    this.preview = document.getElementById(`${input.id}-preview`);
    input.addEventListener('change', () => this.#take(input.files[0]));
    const zone = input.closest('.drop');
    zone.addEventListener('dragover', (e) => {
      e.preventDefault();
      zone.classList.add('over');
    });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', (e) => {
      e.preventDefault();
      zone.classList.remove('over');
      const file = e.dataTransfer.files[0];
      if (!file) return;
      input.files = e.dataTransfer.files; // so the field shows the dropped file's name
      this.#take(file);
    });
    this.onImage = onImage;
    this.onError = onError;
  }

  async #take(file) {
    if (!file) return;
    try {
      const uri = await readAsDataURL(file);
      const img = await loadImage(uri);
      this.dataUri = uri;
      if (this.preview) {
        this.preview.src = uri;
        this.preview.hidden = false;
      }
      this.onImage?.(uri, img);
    } catch (err) {
      this.onError(`${file.name}: ${err.message}`);
    }
  }
}
