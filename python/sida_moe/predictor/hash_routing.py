"""Hash routing (SiDA's fast, lossy mode): the predictor's experts replace the router's choice.

Applied to a plain transformers model with hooks: the input-embedding output (the layer-0 input)
runs the predictor once per forward, and each MoE block's experts module then receives the
predicted top-k ids instead of the router's. Weights of the chosen experts come from
- ``weights="predicted"``: the predictor's softmax (no router needed at all, the paper's mode), at
  the per-layer temperature fitted after training (``HashPredictor.weight_logits``), or
- ``weights="router"``: the router's softmax at the predicted experts (the router is one small
  matmul; only the choice of experts is taken from the predictor).
Both renormalise over the chosen experts when the model does (``norm_topk_prob``).

Used for fidelity measurements (held-out loss vs exact mode); the offload engine's Prefetcher
``route`` hook applies the same ``hash_route`` function.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sida_moe.adapters import MoELayer, decoder_moe_layers
from sida_moe.predictor.model import HashPredictor, PredictorState

WeightSource = Literal["predicted", "router"]


def hash_route(
    predicted_logits: torch.Tensor,
    top_k: int,
    normalize: bool,
    router_logits: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids ``[T, k]`` from ``predicted_logits`` ``[T, E]`` and their weights ``[T, k]``.

    Weights are the softmax of ``router_logits`` (when given) else of ``predicted_logits``, at the
    chosen ids, renormalised to sum to 1 when ``normalize``.
    """
    if predicted_logits.dim() != 2:
        raise ValueError(f"predicted_logits must be [tokens, experts], got {tuple(predicted_logits.shape)}")
    if not 0 < top_k <= predicted_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {predicted_logits.shape[-1]}], got {top_k}")
    ids = predicted_logits.topk(top_k, dim=-1).indices
    source = predicted_logits if router_logits is None else router_logits.reshape(predicted_logits.shape)
    probs = torch.softmax(source.float(), dim=-1).gather(-1, ids)
    if normalize:
        probs = probs / probs.sum(-1, keepdim=True)
    return ids, probs.to(dtype or source.dtype)


def router_normalizes(router: nn.Module, config: object = None) -> bool:
    """Whether a router renormalises its top-k weights to sum to 1: the router's (or the config's)
    ``norm_topk_prob``; routers without the switch (Mixtral) always do."""
    for owner in (router, config):
        value = getattr(owner, "norm_topk_prob", None)
        if value is not None:
            return bool(value)
    return True


class HashRouting:
    """Context manager: while active, ``model``'s MoE layers use the predictor's experts.

    ``stateful=True`` keeps the predictor's causal state across forwards (KV-cached generation);
    call ``reset()`` before a new sequence. With ``stateful=False`` every forward is a fresh
    sequence (full-sequence evaluation).
    """

    def __init__(
        self,
        model: nn.Module,
        predictor: HashPredictor,
        weights: WeightSource = "predicted",
        stateful: bool = False,
        layers: list[MoELayer] | None = None,
    ) -> None:
        if weights not in ("predicted", "router"):
            raise ValueError(f"weights must be 'predicted' or 'router', got {weights!r}")
        predictor.config.require_own_routing("hash routing")
        self.model = model
        self.predictor = predictor
        self.weights = weights
        self.stateful = stateful
        self.layers = layers if layers is not None else decoder_moe_layers(model)
        if any(l.adapter.routing_kind != "topk" for l in self.layers):
            # the hook rewrites the experts module's (ids, weights) arguments; a one-hot dispatch mask is not those
            raise NotImplementedError("hash routing needs experts modules that receive top-k ids and weights")
        if len(self.layers) != predictor.config.num_moe_layers:
            raise ValueError(
                f"the predictor covers {predictor.config.num_moe_layers} MoE layers, the model has {len(self.layers)}"
            )
        if any(l.num_experts != predictor.config.num_experts for l in self.layers):
            raise ValueError("the predictor's number of experts differs from the model's")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.normalize = [router_normalizes(layer.router, config) for layer in self.layers]
        self._logits: torch.Tensor | None = None  # [L, T, E] for the current forward
        self._router_logits: dict[int, torch.Tensor] = {}
        self._state: PredictorState | None = None
        self._attention_mask: torch.Tensor | None = None
        self._handles: list = []

    def reset(self) -> None:
        self._state = None

    def __enter__(self) -> HashRouting:
        emb = self.model.get_input_embeddings()
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(emb.register_forward_hook(self._on_embeddings))
        for i, layer in enumerate(self.layers):
            if self.weights == "router":
                self._handles.append(layer.router.register_forward_hook(self._on_router(i)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._on_experts(i, layer), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._logits = None
        self._router_logits.clear()

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._attention_mask = kwargs.get("attention_mask")

    def _on_embeddings(self, module: nn.Module, args: tuple, embeds: torch.Tensor) -> None:
        p = self.predictor
        with torch.no_grad():
            x = embeds.to(p.compress.weight.device)
            if x.dim() == 2:
                x = x.unsqueeze(0)
            mask = self._attention_mask
            # the prompt's padding is masked out of the predictor's attention (as the prefetcher does)
            mask = mask[..., -x.shape[1]:].to(x.device) if mask is not None and mask.dim() == 2 and x.shape[1] > 1 else None
            logits, state = p(x, self._state if self.stateful else None, mask)
        if self.stateful:
            self._state = state
        self._logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])

    def _on_router(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            self._router_logits[i] = logits.detach().reshape(-1, logits.shape[-1])

        return hook

    def _on_experts(self, i: int, layer: MoELayer):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._logits is None:
                raise RuntimeError("hash routing: MoE layer ran before the input embeddings were seen")
            hidden = args[0]
            ids, weights = layer.adapter.read_routing(args[1], args[2])
            router_logits = self._router_logits.pop(i, None) if self.weights == "router" else None
            pred = self._logits[i].to(ids.device)
            if pred.shape[0] != ids.shape[0]:
                raise RuntimeError(
                    f"hash routing: predictor gave {pred.shape[0]} tokens, MoE layer {i} has {ids.shape[0]}"
                )
            if router_logits is None:
                pred = self.predictor.weight_logits(pred, i)
            new_ids, new_w = hash_route(pred, ids.shape[-1], self.normalize[i], router_logits, dtype=weights.dtype)
            return (hidden, new_ids.to(ids.dtype), new_w, *args[3:]), kwargs

        return hook


__all__ = ["HashRouting", "WeightSource", "hash_route", "router_normalizes"]
