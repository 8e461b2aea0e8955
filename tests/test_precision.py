"""``--dtype auto``: measured per machine, model widths and phase, cached, and what the models load in.

Every test measures in its own temporary cache folder, so none depends on a measurement an earlier run
left behind; at the tiny widths a measurement takes about a tenth of a second on an idle machine."""

from __future__ import annotations

import json

import pytest
import torch

from tailorlm import models, precision, settings
from tailorlm.device import DTYPES, DeviceError

CPU = torch.device("cpu")
HIDDEN, INTERMEDIATE = 64, 128  # the tiny model's widths


def test_a_measurement_times_every_candidate_and_picks_the_fastest_exact_one(tmp_path):
    result, cached = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    assert not cached
    batched, decode = result.choice(precision.BATCHED), result.choice(precision.DECODE)
    assert set(batched.micros) == {"fp32", "bf16"} and batched.rows == precision.BATCHED_ROWS
    assert set(decode.micros) == {"fp32", "bf16", precision.INT8} and decode.rows == precision.DECODE_ROWS
    for choice in (batched, decode):
        assert all(value > 0 for value in choice.micros.values())
        exact = {name: value for name, value in choice.micros.items() if name != precision.INT8}
        assert choice.dtype == min(exact, key=exact.__getitem__)
        assert choice.fastest == min(choice.micros, key=choice.micros.__getitem__)
        assert choice.dtype in DTYPES and choice.dtype in choice.reason
    assert result.key["threads"] == torch.get_num_threads() and result.key["hidden"] == HIDDEN
    with pytest.raises(DeviceError, match="unknown phase"):
        result.choice("prefill")


def test_the_measurement_is_cached_per_machine_key_and_measured_again_when_it_changes(tmp_path, monkeypatch):
    first, _ = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == first.key
    again, cached = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    assert cached and again == first
    # other widths or another thread count are another key: measured, and cached beside
    _, cached = precision.measured(CPU, HIDDEN * 2, INTERMEDIATE, tmp_path)
    assert not cached
    monkeypatch.setattr(precision, "machine_key", lambda *a: {**first.key, "threads": 99})
    _, cached = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    assert not cached and len(list(tmp_path.glob("*.json"))) == 3


def test_a_damaged_cache_file_is_measured_again_and_replaced(tmp_path):
    first, _ = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    second, cached = precision.measured(CPU, HIDDEN, INTERMEDIATE, tmp_path)
    assert not cached and second.key == first.key
    assert precision.Measurement.from_dict(json.loads(path.read_text())) == second


def test_the_int8_candidate_computes_what_fp32_computes_within_quantization_error():
    """int8 weight-only is the same MLP with its weights rounded to 256 levels per tensor: a relative error
    of a few percent, never a different function."""
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = precision.mlp_pair(HIDDEN, INTERMEDIATE, CPU, "fp32")(x)
        quantized = precision.mlp_pair(HIDDEN, INTERMEDIATE, CPU, precision.INT8)(x)
        half = precision.mlp_pair(HIDDEN, INTERMEDIATE, CPU, "bf16")(x.bfloat16())
    assert (quantized - full).norm() / full.norm() < 0.05
    assert (half.float() - full).norm() / full.norm() < 0.02


def test_auto_loads_the_model_in_the_measured_dtype_and_says_why(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.setenv(settings.DTYPE_ENV, "auto")
    assert precision.is_auto(None)
    for phase in precision.PHASES:
        base = models.tiny_model(tokenizer=tokenizer, device="cpu", phase=phase)
        assert base.precision is not None and base.precision.phase == phase
        assert base.dtype == DTYPES[base.precision.dtype]
    assert len(list(settings.precision_dir().glob("*.json"))) == 1  # one measurement serves both phases
    explicit = models.tiny_model(tokenizer=tokenizer, device="cpu", dtype="fp32")
    assert explicit.precision is None and explicit.dtype == torch.float32


def test_the_dtype_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(settings.DTYPE_ENV, "BF16")
    assert settings.default_dtype() == "bf16" and not precision.is_auto(None)
    monkeypatch.delenv(settings.DTYPE_ENV)
    assert settings.default_dtype() == "fp32" and not precision.is_auto(None)  # auto is asked for
    monkeypatch.setenv(settings.DTYPE_ENV, "auto")
    assert precision.is_auto(None)


def test_a_bad_dtype_is_named_before_a_model_is_read(monkeypatch):
    with pytest.raises(DeviceError, match="unknown dtype 'int4'"):
        models.load_base("/no/such/folder", dtype="int4")
