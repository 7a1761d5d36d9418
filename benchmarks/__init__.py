"""sparkdl's benchmarks, one module per benchmark; run ``python -m benchmarks --help`` from the
repository root. Results go to BENCHMARKS.md and BENCHMARKS.json there (see ``common``)."""
