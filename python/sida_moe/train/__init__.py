"""Training SiDA's predictor (research and offline work, not imported when serving): routing
traces recorded from a model (``traces``), truncated knowledge distillation of the hash-function
network (``predictor_training``, with its batches and its ``evaluation``), lookahead heads (``lookahead``), a trace-driven cache simulation
(``cachesim``) and the ``sida-moe`` training commands (``cli``)."""

from typing import TYPE_CHECKING

from sida_moe._lazy import lazy_exports

_HOME = {
    **dict.fromkeys(["LookaheadConfig", "TrainConfig"], "sida_moe.train.configs"),
    **dict.fromkeys(["evaluate_lookahead", "train_lookahead"], "sida_moe.train.lookahead"),
    **dict.fromkeys(["evaluate", "fit_gate_weights", "fit_weight_temperature"], "sida_moe.train.evaluation"),
    "train_predictor": "sida_moe.train.predictor_training",
    **dict.fromkeys(["RoutingRecorder", "record_traces"], "sida_moe.train.traces"),
    **dict.fromkeys(["Traces", "load_traces"], "sida_moe.train.trace_loading"),
}
__getattr__, __dir__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:
    from sida_moe.train.configs import LookaheadConfig, TrainConfig
    from sida_moe.train.evaluation import evaluate, fit_gate_weights, fit_weight_temperature
    from sida_moe.train.lookahead import evaluate_lookahead, train_lookahead
    from sida_moe.train.predictor_training import train_predictor
    from sida_moe.train.trace_loading import Traces, load_traces
    from sida_moe.train.traces import RoutingRecorder, record_traces

__all__ = [
    "LookaheadConfig",
    "RoutingRecorder",
    "TrainConfig",
    "Traces",
    "evaluate",
    "evaluate_lookahead",
    "fit_gate_weights",
    "fit_weight_temperature",
    "load_traces",
    "record_traces",
    "train_lookahead",
    "train_predictor",
]
