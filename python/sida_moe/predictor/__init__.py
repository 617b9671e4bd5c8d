"""SiDA's data-aware predictor: routing traces, the hash-function network, truncated-KD training,
the prefetcher and hash routing."""

from sida_moe.predictor.graphed import GraphedDecoder
from sida_moe.predictor.hash_routing import HashRouting
from sida_moe.predictor.lookahead import LookaheadConfig, evaluate_lookahead, train_lookahead
from sida_moe.predictor.model import HashPredictor, PredictorConfig, PredictorState, has_predictor
from sida_moe.predictor.prefetcher import SidaPrefetcher, load_prefetcher
from sida_moe.predictor.sparsemax import sparsemax
from sida_moe.predictor.traces import RoutingRecorder, Traces, find_moe_layers, load_traces, record_traces
from sida_moe.predictor.train import TrainConfig, evaluate, fit_gate_weights, fit_weight_temperature, train_predictor

__all__ = [
    "GraphedDecoder",
    "HashPredictor",
    "HashRouting",
    "LookaheadConfig",
    "PredictorConfig",
    "PredictorState",
    "RoutingRecorder",
    "SidaPrefetcher",
    "TrainConfig",
    "Traces",
    "evaluate",
    "evaluate_lookahead",
    "find_moe_layers",
    "fit_gate_weights",
    "fit_weight_temperature",
    "has_predictor",
    "load_prefetcher",
    "load_traces",
    "record_traces",
    "sparsemax",
    "train_lookahead",
    "train_predictor",
]
