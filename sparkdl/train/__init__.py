"""[worker] The training loop and what it writes: checkpoints, metrics, the model."""

__all__: list[str] = []
