"""SiDA's data-aware predictor: routing traces, the hash-function network, truncated-KD training,
the run-ahead prefetcher and hash routing."""

from sida_moe.predictor.model import HashPredictor, PredictorConfig, PredictorState, has_predictor
from sida_moe.predictor.sparsemax import sparsemax
from sida_moe.predictor.traces import RoutingRecorder, Traces, find_moe_layers, load_traces, record_traces
from sida_moe.predictor.train import TrainConfig, evaluate, train_predictor

__all__ = [
    "HashPredictor",
    "PredictorConfig",
    "PredictorState",
    "RoutingRecorder",
    "TrainConfig",
    "Traces",
    "evaluate",
    "find_moe_layers",
    "has_predictor",
    "load_traces",
    "record_traces",
    "sparsemax",
    "train_predictor",
]
