"""SiDA's data-aware predictor as served: the hash-function network, its graphed decode step, the
prefetcher that hands its predictions to the cache, and hash routing. Training it (routing
traces, truncated-KD training, lookahead heads) is ``sida_moe.train``."""

from sida_moe.predictor.graphed import GraphedDecoder
from sida_moe.predictor.hash_routing import HashRouting
from sida_moe.predictor.model import HashPredictor, PredictorState, has_predictor
from sida_moe.predictor.config import PredictorConfig
from sida_moe.predictor.prefetcher import SidaPrefetcher, load_prefetcher
from sida_moe.predictor.sparsemax import sparsemax

__all__ = [
    "GraphedDecoder",
    "HashPredictor",
    "HashRouting",
    "PredictorConfig",
    "PredictorState",
    "SidaPrefetcher",
    "has_predictor",
    "load_prefetcher",
    "sparsemax",
]
