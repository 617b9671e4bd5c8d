"""Per-token timing of ``model.generate``: time to first token, per-token latencies, tokens/s."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def _sync(device: torch.device | None) -> None:
    # The current (compute) stream only, as a generation loop that reads its tokens waits for it.
    # A device-wide sync would also wait for work that serves later tokens on other streams --
    # prefetch copies, the run-ahead predictor's launches -- and put it on every token's time
    # (it charged that work to every token; NOTES.md).
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class TokenTimer:
    """A ``generate`` streamer that stamps the time each new token is produced.

    ``generate`` calls ``put`` once with the prompt, then once per generated step. The current
    stream is synchronized before each stamp so the times are those of the token's finished work,
    not of launches (work on other streams -- prefetch copies, the predictor -- is not waited for).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.start = 0.0
        self.stamps: list[float] = []
        self._saw_prompt = False

    def begin(self) -> None:
        _sync(self.device)
        self.stamps.clear()
        self._saw_prompt = False
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:  # the first put is the prompt itself
            self._saw_prompt = True
            return
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def result(self, batch_size: int, prompt_tokens: int) -> GenerationTiming:
        if not self.stamps:
            raise RuntimeError("no token was generated: was the streamer passed to generate()?")
        ttft = self.stamps[0] - self.start
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return GenerationTiming(
            batch_size=batch_size,
            prompt_tokens=prompt_tokens,
            new_tokens=len(self.stamps),
            ttft_s=ttft,
            token_latencies_s=gaps,
        )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for an empty list."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class GenerationTiming:
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    token_latencies_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the decode steps (after the first token), whole batch."""
        total = sum(self.token_latencies_s)
        return self.batch_size * len(self.token_latencies_s) / total if total > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_ms": 1e3 * self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "p50_token_ms": 1e3 * percentile(self.token_latencies_s, 50),
            "p99_token_ms": 1e3 * percentile(self.token_latencies_s, 99),
        }
