"""The APIs other tools already speak, as thin adapters over our jobs: the OpenAI Images
API (`/v1/...`, `openai`) and the AUTOMATIC1111 WebUI API (`/sdapi/v1/...`, `a1111`).

Each translates its dialect's request into our own generate request body and submits it
through the same validation and tracker as `POST /generate/...` (`jobs`), waits for the
job, and answers as its clients expect, errors included (`dialects`). docs/compat.md has
the field tables. This package module imports nothing, so the guard and the error
handlers can use `dialects` without loading the routes.
"""
