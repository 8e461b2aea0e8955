from __future__ import annotations

import torch

from tailorlm.engine.core import Engine
from tailorlm.engine.modules import BottleneckSpec, IA3Spec, LoraSpec, PromptSpec

SPECS = {
    "lora": LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj")),
    "ia3": IA3Spec(),
    "prompt": PromptSpec(virtual_tokens=3),
    "bottleneck": BottleneckSpec(reduction_factor=8),
}

PROMPTS = [
    ("Rate this: the bus did not stop.", "yes"),
    ("Short", "no"),
    ("A rather longer prompt so that the other rows need left padding in a batch", "perhaps not"),
    ("Medium sized prompt here", "yes"),
]


def personalize(engine: Engine, slots, seed: int = 1, noise: float = 0.05) -> None:
    """Give slots distinct non-identity modules, so a row that used the wrong user's module would show."""
    generator = torch.Generator().manual_seed(seed)
    for slot in slots:
        engine.bank.reset(slot, generator)
        module = {
            n: t + noise * torch.randn(t.shape, generator=generator)
            for n, t in engine.bank.read(slot).items()
        }
        engine.bank.write(slot, module)
