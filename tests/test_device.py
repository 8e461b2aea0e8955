"""Device and dtype choice: one place resolves them, and everything follows the base model."""

from __future__ import annotations

import pytest
import torch

from tailorlm import device, kinds, models
from tailorlm.engine.batch import Row
from tailorlm.engine.engine import Engine
from tailorlm.train.trainer import MultiUserTrainer, TrainConfig, UserData, seed_for

PROMPT = "<|im_start|>user\nWould you shout at the bus driver?<|im_end|>\n<|im_start|>assistant\n"


def test_defaults_are_the_gpu_when_present_and_fp32_as_the_reference():
    placement = device.resolve_placement()
    assert placement.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert placement.dtype == torch.float32 and placement.dtype_name == "fp32"
    assert device.resolve_placement("cpu", "bf16").dtype == torch.bfloat16


def test_auto_is_measured_per_model_not_resolved_by_name():
    assert device.check_dtype_name(" AUTO ") == "auto"
    with pytest.raises(device.DeviceError, match="measured per model"):
        device.resolve_dtype("auto")


@pytest.mark.parametrize(
    ("name", "dtype", "message"),
    [("tpu", None, "unknown device"), (None, "int4", "unknown dtype"), ("cpu", "double", "use one of auto")],
)
def test_unknown_device_or_dtype_is_named(name, dtype, message):
    with pytest.raises(device.DeviceError, match=message):
        device.resolve_placement(name, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_a_missing_gpu_says_so():
    with pytest.raises(device.DeviceError, match="no CUDA GPU"):
        device.resolve_placement("cuda")


@pytest.mark.parametrize("kind", list(kinds.MODEL_KINDS))
def test_bf16_engine_agrees_with_fp32(kind, tokenizer):
    """The engine on a bf16 base (users' modules fp32 in the bank) gives the fp32 answer within bf16's
    precision: 8 mantissa bits, so log-probabilities summed over a few tokens agree to about 2% of their
    size on this tiny model."""
    spec = kinds.default_spec(kind)
    engines = {
        name: Engine(models.tiny_model(seed=0, tokenizer=tokenizer, dtype=name), spec, slots=3)
        for name in ("fp32", "bf16")
    }
    generator = torch.Generator().manual_seed(3)
    engines["fp32"].bank.reset(1, generator)
    module = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator)
        for n, t in engines["fp32"].bank.read(1).items()
    }
    for engine in engines.values():
        engine.bank.write(1, module)
    assert engines["bf16"].model.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in engines["bf16"].bank.tensors.values())
    rows = [Row(PROMPT, "yes", 1), Row(PROMPT, "perhaps", 0)]
    full, half = (torch.tensor(engines[name].score(rows)) for name in ("fp32", "bf16"))
    torch.testing.assert_close(half, full, rtol=0.02, atol=0.05)


def test_bf16_training_moves_the_module_like_fp32(tokenizer):
    """Mixed precision: on a bf16 base the module and its optimizer state are fp32, and a short run learns
    what the fp32 run learns. Adam's steps are about +-lr whatever the gradient's size, so a coordinate
    whose gradient is near zero can step the other way with bf16 activations: the test compares the whole
    update's direction and the losses, not each number."""
    spec = kinds.default_spec("lora")
    user = UserData("ann", [(PROMPT, "yes")] * 4)
    config = TrainConfig(epochs=3, learning_rate=1e-2, batch_size=2)
    results = {}
    for name in ("fp32", "bf16"):
        engine = Engine(models.tiny_model(seed=0, tokenizer=tokenizer, dtype=name), spec, slots=2)
        trainer = MultiUserTrainer(engine, config)
        results[name] = trainer.run([user])[0]
        moments = [*trainer.optimizer.exp_avg.values(), *trainer.optimizer.exp_avg_sq.values()]
        assert all(m.dtype == torch.float32 for m in moments)
    full, half = results["fp32"], results["bf16"]
    assert all(t.dtype == torch.float32 for t in half.module.values())
    start = Engine(models.tiny_model(seed=0, tokenizer=tokenizer), spec, slots=2)
    start.bank.reset(1, torch.Generator().manual_seed(seed_for(config.seed, "ann", "init")))
    initial = start.bank.read(1)
    update = torch.cat([(full.module[n] - t).flatten() for n, t in initial.items()])
    half_update = torch.cat([(half.module[n].float() - t).flatten() for n, t in initial.items()])
    assert update.abs().max() > 2 * config.learning_rate  # the module really moved (6 decaying steps)
    assert torch.nn.functional.cosine_similarity(update, half_update, dim=0) > 0.95
    assert half.train_losses == pytest.approx(full.train_losses, rel=0.02)
    assert half.train_losses[-1] < half.train_losses[0]


def test_ask_takes_device_and_dtype_and_names_a_bad_one():
    from typer.testing import CliRunner

    from tailorlm.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "ask",
            "Hello?",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"dtype": "bfloat16"' in result.stdout and '"device": "cpu"' in result.stdout
    result = runner.invoke(app, ["ask", "Hello?", "--model", "tiny", "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--device cuda --dtype bf16)")
def test_a_bf16_engine_on_the_gpu_scores_and_trains_like_fp32_on_the_cpu(tokenizer):
    """``--device cuda --dtype bf16``: the base in bf16 on the GPU, users' modules and optimizer state fp32
    there too; scores agree with the fp32 CPU engine within bf16's precision (as on the CPU above) and a
    short training run learns what the CPU run learns."""
    spec = kinds.default_spec("lora")
    engines = {
        where: Engine(
            models.tiny_model(seed=0, tokenizer=tokenizer, device=where, dtype=dtype), spec, slots=3
        )
        for where, dtype in (("cpu", "fp32"), ("cuda", "bf16"))
    }
    gpu = engines["cuda"]
    assert gpu.model.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    assert all(t.dtype == torch.float32 and t.device.type == "cuda" for t in gpu.bank.tensors.values())
    generator = torch.Generator().manual_seed(3)
    engines["cpu"].bank.reset(1, generator)
    module = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator)
        for n, t in engines["cpu"].bank.read(1).items()
    }
    for engine in engines.values():
        engine.bank.write(1, module)
    rows = [Row(PROMPT, "yes", 1), Row(PROMPT, "perhaps", 0)]
    cpu, cuda = (torch.tensor(engines[where].score(rows)) for where in ("cpu", "cuda"))
    torch.testing.assert_close(cuda, cpu, rtol=0.02, atol=0.05)
    user = UserData("ann", [(PROMPT, "yes")] * 4)
    config = TrainConfig(epochs=3, learning_rate=1e-2, batch_size=2)
    losses = {
        where: MultiUserTrainer(engine, config).run([user])[0].train_losses
        for where, engine in engines.items()
    }
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.02)
    assert losses["cuda"][-1] < losses["cuda"][0]
