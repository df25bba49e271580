"""The seed API's routes, by resource: `generation` (POST /generate/...), `jobs`
(/jobs...), `service` (queue, models, metrics, health); `serve_app.api.app` puts them
together with the playground and the compatible dialects."""
