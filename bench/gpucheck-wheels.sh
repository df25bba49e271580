#!/usr/bin/env bash
# The wheels the GPU check needs on a GPU machine that has torch, transformers, accelerate,
# peft, safetensors, numpy, pillow, psutil, pyyaml and huggingface-hub (1.x, which
# diffusers 0.42 accepts) but not these (the device tool's
# machines: Python 3.12, x86-64). Run here, in the project root; the device command then
# installs them (bench/README.md, "The GPU check"). About 25 MB. Ray is not among them:
# its wheel alone is over the 64 MiB a device call may carry, so the check's Serve case
# reports itself skipped there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 obstore==0.12.1
ls -la .whl
