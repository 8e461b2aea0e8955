"""AdamW with independent state per slot, and the learning-rate schedule, per user."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tailorlm.train.trainer import TrainConfig


class SlotAdamW:
    """AdamW with independent state per slot, the same arithmetic as ``torch.optim.AdamW``."""

    def __init__(self, tensors: dict[str, torch.nn.Parameter], config: TrainConfig) -> None:
        self.tensors = tensors
        self.config = config
        self.exp_avg = {n: torch.zeros_like(t) for n, t in tensors.items()}
        self.exp_avg_sq = {n: torch.zeros_like(t) for n, t in tensors.items()}
        # Moments live with the bank: its device, and fp32 whatever the base computes in (mixed precision,
        # engine.bank.MODULE_DTYPE); step counts are per slot, on the same device.
        first = next(iter(tensors.values()))
        self.steps = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)

    def reset(self, slot: int) -> None:
        for state in (*self.exp_avg.values(), *self.exp_avg_sq.values()):
            state[slot].zero_()
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, slots: torch.Tensor, learning_rates: torch.Tensor) -> None:
        """Update only ``slots``; each with its own learning rate, clipping and bias correction."""
        slots = slots.to(self.steps.device)
        learning_rates = learning_rates.to(self.steps.device)
        beta1, beta2 = self.config.betas
        grads = {
            n: (t.grad.index_select(0, slots) if t.grad is not None else torch.zeros_like(t[slots]))
            for n, t in self.tensors.items()
        }
        if self.config.max_grad_norm is not None:
            norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))
            coefficient = (self.config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            grads = {n: g * coefficient.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
        self.steps[slots] += 1
        step = self.steps[slots].double()
        correction1 = (1 - beta1**step).float()
        correction2_sqrt = (1 - beta2**step).sqrt().float()
        for name, tensor in self.tensors.items():
            shape = (-1, *[1] * (tensor.dim() - 1))
            lr = learning_rates.view(shape)
            param = tensor.data.index_select(0, slots)
            param.mul_(1 - lr * self.config.weight_decay)
            exp_avg = self.exp_avg[name].index_select(0, slots).lerp_(grads[name], 1 - beta1)
            exp_avg_sq = self.exp_avg_sq[name].index_select(0, slots).mul_(beta2)
            exp_avg_sq.addcmul_(grads[name], grads[name], value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / correction2_sqrt.view(shape)).add_(self.config.eps)
            param.sub_(lr / correction1.view(shape) * exp_avg / denom)
            tensor.data.index_copy_(0, slots, param)
            self.exp_avg[name].index_copy_(0, slots, exp_avg)
            self.exp_avg_sq[name].index_copy_(0, slots, exp_avg_sq)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up, then linear decay to 0,
    as transformers' ``get_linear_schedule_with_warmup``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))
