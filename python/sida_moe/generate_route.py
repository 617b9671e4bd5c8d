"""Which ``model.generate`` calls of an offloaded model go to the graphed decode loop
(``decode_graph.static_generate``): plain greedy or sampled calls, unpadded or left-padded, whose
settings are resolved here as transformers resolves them; every other call, and any call with
``sida_graphs=False``, goes to transformers' own ``generate``."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from sida_moe.decode_graph import forget_captured_steps, graphs_supported, left_padding, static_generate
from sida_moe.sampling import SamplingParams

_PLAIN_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "do_sample", "num_beams",
                 "eos_token_id", "pad_token_id", "use_cache", "temperature", "top_k", "top_p"}
# generation settings under which transformers' search is a plain argmax loop, or with do_sample
# a plain draw after temperature, top-k and top-p
_NEUTRAL = {"num_beams": (None, 1), "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,), "min_length": (None, 0),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "sequence_bias": (None,), "num_return_sequences": (None, 1),
            "encoder_repetition_penalty": (None, 1.0), "penalty_alpha": (None,), "guidance_scale": (None, 1.0),
            "stop_strings": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
            "min_p": (None,), "top_h": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
            "eta_cutoff": (None, 0.0), "watermarking_config": (None,), "exponential_decay_length_penalty": (None,),
            "remove_invalid_values": (None, False)}
# transformers' values for sampling settings a generation config leaves unset
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _sampling_of(cfg, kwargs: dict) -> SamplingParams:
    """The call's temperature, top-k and top-p as transformers resolves them: the call's
    arguments, then the generation config, then transformers' defaults (ValueError if invalid)."""
    values = {}
    for name, default in _SAMPLING_DEFAULTS.items():
        value = kwargs.get(name)
        if value is None:
            value = getattr(cfg, name, None)
        values[name] = default if value is None else value
    return SamplingParams(**values)


class _PlainCall(NamedTuple):
    """A ``generate`` call :func:`static_generate` serves, its settings resolved as transformers
    resolves them (the call's arguments, then the generation config)."""

    ids: torch.Tensor
    max_new_tokens: int
    eos: int | list[int] | None
    pad: int | None
    sampling: SamplingParams | None  # None: greedy
    mask: torch.Tensor | None  # left padding, else None
    min_new_tokens: int


def plain_call(model: nn.Module, args: tuple, kwargs: dict) -> _PlainCall | None:
    """This ``generate`` call's settings when it is a plain greedy search or plain sampling,
    unpadded or left-padded, that :func:`static_generate` serves, else None."""
    if len(args) > 1 or set(kwargs) - _PLAIN_KWARGS or kwargs.get("use_cache", True) is False:
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    try:
        mask = left_padding(kwargs.get("attention_mask"), ids)
    except ValueError:
        return None  # right or inner padding, another shape: transformers' generate
    cfg = model.generation_config
    if kwargs.get("num_beams", cfg.num_beams) not in (None, 1):
        return None
    if any(getattr(cfg, name, None) not in allowed for name, allowed in _NEUTRAL.items()):
        return None
    new = kwargs.get("max_new_tokens", cfg.max_new_tokens)
    if new is None:
        new = (cfg.max_length or 20) - ids.shape[1]
    if not isinstance(new, int) or new < 1:
        return None
    min_new = kwargs.get("min_new_tokens", cfg.min_new_tokens) or 0
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        return None  # transformers' own check says what is wrong
    eos = kwargs.get("eos_token_id", cfg.eos_token_id)
    pad = kwargs.get("pad_token_id", cfg.pad_token_id)
    if pad is None and eos is not None:
        pad = eos if isinstance(eos, int) else list(eos)[0]
    sample = kwargs.get("do_sample")
    sampling = _sampling_of(cfg, kwargs) if (cfg.do_sample if sample is None else sample) else None
    return _PlainCall(ids, new, eos, pad, sampling, mask, min_new)


def install_generate(model: nn.Module) -> None:
    """Route ``model.generate`` through :func:`static_generate` with graphs for the calls it
    serves (plain greedy or sampling, unpadded or left-padded, on CUDA with every layer on the
    table path); every other call, and any call with ``sida_graphs=False``, goes to transformers'
    own ``generate``.
    ``sida_compile=True`` compiles the graphed step first (:func:`static_generate`'s ``compile``)."""
    forget_captured_steps(model)  # steps captured before offloading replay the original experts
    original = model.generate

    @functools.wraps(original)
    def generate(*args, sida_graphs: bool | None = None, sida_compile: bool = False, **kwargs):
        if not isinstance(sida_compile, bool):
            raise TypeError(f"sida_compile must be a bool, got {sida_compile!r}")
        if sida_compile and sida_graphs is False:
            raise ValueError("sida_compile=True compiles the graphed decode step: it needs sida_graphs left on")
        call = None if sida_graphs is False else plain_call(model, args, kwargs)
        refused = "not a plain greedy or sampling call" if call is None else graphs_supported(model, call.ids.shape[0])
        if refused is not None:
            if sida_graphs or sida_compile:
                flag = "sida_graphs" if sida_graphs else "sida_compile"
                raise ValueError(f"{flag}=True, but this generate call cannot use the graphed decode step: {refused}")
            return original(*args, **kwargs)
        # graphs=None unless asked: a step that turns out not to be capturable runs eagerly, with a warning
        return static_generate(model, call.ids, call.max_new_tokens, eos_token_id=call.eos, pad_token_id=call.pad,
                               graphs=True if sida_graphs else None, compile=sida_compile, sampling=call.sampling,
                               attention_mask=call.mask, min_new_tokens=call.min_new_tokens)

    model.generate = generate
    model._sida_original_generate = original


__all__ = ["install_generate", "plain_call"]
