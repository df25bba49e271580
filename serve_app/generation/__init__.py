"""Image generation: the only package that imports torch, diffusers or transformers.

Model replicas import it; the ingress and the job tracker never do (house point 1). What
leaves this package is plain data: `GenerationResult` with encoded image bytes.

Modules: `tiny` and `tiny_parts` (the embedded seeded models of each family), `ldm_checkpoint`
(an SD 1.x folder as one original-layout file), `samplers` (sampler name -> scheduler),
`images` (encode/decode bytes), `pipelines` (loading and runtime knobs), `families` (what
differs between SD, SDXL, FLUX and SD 3), `batching` (batch invariance of seeds), `prompts`
(cached prompt embeddings), `style` (IP-Adapter / AdaIN style transfer), `modes` (one
pipeline call per mode), `steps` (progress and interruption), `runner` (`ModelRunner`, a
model's lifecycle, lock and results) and `worker` (`ModelWorker`, the asyncio bridge a Ray
Serve replica delegates to). `images` and `worker` import no torch, so a replica shell can
import them at module level.
"""
