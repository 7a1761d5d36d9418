"""[any] Everything a run leaves on storage: its layout, the model directory, checkpoints."""

from sparkdl.rundir.layout import RunLayout

__all__ = ["RunLayout"]
