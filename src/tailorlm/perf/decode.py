"""How fast does a mixed batch generate? The mixed-batch setup again, but each contender continues every
row by ``decode_tokens`` greedy tokens with the KV cache: the regime where each step is one token per row
and per-layer overheads weigh most. The kind is the first registered one stock PEFT can run in mixed
batches (LoRA today), so there is a PEFT contender to compare with."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tailorlm import kinds
from tailorlm.engine.engine import Engine, Row
from tailorlm.engine.generation import DecodeConfig
from tailorlm.engine.slots import SlotManager
from tailorlm.perf import workloads
from tailorlm.perf.contenders import BARE, ENGINE, PEFT_MIXED, generate_options, peft_mixes_batches
from tailorlm.perf.harness import Bench, FactTable, Section, Timing
from tailorlm.perf.mixed import TARGET_VS_PEFT, mixed_facts, mixed_setup, target_vs_base


def decode_kind() -> str:
    """The first registered kind PEFT can batch-mix; the first kind at all when there is none."""
    names = list(kinds.MODEL_KINDS)
    return next((name for name in names if peft_mixes_batches(kinds.default_spec(name))), names[0])


def bench_decode(bench: Bench) -> Section:
    """Every contender does the same number of decoding steps: the engine (``Engine.generate``) and PEFT
    stop where their rows end, and they produce the same text (checked), so the same steps; the bare
    model, whose text differs, is made to run exactly that many steps."""
    config = bench.config
    kind = decode_kind()
    spec = kinds.default_spec(kind)
    bare, tokenizer = bench.bare, bench.tokenizer
    with mixed_setup(bench, spec, "decode") as setup:
        engine, batch, peft_model = setup.engine, setup.batch, setup.peft_model
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        width = batch.input_ids.shape[1]
        decode = DecodeConfig(max_new_tokens=config.decode_tokens)

        def engine_generate() -> list[str]:
            return engine.generate(setup.prompts, setup.row_slots, decode, batch_size=len(setup.prompts))

        section = Section(
            "decode",
            f"Mixed-batch generation, {kind}: {len(setup.users)} distinct users out of {setup.resident} "
            f"resident, up to {config.decode_tokens} new tokens per row",
            facts=mixed_facts(bench, setup, spec),
        )
        contenders: dict[str, Callable[[], object]] = {ENGINE: engine_generate}
        with torch.inference_mode():
            engine_texts = engine_generate()
            steps = config.decode_tokens
            if peft_model is not None:
                options = generate_options(tokenizer, config.decode_tokens)

                def peft_generate() -> torch.Tensor:
                    return peft_model.generate(**inputs, **options, adapter_names=setup.users)

                output = peft_generate()
                steps = output.shape[1] - width
                texts = [
                    t.strip() for t in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
                ]
                section.facts["same_text_as_peft"] = texts == engine_texts
                contenders[PEFT_MIXED] = peft_generate
            bare_options = generate_options(tokenizer, steps, exactly=True)
            contenders[BARE] = lambda: bare.model.generate(**inputs, **bare_options)
            section.facts["decode_steps"] = steps
            seconds = bench.interleaved("decode", contenders)
    section.timings = [
        Timing(ENGINE, seconds[ENGINE], resident=setup.resident),
        Timing(BARE, seconds[BARE], resident=0),
    ]
    section.ratio("engine speed vs bare base model", BARE, ENGINE, target_vs_base(kind))
    if PEFT_MIXED in seconds:
        section.timings.append(Timing(PEFT_MIXED, seconds[PEFT_MIXED], resident=len(setup.users)))
        section.ratio("engine speed vs PEFT adapter_names", PEFT_MIXED, ENGINE, TARGET_VS_PEFT)
    section.notes.append(
        f"greedy, KV cache on, {steps} decoding steps on every contender (rows stop at end of sequence as "
        "Engine.generate does; the bare model is held to the same step count); the engine's time includes "
        "tokenizing the prompts and decoding the text, as a caller of Engine.generate pays them."
    )
    return section


# ---- one stream ------------------------------------------------------------------------------------------

INT8 = "int8"


def _int8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (fp32, CPU) with every ``nn.Linear`` swapped in place for PyTorch's dynamic int8 one
    (weights int8 per tensor, activations quantized per call; VNNI on x86). An engine's slot layers keep
    their user terms in fp32 around the quantized base projection."""
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice; it still works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )


def bench_decode_single(bench: Bench) -> Section:
    """One client: a single prompt continued by exactly ``decode_tokens`` greedy tokens (batch of one row,
    the memory-bound regime where bf16 is no faster and int8 weights are). Contenders: the engine with one
    resident user and the bare base, in every dtype of the run, and int8 weight-only on the CPU. With one
    row, int8 is exact per row (nothing else shares the activation scale), so the engine can run it here."""
    config = bench.config
    spec = kinds.default_spec(decode_kind())
    tokenizer = bench.tokenizer
    prompt = workloads.chat_prompts(tokenizer, config.tokens, 1, config.seed)[0]
    options = generate_options(tokenizer, config.decode_tokens, exactly=True)
    variants = list(bench.dtypes)
    if bench.bare.device.type == "cpu":
        variants.append(INT8)
    contenders: dict[str, Callable[[], object]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for variant in variants:
        base = bench.fresh_base("fp32" if variant == INT8 else variant)
        engine = Engine(base, spec, slots=2, max_length=max(512, config.tokens + 8))
        manager = SlotManager(engine.bank)
        workloads.place_random_users(manager, 1, config.seed)
        bare = bench.fresh_base("fp32" if variant == INT8 else variant).model
        if variant == INT8:
            _int8(engine.model)
            bare = _int8(bare)
        batch = engine.encode([Row(prompt, "", 1)])
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

        def engine_run(engine=engine, batch=batch, inputs=inputs) -> torch.Tensor:
            with torch.inference_mode(), engine.space.route(batch.slot_ids):
                return engine.model.generate(**inputs, **options)

        def bare_run(bare=bare, inputs=inputs) -> torch.Tensor:
            with torch.inference_mode():
                return bare.generate(**inputs, **options)

        contenders[f"engine, 1 user, {variant}"] = engine_run
        contenders[f"bare base model, {variant}"] = bare_run
        outputs[variant] = engine_run()
    seconds = bench.interleaved("decode-single", contenders)
    steps = config.decode_tokens
    section = Section(
        "decode-single",
        f"One client: 1 row, {steps} greedy tokens after a prompt of about {config.tokens} tokens, "
        f"{' / '.join(variants)}",
        timings=[Timing(name, seconds[name], items=steps) for name in contenders],
    )
    reference = outputs[variants[0]]
    section.facts.update(
        {
            "decode_steps": steps,
            "tokens_per_second": {name: steps / timing.median for name, timing in _by_name(section).items()},
            "same_tokens_as_" + variants[0]: {v: bool(torch.equal(o, reference)) for v, o in outputs.items()},
        }
    )
    table = FactTable(f"tokens/s against {variants[0]}", ["precision", "engine, 1 user", "bare base model"])

    def speed(who: str, variant: str) -> str:
        reference = section.timing(f"{who}, {variants[0]}").median
        return f"{reference / section.timing(f'{who}, {variant}').median:.2f}x"

    for variant in variants:
        table.rows.append([variant, speed("engine, 1 user", variant), speed("bare base model", variant)])
    section.tables.append(table)
    section.notes.append(
        "every contender runs exactly the same number of steps (min_new_tokens); 'per s' is tokens/s. "
        "int8 = torch.ao dynamic quantization of every nn.Linear of an fp32 copy (the vocabulary projection "
        "included); the engine's user terms stay fp32. No target: what each precision gives one client."
    )
    return section


def _by_name(section: Section) -> dict[str, Timing]:
    return {timing.name: timing for timing in section.timings}
