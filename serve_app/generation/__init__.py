"""Image generation: the only package that imports torch, diffusers or transformers.

Model replicas import it; the ingress and the job tracker never do (house point 1). What
leaves this package is plain data: `GenerationResult` with encoded image bytes.

Modules: `tiny` (the embedded seeded models), `samplers` (sampler name -> scheduler),
`images` (encode/decode bytes), `pipelines` (loading and runtime knobs), `batching` (batch
invariance of seeds), `style` (IP-Adapter / AdaIN style transfer), `runner` (`ModelRunner`,
one pipeline call per task) and `worker` (`ModelWorker`, the asyncio bridge a Ray Serve
replica delegates to). `images` and `worker` import no torch, so a replica shell can import
them at module level.
"""
