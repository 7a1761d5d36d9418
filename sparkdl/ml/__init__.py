"""[driver] Spark ML face of sparkdl: TorchEstimator, TorchModel, batched inference."""

from sparkdl.ml.estimator import TorchEstimator, TorchModel

__all__ = ["TorchEstimator", "TorchModel"]
