"""What every system of the benchmark is given: the model, the same prompts, the same
``generate`` call, and the prefetcher a configuration names."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sida_moe.bench.config import BenchConfig, BenchInputError, sida_k


def load_model(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from sida_moe.presets import PRESETS
    from sida_moe.preset_models import build_model

    if cfg.model in PRESETS:
        return build_model(cfg.model, device=device, dtype=dtype, seed=cfg.seed)
    path = Path(cfg.model)
    if not path.is_dir():
        raise BenchInputError(f"model must be a preset ({', '.join(PRESETS)}) or a checkpoint directory; {cfg.model!r} is neither")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise BenchInputError(f"cannot load the checkpoint {cfg.model}: {e}") from e


def replay_routing(trace, model: nn.Module):
    """The hooks replaying ``trace`` (a ``RoutingTrace``, or None: no hooks) on ``model``."""
    if trace is None:
        return None
    from sida_moe.bench.replay import ReplayRouting, RoutingTraceError

    try:
        return ReplayRouting(model, trace)
    except RoutingTraceError as e:  # recorded with another experts count or top-k
        raise BenchInputError(str(e)) from None


def prompt_file_ids(cfg: BenchConfig, vocab: int) -> torch.Tensor:
    """Token ids of ``cfg.prompt_file`` with the checkpoint's tokenizer (byte-level for presets)."""
    from sida_moe.presets import PRESETS
    from sida_moe.byte_tokenizer import ByteTokenizer

    text = Path(cfg.prompt_file).read_text(encoding="utf-8", errors="replace")
    if cfg.model in PRESETS:
        ids = ByteTokenizer().encode(text)
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(cfg.model)(text)["input_ids"]
    ids = torch.tensor([i for i in ids if i < vocab], dtype=torch.long)
    if ids.numel() == 0:
        raise BenchInputError(f"prompt file {cfg.prompt_file} gave no tokens")
    return ids


def make_prompts(model: nn.Module, batch: int, length: int, seed: int, device: torch.device,
                 text_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The same prompts for every system: windows of ``text_ids`` at seeded offsets, or seeded
    random token ids (left-padded rows of different lengths when batch > 1, to exercise padding)."""
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    g = torch.Generator().manual_seed(seed + batch)
    if text_ids is not None:
        if text_ids.numel() < length:
            raise BenchInputError(f"the prompt file has {text_ids.numel()} tokens, fewer than prompt_tokens={length}")
        starts = torch.randint(0, text_ids.numel() - length + 1, (batch,), generator=g)
        ids = torch.stack([text_ids[s : s + length] for s in starts.tolist()])
    else:
        ids = torch.randint(3, min(vocab, 50000), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # ragged: row r drops r tokens on the left
        cut = min(row, length - 1)
        mask[row, :cut] = 0
        ids[row, :cut] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def generate_new(model: nn.Module, prompts: dict[str, torch.Tensor], new_tokens: int, sample: bool = False,
                 seed: int = 0, graphs: bool | None = None, compile: bool = False) -> torch.Tensor:
    """The ``[B, new_tokens]`` ids ``model.generate`` produces (on the model's device). Calls are
    plain -- EOS off instead of ``min_new_tokens`` -- so an offloaded model serves them from its
    graphed loop where it can (greedy or sampled), compiled first with ``compile``;
    ``graphs=False`` keeps them on transformers' loop."""
    kwargs = {"do_sample": sample, "eos_token_id": None}
    if sample:
        kwargs.update(SAMPLING)
    if graphs is False:
        kwargs["sida_graphs"] = False
    elif compile and getattr(model, "sida_engine", None) is not None:
        kwargs["sida_compile"] = True
    torch.manual_seed(seed)  # the same sampled sequence for every system (given the same logits)
    with torch.inference_mode():
        out = model.generate(**prompts, max_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    out = out[:, prompts["input_ids"].shape[1]:]
    if out.shape[1] != new_tokens:  # the decode time per step divides by new_tokens - 1
        raise RuntimeError(f"generate returned {out.shape[1]} new tokens, not the {new_tokens} asked for")
    return out


def prefetcher_for(name: str, cfg: BenchConfig, oracle: bool = False):
    """``oracle``: the policy is Belady, fed the true future; the SiDA prefetcher then must not
    replace that future with its predicted one."""
    from sida_moe.prefetchers import make_prefetcher

    if name.startswith("sida"):
        from sida_moe.predictor import load_prefetcher

        return load_prefetcher(cfg.predictor_path, k=sida_k(name), feed_future=not oracle)
    return make_prefetcher(name)


__all__ = ["SAMPLING", "generate_new", "load_model", "make_prompts", "prefetcher_for", "prompt_file_ids", "replay_routing"]
