"""Training the embedded `tiny-sd` family from scratch, on the CPU, on a procedural world.

The shapes world (`world`): one filled circle, square or triangle on a flat background, in
8 colours, at 5 positions and 3 sizes, captioned in varied plain English. The models
trained on it (`python -m serve_app.training --out DIR`, see `__main__`) are tiny SD 1.x
pipelines with the real architecture and code path (CLIP tokenizer + CLIPTextModel,
UNet2DConditionModel, AutoencoderKL, a diffusers scheduler), small enough to train on 2
CPU cores and to draw a 64x64 picture in a fraction of a second:

- `tokenizer`: a CLIP BPE tokenizer whose merges make every vocabulary word one token;
- `vae`: stage 1, the AutoencoderKL (f=4: 64x64x3 <-> 16x16x4);
- `denoiser`: stage 2, text encoder + UNet (v-prediction, zero terminal SNR, EMA), then
  continued by `layout` (the noisiest steps only: where positions are decided), `settle`
  (every step again) and `polish` (the last steps, where the picture wins over the words);
- `contrast`: the model continued on each scene drawn as circle, square and triangle with
  the same noise and caption words, the triplet's differences in the loss (shape words);
- `corners`: then the middle and last steps only, the loss weighted where the three shapes
  differ (a square's corners, a triangle's sides);
- `decoder`: the VAE's decoder fine-tuned on the denoiser's own latents (the encoder, so
  the latent space, stays as it is);
- `inpaint`, `lora`, `controlnet`: stages 3-5, the trained companions (9-channel
  inpainting UNet, an "outline" style LoRA, a canny ControlNet);
- `judge` (numpy + Pillow only): pixel analysis of a picture, the measure of quality;
- `evaluate`, `checks`: the quality grid and the companions' checks (`bench/quality.py`).

Modules that import torch: all but `world` and `judge`, which the service's tests import
where torch must not load.
"""
