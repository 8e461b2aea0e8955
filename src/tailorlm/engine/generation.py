"""Batched text generation: left padding, KV cache, greedy or seeded sampling, per-row stop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def generate_texts(
    model, tokenizer, prompts: list[str], decode: DecodeConfig | None = None, max_prompt_tokens: int = 512
) -> list[str]:
    """Continue each prompt; rows stop independently at the tokenizer's end-of-sequence token."""
    decode = decode or DecodeConfig()
    if not prompts:
        return []
    batch = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        padding_side="left",
    )
    sampling = (
        {"do_sample": True, "temperature": decode.temperature, "top_p": decode.top_p}
        if decode.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(decode.seed)
        output = model.generate(
            **batch,
            max_new_tokens=decode.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
