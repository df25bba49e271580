"""imagegen: the client side of the image-generation service.

`imagegen.client` (Client, AsyncClient) speaks its HTTP API; `imagegen.cli` is the
`imagegen` command on top of it. Nothing here imports Ray, torch or diffusers: the server
commands (`imagegen serve`, `imagegen build-tiny-models`) load `serve_app` only when run.
"""
