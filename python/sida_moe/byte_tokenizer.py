"""The byte-level tokenizer of the built-in presets (``sida_moe.presets``)."""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens, shifted past 3 specials (pad=0, eos=1, bos=2); works with any vocab
    of at least 259 entries."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    offset = 3

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch: ``input_ids`` and ``attention_mask`` ``[B, S]``."""
        encoded = [self.encode(t) or [self.bos_token_id] for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


__all__ = ["ByteTokenizer"]
