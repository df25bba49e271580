"""Benchmarks of the image-generation service: `.venv/bin/python -m bench.run`.

One module per figure (`submit`, `e2e`, `batching`, `coldstart`, `scale`), each exposing
`run(ctx) -> dict`; `run` composes them, `gpu` is a standalone GPU throughput script that
needs torch but not Ray. See bench/README.md. pytest never collects this package (it is
outside `testpaths`); `tests/unit/test_bench.py` smoke-tests it.
"""
