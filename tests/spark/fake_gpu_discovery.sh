#!/usr/bin/env bash
# Fake Spark GPU discovery for tests: claims two GPUs, addresses "0" and "1" (no CUDA involved).
echo '{"name": "gpu", "addresses": ["0", "1"]}'
