"""Where tensors live and in which precision: the one place that turns ``--device`` and ``--dtype`` into
torch objects. Everything else follows the base model's device: the engine, the slot bank, slot ids,
optimizer state and batches are made there. The frozen base computes in the chosen dtype; each user's
module and its optimizer state stay fp32 whatever it is (the usual mixed-precision recipe), and module
files stay fp16 at rest.

``auto`` (the default) is not resolved here: it is measured per machine, model and phase
(``tailorlm.precision``, used by ``models.load_base``). fp32 is the reference precision the others are
tested against: it keeps the engine equal to stock PEFT to 1e-4, bf16 within the tolerance its tests state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO = "auto"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_DTYPE = "fp32"  # what a bare resolve_dtype() gives: the precision every other is tested against


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


def check_dtype_name(name: str) -> str:
    """``name`` lower-cased when it is ``auto`` or a known dtype; a DeviceError naming the choices else."""
    name = name.strip().lower()
    if name != AUTO and name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use one of {AUTO}, {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: str | None = None) -> torch.dtype:
    """A fixed dtype by name (None: fp32, the reference). ``auto`` needs a model and a measurement:
    ``models.load_base`` resolves it."""
    name = check_dtype_name(name or REFERENCE_DTYPE)
    if name == AUTO:
        raise DeviceError("dtype 'auto' is measured per model: load the model with models.load_base")
    return DTYPES[name]


def resolve_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    return Placement(resolve_device(device), resolve_dtype(dtype))
