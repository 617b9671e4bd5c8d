"""Training batches drawn from routing traces (``TraceBatches``), with the helpers that turn a trace's
sparse router logits into dense ones and pair a token's inputs with a later token's routing."""

from __future__ import annotations

import torch

from sida_moe.train.trace_loading import Traces


def shifted_targets(batch: tuple[torch.Tensor, ...], shift: int) -> tuple[torch.Tensor, ...]:
    """``(embeds [B, S, d], topk_ids, logit_ids, logit_vals [L, B, S, .])`` with token t's inputs
    paired with token t+shift's routing (``[B, S - shift, d]`` and ``[L, B, S - shift, .]``)."""
    if not shift:
        return batch
    embeds, *targets = batch
    return (embeds[:, :-shift], *(t[:, :, shift:] for t in targets))


def dense_logits(ids: torch.Tensor, vals: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[..., E]`` logits from a trace's top T (``ids`` / ``vals [..., T]``); the experts it does not
    keep get the token's smallest kept logit minus 30, so they rank last and weigh nothing."""
    fill = vals.min(dim=-1, keepdim=True).values - 30.0
    return fill.expand(*vals.shape[:-1], num_experts).clone().scatter_(-1, ids, vals)


class TraceBatches:
    """Batches of a trace on the training device. On a GPU the trace is moved there once, in compact
    dtypes (int16 ids, fp16 logits; only the ``top_t`` logits the loss reads), when it takes at most
    half the free memory: each step then gathers on the GPU instead of gathering a batch on the host
    and copying it through pageable memory, which can take longer than the step itself."""

    def __init__(self, traces: Traces, device: torch.device, top_t: int, resident: bool | None = None) -> None:
        self.device = device
        t = min(top_t, traces.logit_ids.shape[-1])
        self.traces = traces
        self.t = t
        if resident is None:
            resident = device.type == "cuda" and self._device_bytes(traces, t) <= 0.5 * torch.cuda.mem_get_info(device)[0]
        self.resident = resident
        if resident:
            compact = torch.int16 if traces.manifest["num_experts"] <= torch.iinfo(torch.int16).max else torch.int32
            self.input_ids = traces.input_ids.to(device, torch.int64)
            self.embeddings = traces.embeddings.to(device)
            self.topk_ids = traces.topk_ids.to(device, compact)
            self.logit_ids = traces.logit_ids[..., :t].to(device, compact)
            self.logit_vals = traces.logit_vals[..., :t].to(device, torch.float16)
            if traces.gate_ids is not None:
                self.gate_ids = traces.gate_ids.to(device, compact)
                self.gate_vals = traces.gate_vals.to(device, torch.float16)

    def gate(self, rows: torch.Tensor) -> torch.Tensor:
        """``[L-1, B, S, E]`` next-layer gate logits of layers 1.. for ``rows`` (the trace keeps the
        top T; the rest get the token's smallest kept logit minus 30: ranked last)."""
        tr = self.traces
        if tr.gate_ids is None:
            raise ValueError("the trace has no next-layer gate (record it with next_layer_gate=True)")
        if self.resident:
            rows = rows.to(self.device)
            ids, vals = self.gate_ids[:, rows].long(), self.gate_vals[:, rows].float()
        else:
            ids, vals = tr.gate_ids[:, rows].to(self.device).long(), tr.gate_vals[:, rows].to(self.device).float()
        return dense_logits(ids, vals, tr.manifest["num_experts"])

    @staticmethod
    def _device_bytes(traces: Traces, t: int) -> int:
        per_token_layer = traces.topk_ids.shape[-1] * 2 + t * 2 + t * 2
        if traces.gate_ids is not None:
            per_token_layer += traces.gate_ids.shape[-1] * 4
        return (traces.topk_ids.shape[0] * traces.input_ids.numel() * per_token_layer
                + traces.input_ids.numel() * 8 + traces.embeddings.numel() * traces.embeddings.element_size())

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``embeds [B, S, d]`` float32, ``topk_ids [L, B, S, k]`` and ``logit_ids [L, B, S, t]`` int64,
        ``logit_vals [L, B, S, t]`` float32, for trace sequences ``rows``."""
        if not self.resident:
            tr, dev = self.traces, self.device
            return (
                tr.embeddings[tr.input_ids[rows].long()].to(device=dev, dtype=torch.float32),
                tr.topk_ids[:, rows].to(dev).long(),  # widened here: the trace may be compact
                tr.logit_ids[:, rows, :, : self.t].to(dev).long(),
                tr.logit_vals[:, rows, :, : self.t].to(dev).float(),
            )
        rows = rows.to(self.device)
        return (
            self.embeddings[self.input_ids[rows]].float(),
            self.topk_ids[:, rows].long(),
            self.logit_ids[:, rows].long(),
            self.logit_vals[:, rows].float(),
        )


__all__ = ["TraceBatches", "dense_logits", "shifted_targets"]
