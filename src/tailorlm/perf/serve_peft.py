"""The stock-PEFT serving baseline (S-LoRA's "PEFT" contender) behind tailorlm's own HTTP front: one
``PeftModel`` that loads adapters on demand into an LRU of the same size as the server's slots, and runs
requests of one adapter at a time: it takes the adapter of the oldest waiting request, batches that
adapter's waiting requests (up to the same maximum batch) and generates them together with
``PeftModel.generate``. Nothing joins a running batch, and the text arrives at the end, so its time to
first token is its latency: that is how the baseline works, measured as it is.

It is a ``JobQueue`` like the server's own scheduler, so ``tailorlm.serve`` runs it unchanged."""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict

import torch

from tailorlm import models
from tailorlm.perf.contenders import generate_options
from tailorlm.serve.metrics import ServeMetrics
from tailorlm.serve.scheduler import Event, Job, JobError, JobQueue, SchedulerConfig
from tailorlm.store.store import ModuleStore

log = logging.getLogger(__name__)


class PeftScheduler(JobQueue):
    thread_name = "peft-scheduler"

    def __init__(
        self,
        base: models.BaseModel,
        store: ModuleStore,
        slots: int,
        config: SchedulerConfig,
        metrics: ServeMetrics,
    ) -> None:
        self.base = base
        self.store = store
        self.slots = slots
        self.peft_model = None
        self.loaded: OrderedDict[str, None] = OrderedDict()  # adapter names, least recently used first
        super().__init__(config, metrics)

    def forget(self, user_id: str) -> int:
        raise JobError("unsupported", "the PEFT baseline does not forget users")

    def _loop(self) -> None:
        while True:
            self._tick()
            with self._cond:
                while not (self._stopping or self._waiting):
                    self._cond.wait()
                if self._stopping:
                    return
                head = self._waiting[0]
                key = (head.user_id, head.version)
                batch = [job for job in self._waiting if (job.user_id, job.version) == key][
                    : self.config.max_batch
                ]
                for job in batch:
                    self._waiting.remove(job)
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception:
                log.exception("PEFT generation failed")
                for job in batch:
                    job.emit(Event(error=JobError("failed", "generation failed")))

    def _activate(self, user_id: str, version: int) -> None:
        """Make the adapter current, loading it (and evicting the least recently used) if needed."""
        from peft import PeftModel

        name = f"{version}:{user_id}"
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.metrics.slot_hits.inc()
        else:
            folder = str(self.store.folder(user_id, version))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                if self.peft_model is None:
                    self.peft_model = PeftModel.from_pretrained(
                        self.base.model, folder, adapter_name=name
                    ).eval()
                else:
                    if len(self.loaded) >= self.slots:
                        oldest, _ = self.loaded.popitem(last=False)
                        self.peft_model.set_adapter(name if name in self.loaded else next(iter(self.loaded)))
                        self.peft_model.delete_adapter(oldest)
                    self.peft_model.load_adapter(folder, adapter_name=name)
            self.loaded[name] = None
            self.metrics.slot_misses.inc()
        self.peft_model.set_adapter(name)

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        self._activate(batch[0].user_id, batch[0].version)
        tokenizer = self.base.tokenizer
        width = max(len(job.prompt_ids) for job in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        device = next(self.base.model.parameters()).device
        new_tokens = max(job.sampling.max_new_tokens for job in batch)
        exactly = all(job.sampling.ignore_eos for job in batch)
        self.metrics.batch_size.observe(len(batch))
        output = self.peft_model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            **generate_options(tokenizer, new_tokens, exactly=exactly),
        )[:, width:]
        now = time.perf_counter()
        for job, row in zip(batch, output.tolist(), strict=True):
            tokens = row[: job.sampling.max_new_tokens]
            if not job.sampling.ignore_eos and tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
                finish = "stop"
            else:
                finish = "length"
            self.metrics.time_to_first_token.observe(now - job.created)
            self.metrics.latency.observe(now - job.created)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            job.emit(
                Event(
                    text=text, finish=finish, prompt_tokens=len(job.prompt_ids), completion_tokens=len(tokens)
                )
            )
