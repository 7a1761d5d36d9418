"""Benchmarks, one subcommand each: ``python -m benchmarks [loader|launch|train|sync|inference|materialize|inputs|shipping|elastic|all]``.

Run from the repository root. ``all`` runs every benchmark with its defaults. Add a benchmark:
a module with ``add_xxx(subparsers)`` that registers a subcommand with ``func=...``, listed in
BENCHMARKS below.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.elastic import add_elastic
from benchmarks.inference import add_inference
from benchmarks.inputs import add_inputs
from benchmarks.launch import add_launch
from benchmarks.loader import add_loader
from benchmarks.materialize import add_materialize
from benchmarks.shipping import add_shipping
from benchmarks.sync import add_sync
from benchmarks.train import add_train

BENCHMARKS = [
    add_loader,
    add_launch,
    add_train,
    add_sync,
    add_inference,
    add_materialize,
    add_inputs,
    add_shipping,
    add_elastic,
]
ALL = (
    "loader",
    "launch",
    "train",
    "sync",
    "inference",
    "materialize",
    "inputs",
    "shipping",
    "elastic",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BENCHMARKS:
        add(sub)
    sub.add_parser("all", help="run every benchmark with its defaults")
    args = parser.parse_args(argv)
    if args.command == "all":
        failed = []
        for name in (n for n in ALL if n in sub.choices):
            try:
                main([name])
            except Exception as exc:  # one broken benchmark does not hide the others' numbers
                print(f"benchmark {name} failed: {type(exc).__name__}: {exc}", flush=True)
                failed.append(name)
        if failed:
            sys.exit(f"failed benchmarks: {', '.join(failed)}")
        return
    args.func(args)


if __name__ == "__main__":
    main()
