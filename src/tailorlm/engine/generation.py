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
    stop: tuple[str, ...] = ()  # a row also ends at the first of these strings (the string is dropped)


def _sampling(decode: DecodeConfig) -> dict:
    if decode.do_sample:
        return {"do_sample": True, "temperature": decode.temperature, "top_p": decode.top_p, "top_k": None}
    # Explicit Nones stop a model's generation_config from slipping sampling settings into greedy decoding.
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def generate_from_inputs(model, tokenizer, inputs: dict, decode: DecodeConfig) -> list[str]:
    """Run ``model.generate`` on prepared inputs (``input_ids`` or ``inputs_embeds``, with an attention
    mask); rows stop independently at end-of-sequence or at a stop string."""
    extra = {"stop_strings": list(decode.stop), "tokenizer": tokenizer} if decode.stop else {}
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(decode.seed)
        output = model.generate(
            **inputs,
            max_new_tokens=decode.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **_sampling(decode),
            **extra,
        )
    if "input_ids" in inputs:  # decoder-only models echo the prompt ids unless they were given embeddings
        output = output[:, inputs["input_ids"].shape[1] :]
    return [
        _cut_at_stop(text, decode.stop) for text in tokenizer.batch_decode(output, skip_special_tokens=True)
    ]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    return text.strip()


def generate_texts(
    model, tokenizer, prompts: list[str], decode: DecodeConfig | None = None, max_prompt_tokens: int = 1024
) -> list[str]:
    """Continue each prompt with a bare model (no per-user modules)."""
    if not prompts:
        return []
    batch = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        padding_side="left",
        add_special_tokens=False,
    )
    inputs = {name: tensor.to(model.device) for name, tensor in batch.items()}
    return generate_from_inputs(model, tokenizer, inputs, decode or DecodeConfig())
