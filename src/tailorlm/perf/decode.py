"""How fast does a mixed batch generate? The mixed-batch setup again, but each contender continues every
row by ``decode_tokens`` greedy tokens with the KV cache: the regime where each step is one token per row
and per-layer overheads weigh most. The kind is the first registered one stock PEFT can run in mixed
batches (LoRA today), so there is a PEFT contender to compare with."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tailorlm import kinds
from tailorlm.engine.generation import DecodeConfig
from tailorlm.perf.contenders import BARE, ENGINE, PEFT_MIXED, generate_options, peft_mixes_batches
from tailorlm.perf.harness import Bench, Section, Timing
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
