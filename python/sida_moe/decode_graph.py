"""Generation of an offloaded model with each decode step replayed from one CUDA graph.

The decode step of an offloaded model does nothing on the host but launch kernels: its MoE layers
compute through the engine's expert table (slot or pinned pool, no acquire, no sync), and their
routing reaches the cache through one native call after the step. So the whole step -- every
layer, attention over a static KV cache, the next token (greedy or sampled, ``sampling.py``),
the next step's inputs -- is captured once per batch size and replayed; the host's work per
token is one replay and one native call.

``static_generate`` is that loop (``graphs=False`` runs the same steps eagerly: the CPU and the
test oracle). ``sida_moe.generate_route`` sends ``model.generate`` here for the calls it can serve
(greedy or sampled with temperature / top-k / top-p, unpadded or left-padded, no streamer or
processors) and to transformers' own ``generate`` otherwise.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from sida_moe.compiling import recompile_room
from sida_moe.sampling import SamplerState, SamplingParams, next_tokens


class StepKey(NamedTuple):
    """What a captured decode step is specialised for (``model._sida_decode_steps`` keys)."""

    batch: int
    length: int  # static cache length (a power of two; a call may use a longer one)
    compiled: bool  # torch.compile first
    sampled: bool  # sampled tokens (else greedy)
    padded: bool  # left-padded rows: an attention mask and per-row positions


@dataclass
class _Step:
    """A static KV cache and the static inputs and outputs of one decode step, kept per batch size,
    cache length, compilation and token choice: its graph is captured once and replayed by every
    later call."""

    cache: object  # transformers StaticCache
    token: torch.Tensor  # [B, 1] input token of the step; the step writes the next one here
    position: torch.Tensor  # [1] cache position of the step; the step increments it
    tokens: torch.Tensor  # [B, cache length] every step's token
    index: torch.Tensor  # [1] column of `tokens` the step writes; the step increments it
    eos: torch.Tensor  # [V] bool: the call's EOS ids
    finished: torch.Tensor  # [B] bool: the row has produced an EOS token; the step updates it
    min_new: torch.Tensor  # [1] the call's min_new_tokens: EOS ids are masked while index < min_new
    sampler: SamplerState | None = None  # None: greedy steps
    # padded steps: [B, cache length] attention mask (the prompt's, then ones) and [B, 1] pad count
    mask: torch.Tensor | None = None
    pads: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    uncapturable: str | None = None  # why capturing this step failed: its calls run it eagerly
    # engine.take_captured_visits(): the last is what the step stages its prediction's inputs into,
    # kept alive with the step (its graph writes there)
    visits: tuple[list[int], int, object | None] = ([], 0, None)
    # completion of the last REPLAYS_IN_FLIGHT replays (see _replay), created with the graph
    fences: list | None = None
    replays: int = 0


# Replays queued at once. The cache overwrites an evicted slot only after every step queued on
# the reader stream when it pointed that expert back at the pool: with a whole call's replays
# queued up front, no copy into an evicted slot could land before the call ended. Two keep the
# device busy (the next replay is queued while one runs) and let admitted copies land within
# about two steps.
REPLAYS_IN_FLIGHT = 2

# Decode steps kept per model (least recently used dropped first): each holds a static KV cache of
# its batch and length and, on CUDA, a captured graph, so a server seeing many shapes would
# otherwise keep every one's memory.
MAX_KEPT_STEPS = 8

# steps between looks at whether every row has finished (a look copies one flag to the host
# without waiting for it)
FINISHED_CHECK_EVERY = 8


def _cache_length(needed: int) -> int:
    """Static cache lengths come in powers of two (>= 256), so calls of similar lengths share a
    captured step."""
    return max(256, 1 << (needed - 1).bit_length())


def _forward_step(model: nn.Module, step: _Step, forward: nn.Module) -> None:
    """One decode step on the static buffers (what is captured); ``forward`` is ``model`` or its
    compiled form (:func:`_compiled`)."""
    padding = {} if step.mask is None else {"attention_mask": step.mask, "position_ids": step.position - step.pads}
    logits = forward(input_ids=step.token, past_key_values=step.cache, cache_position=step.position, use_cache=True,
                     **padding).logits
    nxt = next_tokens(_min_new_mask(logits[:, -1], step), step.sampler)
    step.finished.logical_or_(_is_eos(nxt, step))
    step.tokens.index_copy_(1, step.index, nxt)
    step.token.copy_(nxt)
    step.position.add_(1)
    step.index.add_(1)
    _predict_ahead(model, nxt, compiled=forward is not model)


def _min_new_mask(logits: torch.Tensor, step: _Step) -> torch.Tensor:
    """``logits [B, V]`` with the EOS ids at -inf while fewer than ``min_new`` tokens have been
    produced (``index``): transformers' ``MinNewTokensLengthLogitsProcessor``, on the device."""
    return logits.masked_fill(step.eos & (step.index < step.min_new), float("-inf"))


def _is_eos(tokens: torch.Tensor, step: _Step) -> torch.Tensor:
    """``[B]``: whether each row's ``[B, 1]`` token is one of the call's EOS ids."""
    return step.eos[tokens[:, 0]]


class _FinishedWatch:
    """Tells the loop, a few steps late and without waiting for the device, that every row has
    produced an EOS token, so a call stops soon after transformers' would (the extra tokens are
    cut by ``_pad_after_eos``)."""

    def __init__(self, step: _Step) -> None:
        self.step = step
        self.cuda = step.finished.device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def all_finished(self, steps_done: int) -> bool:
        if not self.cuda:
            return steps_done % FINISHED_CHECK_EVERY == 0 and bool(self.step.finished.all())
        if self.pending and self.event.query():
            self.pending = False
            if bool(self.host[0]):
                return True
        if not self.pending and steps_done % FINISHED_CHECK_EVERY == 0:
            self.host.copy_(self.step.finished.all().view(1), non_blocking=True)
            self.event.record()
            self.pending = True
        return False


def _predict_ahead(model: nn.Module, token: torch.Tensor, compiled: bool) -> None:
    """The next step's input is known: let the engine's prefetcher predict its experts now
    (``compiled``: in a compiled decode step)."""
    engine = getattr(model, "sida_engine", None)
    if engine is not None:
        # forward() itself: the embedding's hooks mark the start of a model forward
        engine.predict_ahead(model.get_input_embeddings().forward(token), compiled=compiled)


def graphs_supported(model: nn.Module, batch_size: int) -> str | None:
    """Why the decode step of ``model`` at ``batch_size`` cannot be captured, or None if it can."""
    engine = getattr(model, "sida_engine", None)
    device = engine.device if engine is not None else next(model.parameters()).device
    if device.type != "cuda":
        return "CUDA graphs need the model on a CUDA device"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models keep transformers' generate"
    if engine is not None:
        for layer in engine.layers:
            if not engine.uses_table(layer.ordinal, batch_size):
                return (f"MoE layer {layer.ordinal} would acquire slots at batch {batch_size} "
                        f"(prefetcher {engine.prefetcher.name!r} or too many tokens per expert)")
    return None


@torch.inference_mode()
def static_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    graphs: bool | None = None,
    compile: bool = False,
    sampling: SamplingParams | None = None,
    attention_mask: torch.Tensor | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Tokens of ``model`` after ``input_ids``, ``[B, T + n]`` like ``model.generate``: greedy
    (``sampling=None``, as ``do_sample=False``) or drawn with ``sampling``'s temperature, top-k
    and top-p (as ``do_sample=True``; ``sida_moe.sampling`` says how the draws relate to
    transformers'). ``input_ids`` is ``[B, T]``, its rows left-padded where ``attention_mask``
    has zeros (positions then count from each row's first real token, as transformers does).
    Prefill eagerly into a static KV cache, then
    ``max_new_tokens - 1`` decode steps, replayed from a CUDA graph when ``graphs`` (default: on
    CUDA when :func:`graphs_supported`; a step whose capture fails then runs eagerly, with a
    warning, in this call and later ones; ``graphs=True`` raises ValueError instead). Rows that
    produced an EOS token are padded after it, and the result ends once every row has (as
    transformers does; the loop itself stops within ``FINISHED_CHECK_EVERY`` steps of that);
    ``min_new_tokens`` forbids the EOS ids before that many new tokens, as transformers'
    ``min_new_tokens``. Works for any transformers causal LM; on an offloaded one each replay
    also hands the step's routing to its engine.

    ``compile=True`` runs the decode step through ``torch.compile`` (inductor; an offloaded layer
    is one opaque custom op in it), so the dense part of the step -- norms, rotary embeddings,
    attention, the routers -- is fused into fewer kernels before it is captured. The first call
    of each batch size and cache length compiles (tens of seconds for a large model); later
    calls reuse it. Compiled kernels round differently from eager ones (fused reductions), so
    near-tied greedy picks can differ from the eager loop's."""
    engine = getattr(model, "sida_engine", None)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a [batch, tokens] integer tensor with tokens >= 1, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a sida_moe.sampling.SamplingParams or None, got {type(sampling).__name__}")
    padded = left_padding(attention_mask, input_ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    batch, prompt_len = input_ids.shape
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens")
    reason = graphs_supported(model, batch)
    graphs_asked = graphs
    if graphs is None:
        graphs = reason is None
    elif graphs and reason is not None:
        raise ValueError(f"cannot capture the decode step: {reason}")
    device = engine.device if engine is not None else next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    step = _step_for(model, StepKey(batch, prompt_len + max_new_tokens, compile, sampling is not None,
                                    padded is not None), device)
    if graphs and step.uncapturable is not None:
        graphs = _uncaptured(step, graphs_asked)
    if sampling is not None:
        step.sampler.set(sampling)
    forward = _compiled(model) if compile else model
    if engine is not None:
        engine.begin_sequence(batch, step.tokens.shape[1], static_mask=padded is not None)

    # prefill: eager (offloaded models: through the acquire path for long prompts)
    padding = {}
    if padded is not None:
        padded = padded.to(device=device, dtype=torch.long)
        step.mask.fill_(1)
        step.mask[:, :prompt_len] = padded
        step.pads.copy_((1 - padded).sum(dim=1, keepdim=True))
        positions = (padded.cumsum(dim=1) - 1).masked_fill(padded == 0, 0)
        padding = {"attention_mask": step.mask, "position_ids": positions}
    logits = model(input_ids=input_ids, past_key_values=step.cache,
                   cache_position=torch.arange(prompt_len, device=device), use_cache=True, **padding).logits
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = [e for e in eos_ids if 0 <= e < step.eos.shape[0]]  # an id past the vocabulary is never produced
    step.eos.zero_()
    if eos_ids:
        step.eos[torch.tensor(eos_ids, dtype=torch.long)] = True
    step.min_new.fill_(min_new_tokens)
    step.index.zero_()  # no new token yet
    first = next_tokens(_min_new_mask(logits[:, -1], step), step.sampler)
    step.finished.copy_(_is_eos(first, step))
    step.token.copy_(first)
    step.tokens[:, :1] = first
    step.position.fill_(prompt_len)
    step.index.fill_(1)
    produced = 1
    if produced < max_new_tokens:
        _predict_ahead(model, first, compiled=compile)
    if produced < max_new_tokens and graphs and step.graph is None:
        # one uncaptured step first: kernels compile and every lazy state exists before the capture
        _forward_step(model, step, forward)
        produced += 1
        if produced < max_new_tokens:
            if not _capture(model, engine, step, forward):
                graphs = _uncaptured(step, graphs_asked)
                _forward_step(model, step, forward)  # the step the failed capture did not run
            produced += 1
    watch = _FinishedWatch(step) if eos_ids else None
    # the replays read the table on this stream, which the prefill's forward made its reader stream
    while produced < max_new_tokens:
        if graphs:
            replay_step(engine, step)
        else:
            _forward_step(model, step, forward)
        produced += 1
        if watch is not None and watch.all_finished(produced):
            break
    out = torch.cat([input_ids, step.tokens[:, :produced]], dim=1)
    return _pad_after_eos(out, prompt_len, eos_token_id, pad_token_id)


def _uncaptured(step: _Step, asked: bool | None) -> bool:
    """For a step that cannot be captured: False (its calls run it eagerly), or ValueError when
    the caller asked for graphs."""
    if asked:
        raise ValueError(f"cannot capture the decode step: {step.uncapturable}")
    return False


def left_padding(mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``mask`` if it pads some row on the left; None for no mask or one of all ones; ValueError
    for any other mask (right or inner padding, an empty row, another shape)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if bool(mask.all()):
        return None
    m = mask.long()
    if not bool(((m == 0) | (m == 1)).all()) or not bool((m[:, 1:] >= m[:, :-1]).all()) or not bool(m[:, -1].all()):
        raise ValueError("attention_mask must be 0/1 with each row's zeros on the left (left padding) and its last "
                         "token real; right-padded batches need transformers' generate (sida_graphs=False)")
    return m


def _step_for(model: nn.Module, want: StepKey, device: torch.device) -> _Step:
    """Static cache and step buffers (reset) for ``want``, whose ``length`` is the tokens the
    call needs: the shortest kept step of that kind at least that long (a longer cache only masks
    more positions, and reusing it saves a capture and, compiled, a compile), else a new one of
    the next power-of-two length."""
    from transformers import StaticCache

    steps = model.__dict__.setdefault("_sida_decode_steps", {})  # oldest use first
    fits = [k for k in steps if k._replace(length=0) == want._replace(length=0) and k.length >= want.length]
    key = min(fits, key=lambda k: k.length) if fits else want._replace(length=_cache_length(want.length))
    batch, length = key.batch, key.length
    step = steps.pop(key, None)
    if step is None:
        _drop_oldest_steps(steps, MAX_KEPT_STEPS - 1, device)
        step = _Step(
            cache=StaticCache(config=model.config, max_cache_len=length),
            token=torch.zeros((batch, 1), dtype=torch.long, device=device),
            position=torch.zeros(1, dtype=torch.long, device=device),
            tokens=torch.zeros((batch, length), dtype=torch.long, device=device),
            index=torch.zeros(1, dtype=torch.long, device=device),
            eos=torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            min_new=torch.zeros(1, dtype=torch.long, device=device),
            sampler=SamplerState(device) if key.sampled else None,
            mask=torch.ones((batch, length), dtype=torch.long, device=device) if key.padded else None,
            pads=torch.zeros((batch, 1), dtype=torch.long, device=device) if key.padded else None,
        )
    else:
        step.cache.reset()
    steps[key] = step  # the newest use last
    return step


def _drop_oldest_steps(steps: dict, keep: int, device: torch.device) -> None:
    """Drop the least recently used of ``steps`` until ``keep`` remain; a captured graph's last
    replays may still run, so the device is drained before its memory goes."""
    dropped = [steps.pop(next(iter(steps))) for _ in range(len(steps) - max(keep, 0))]
    if device.type == "cuda" and any(old.graph is not None for old in dropped):
        torch.cuda.synchronize(device)  # before `dropped`, the last reference, goes


def _compiled(model: nn.Module):
    """``model``'s forward under ``torch.compile``, made once per model (it compiles once per
    shape of a decode step: batch size, cache length, padding), called with room for the shapes
    a model keeps (``sida_moe.compiling``)."""
    compiled = model.__dict__.get("_sida_compiled")
    if compiled is None:
        module = torch.compile(model, dynamic=False)

        def compiled(**inputs):
            with recompile_room():
                return module(**inputs)

        model.__dict__["_sida_compiled"] = compiled
    return compiled


def _capture(model: nn.Module, engine, step: _Step, forward: nn.Module) -> bool:
    """Capture one decode step, then replay it once (capturing runs nothing). Nothing else may
    touch the device meanwhile: the engine's copy workers and routing thread are drained first.
    False (with a warning, and ``step.uncapturable`` set) if the step cannot be captured -- e.g. a
    transformers version whose attention mask is built from a host tensor inside the step -- and
    then nothing of it ran."""
    if engine is not None:
        engine.quiesce()
    graph = torch.cuda.CUDAGraph()
    # no garbage collection while capturing: a collected native object (an engine nobody closed)
    # would synchronize or free pinned memory on this thread and invalidate the capture
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            _forward_step(model, step, forward)
            if engine is not None:
                step.visits = engine.take_captured_visits()
        if engine is not None and step.visits[2] is not None:
            engine.capture_ahead(step.visits[2])  # the prediction's own step, launched beside the next replay
    except RuntimeError as e:  # torch refuses what a capture cannot record, before it is issued
        if engine is not None:
            engine.take_captured_visits()  # what the aborted capture recorded never ran
        lines = str(e).strip().splitlines()
        step.uncapturable = lines[0] if lines else type(e).__name__
        warnings.warn(f"the decode step of {type(model).__name__} (batch {step.token.shape[0]}) cannot be captured "
                      f"in a CUDA graph, so its calls run it eagerly: {step.uncapturable}", RuntimeWarning,
                      stacklevel=3)
        return False
    finally:
        if collecting:
            gc.enable()
    step.graph = graph
    # blocking: waiting for a fence sleeps instead of spinning a core
    step.fences = [torch.cuda.Event(blocking=True) for _ in range(REPLAYS_IN_FLIGHT)]
    replay_step(engine, step)
    return True


def replay_step(engine, step: _Step) -> None:
    """One decode step: the graph's launch (once the replay ``REPLAYS_IN_FLIGHT`` before it has
    finished), then its routing handed to the engine."""
    fence = step.fences[step.replays % len(step.fences)]
    fence.synchronize()  # the replay that recorded it; returns at once if never recorded
    step.graph.replay()
    fence.record()
    step.replays += 1
    if engine is not None:
        engine.end_replayed_forward(*step.visits)


def forget_captured_steps(model: nn.Module) -> None:
    """Drop the static caches and captured decode steps kept on ``model``: a captured step replays
    the kernels chosen when it was captured, so after a change of how the model computes (e.g.
    transformers' experts implementation) the next call must capture again."""
    model.__dict__.pop("_sida_decode_steps", None)
    model.__dict__.pop("_sida_compiled", None)


def captured_step(model: nn.Module, batch_size: int, compiled: bool, sampled: bool) -> _Step | None:
    """A captured unpadded decode step of ``batch_size`` (``compiled``, ``sampled``), rewound to
    position 0 for replays outside a call (they would write past the last call's positions; a
    later call resets the cache and prefills again); None if there is none."""
    captured = [s for key, s in model.__dict__.get("_sida_decode_steps", {}).items()
                if key.batch == batch_size and key.compiled == compiled and key.sampled == sampled
                and not key.padded and s.graph is not None]
    if not captured:
        return None
    step = captured[0]
    step.position.zero_()
    step.index.zero_()
    return step


def drain(engine, device: torch.device) -> None:
    """Let the engine's copies and hand-overs and the device's work finish."""
    if engine is not None:
        engine.quiesce()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad_after_eos(out: torch.Tensor, prompt_len: int, eos: int | list[int] | None, pad: int | None) -> torch.Tensor:
    if eos is None:
        return out
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=out.device)
    new = out[:, prompt_len:]
    hit = torch.isin(new, eos_ids)
    if not bool(hit.any()):
        return out
    after = (hit.cumsum(dim=1) - hit.long()) > 0  # strictly after a row's first EOS
    new = new.masked_fill(after, pad if pad is not None else int(eos_ids[0]))
    finished = hit.any(dim=1)
    if bool(finished.all()):
        last = int(hit.float().argmax(dim=1).max())
        new = new[:, : last + 1]
    return torch.cat([out[:, :prompt_len], new], dim=1)


__all__ = ["StepKey", "captured_step", "drain", "forget_captured_steps", "graphs_supported", "left_padding",
           "replay_step", "static_generate"]
