"""What the engine is measured against, built only from public APIs:

- the bare base model: a separately loaded, unwrapped copy of the same base (``Bench.bare``), called the
  way transformers is called (full forward, logits at every position, KV cache off);
- stock PEFT with ``adapter_names`` for mixed batches: a ``PeftModel`` holding exactly the batch's users'
  modules, read from the folders the module store wrote (the engine reloads the same files, so both hold
  the same fp16-rounded numbers and their answers are cross-checked);
- stock PEFT training one user after another (``StockPeftTrainer``): one ``PeftModel``, a fresh adapter
  per user, ``torch.optim.AdamW``, a forward with ``labels=`` (full logits), on the trainer's own
  mini-batches in the trainer's order;
- the engine without prefix sharing (``prefix_switch``), so the training sections can show what sharing
  gains.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from tailorlm import kinds, models
from tailorlm.engine.engine import Batch, Engine, Row, position_ids
from tailorlm.kinds import ModuleSpec
from tailorlm.store.store import ModuleStore
from tailorlm.train.trainer import TrainConfig, UserData

ENGINE = "tailorlm engine"
BARE = "bare base model"
PEFT_MIXED = "PEFT adapter_names"
PEFT_TRAIN = "stock PEFT, one user after another"

# ---- PREFIX SHARING -------------------------------------------------------------------------------------
# The engine's shared-prefix switch, ``Engine(..., share_prefix=...)``. While it exists the training
# sections run the engine with it on and off (a third contender), so the gain from sharing is shown; if it
# is renamed or removed they fall back to one engine contender and print a note saying so.
PREFIX_SWITCH = "share_prefix"


def prefix_switch() -> str | None:
    """The keyword that turns the engine's prefix sharing on or off, when ``Engine`` has it."""
    return PREFIX_SWITCH if PREFIX_SWITCH in inspect.signature(Engine).parameters else None


def engine_train_name(users: int, sharing: bool | None = None) -> str:
    """``engine, 8 users per step`` (and whether prefixes are shared, when the engine can choose)."""
    name = f"engine, {users} users per step"
    if sharing is None:
        return name
    return f"{name}, shared prefixes" if sharing else f"{name}, no prefix sharing"


# ---- forward passes -------------------------------------------------------------------------------------


def forward_inputs(batch: Batch) -> dict:
    """The batch as a transformers model takes it: the engine's position ids (left padding ignored), no KV
    cache, so the bare model and PEFT see exactly what the engine runs."""
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": position_ids(batch.attention_mask),
        "use_cache": False,
    }


def generate_options(tokenizer, new_tokens: int, exactly: bool = False) -> dict:
    """Greedy ``generate`` settings matching ``Engine.generate``'s (``DecodeConfig`` defaults): stop at end
    of sequence, at most ``new_tokens``; with ``exactly``, never stop before ``new_tokens``."""
    options = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if exactly:
        options["min_new_tokens"] = new_tokens
    return options


# ---- stock PEFT, mixed batches --------------------------------------------------------------------------


def peft_mixes_batches(spec: ModuleSpec) -> bool:
    """Whether stock PEFT runs a batch whose rows use different adapters (``adapter_names=``) for this
    kind. PEFT routes ``adapter_names`` through its tuner's forward hooks; a tuner without them drops the
    argument silently and runs the active adapter on every row: a wrong answer that would time as fast."""
    peft_type = kinds.of(spec).peft_type
    if peft_type is None:
        return False
    from peft import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    return tuner is not None and hasattr(tuner, "_enable_peft_forward_hooks")


def peft_with_users(model: torch.nn.Module, store: ModuleStore, users: Sequence[str]):
    """A ``PeftModel`` on ``model`` holding exactly ``users``' modules from ``store`` (adapter name = user
    id), in eval mode."""
    from peft import PeftModel

    peft_model = None
    with warnings.catch_warnings():
        # transformers' deprecation notice raised inside PEFT's loader; nothing the benchmark can act on.
        warnings.simplefilter("ignore", FutureWarning)
        for user in users:
            folder = str(store.folder(user))
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=user)
            else:
                peft_model.load_adapter(folder, adapter_name=user)
    if peft_model is None:
        raise ValueError("a PEFT contender needs at least one user")
    return peft_model.eval()


# ---- stock PEFT, training -------------------------------------------------------------------------------


class StockPeftTrainer:
    """Stock PEFT training one user after another: for each user a fresh adapter on one ``PeftModel``,
    ``torch.optim.AdamW`` with the trainer's settings, gradient clipping, and a forward with ``labels=``
    (full logits at every position, as a stock training loop computes them). Adapter creation and deletion
    happen inside ``run``, as slot admission happens inside the engine's timed run."""

    PLACEHOLDER = "placeholder"  # PEFT needs one adapter to exist while users come and go

    def __init__(
        self,
        base: models.BaseModel,
        spec: ModuleSpec,
        config: TrainConfig,
        encode: Callable[[Sequence[Row]], Batch],
    ) -> None:
        from peft import get_peft_model

        self.base, self.spec, self.config, self.encode = base, spec, config, encode
        with warnings.catch_warnings():  # PEFT's advice about base_model_name_or_path; the base is here
            warnings.simplefilter("ignore")
            self.model = get_peft_model(base.model, self._peft_config(), adapter_name=self.PLACEHOLDER)
        self.model.train()

    def _peft_config(self):
        return kinds.of(self.spec).peft_config(self.spec, self.base.model, self.base.name)

    def run(
        self, users: Sequence[UserData], plans: Mapping[str, Sequence[Sequence[int]]], tag: str
    ) -> list[float]:
        """Train ``users`` one after another on their planned mini-batches; returns the step losses."""
        losses = []
        for user in users:
            name = f"{user.user_id}-{tag}"
            self.model.add_adapter(name, self._peft_config())
            self.model.set_adapter(name)
            params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
            for param in params:
                param.requires_grad_(True)
            optimizer = torch.optim.AdamW(
                params,
                lr=self.config.learning_rate,
                betas=self.config.betas,
                eps=self.config.eps,
                weight_decay=self.config.weight_decay,
            )
            for indices in plans[user.user_id]:
                batch = self.encode([Row(*user.train[i]) for i in indices])
                output = self.model(**forward_inputs(batch), labels=batch.labels)
                output.loss.backward()
                if self.config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(output.loss.detach()))
            self.model.set_adapter(self.PLACEHOLDER)
            self.model.delete_adapter(name)
        return losses
