"""[driver] Spark ML face of sparkdl: TorchEstimator, TorchModel, batched inference."""

from sparkdl.ml.estimator import TorchEstimator
from sparkdl.ml.model import TorchModel
from sparkdl.ml.persistence import trust_pickle

__all__ = ["TorchEstimator", "TorchModel", "trust_pickle"]
