"""Where tensors live and in which precision: the one place that turns ``--device`` and ``--dtype`` into
torch objects. Everything else follows the base model: the engine, the slot bank, slot ids, optimizer
state and batches are made on the base model's device in its dtype; module files stay fp16 at rest.

fp32 is the default compute precision: on the CPUs this project is measured on, bf16 matmuls are slower
than fp32 ones, and fp32 keeps the engine equal to stock PEFT to 1e-4. bf16 and fp16 are for GPUs (and
are tested on the CPU to agree with fp32 within a stated tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO = "auto"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPE = "fp32"


class DeviceError(ValueError):
    """A device or dtype that is unknown, or not present on this machine."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, value in DTYPES.items() if value == self.dtype)


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (default): the GPU when one is present, else the CPU. ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` are taken as asked, and an error names what this machine has when the device is missing."""
    name = (name or AUTO).strip().lower()
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' asked for, but Apple's MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {device.type!r} is not supported; use auto, cpu, cuda or mps")
    return device


def resolve_dtype(name: str | None = None) -> torch.dtype:
    name = (name or DEFAULT_DTYPE).strip().lower()
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    return Placement(resolve_device(device), resolve_dtype(dtype))
