"""The greedy loop's next-token prediction, run beside the next decode step.

A replayed decode step ends with the token it chose, and the predictor's step on that token names
the next step's experts. Recorded inside the decode step's graph, the predictor's step (dozens of
small kernels) would run after every token's last kernel, adding its whole time to each token.
Instead the decode step only stages the predictor's input (the token's embeddings), and the
predictor's step is a graph of its own, launched on a side stream after each replay, so it runs
while the next decode step does (at small batches neither fills the GPU).

Per replay t, all launched by the host without waiting::

    compute stream: decode step t (stages the input) --> [waits: copied] decode step t+1 (stages) ...
    side stream:    [waits: step t] staged -> decoder input (copied) --> predictor step --> ids to the host

The next decode step waits only for the copy of the staged input, which it overwrites at its end.
With hash routing, where decode step t+1 routes by this prediction, it waits for the whole
predictor step instead.
"""

from __future__ import annotations

import torch

from sida_moe.predictor.graphed import GraphedDecoder


class SideStep:
    """Launches ``decoder``'s step (``compiled``: its compiled step) on a side stream after each
    replay of a captured decode step that staged its input here (:meth:`stage`); that decode
    step's owner keeps this object as long as its graph, which writes into its buffer.
    ``wait_for_prediction``: the compute stream waits for the prediction itself (a decode step
    that reads it), not only for its input to be copied. CUDA only."""

    def __init__(self, decoder: GraphedDecoder, compiled: bool, wait_for_prediction: bool) -> None:
        if decoder.device.type != "cuda":
            raise ValueError(f"a side step needs a CUDA decoder, this one is on {decoder.device}")
        self.decoder = decoder
        self.wait_for_prediction = bool(wait_for_prediction)
        with torch.inference_mode():
            self._embeds = torch.zeros(decoder.batch, 1, decoder.predictor.config.input_dim, device=decoder.device,
                                       dtype=decoder.dtype)
        self.stream = torch.cuda.Stream(decoder.device)
        self._ready = torch.cuda.Event()  # what the compute stream waits for before its next step
        self._launched = False  # since the last join
        self.compiled = bool(compiled)

    def stage(self, embeds: torch.Tensor) -> None:
        """Inside the capture of a decode step: copy the predictor's input for the next token
        (``embeds [B, 1, H]``) into the staging buffer."""
        with torch.inference_mode():
            self._embeds.copy_(embeds)

    def capture(self) -> None:
        """Capture the predictor's step of this kind (after the decode step's capture, while
        nothing else runs on the device)."""
        self.decoder.capture(self.compiled)

    def launch(self) -> torch.cuda.Stream:
        """After a replay of the decode step on the current stream: the predictor's step on the
        side stream, and the current stream's wait (see the module docstring). Returns the side
        stream, on which the prediction's outputs are written."""
        compute = torch.cuda.current_stream(self.decoder.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream), torch.inference_mode():
            self.decoder.set_inputs(self._embeds)
            if not self.wait_for_prediction:
                self._ready.record()
            self.decoder.replay(self.compiled)
            if self.wait_for_prediction:
                self._ready.record()
        compute.wait_event(self._ready)
        self._launched = True
        return self.stream

    def join(self) -> None:
        """Make the current stream wait for every step launched so far (before it writes the
        decoder's buffers itself: a new sequence's load, an eager step); nothing if none was."""
        if self._launched:
            torch.cuda.current_stream(self.decoder.device).wait_stream(self.stream)
            self._launched = False


__all__ = ["SideStep"]
