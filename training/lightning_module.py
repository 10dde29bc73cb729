"""LightningModule around :class:`flash_attn.models.gpt.GPTLMHeadModel`."""

from __future__ import annotations

import logging
import math
import random
from typing import Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only

from flash_attn.models.gpt import GPTConfig
from training.data.packing import batch_tokens
from training.settings import ModelSettings, OptimizerSettings, SchedulerSettings

log = logging.getLogger(__name__)


def _numpy_state_to_plain(state: tuple) -> list:
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@runtime_checkable
class TrainingData(Protocol):
    """What :class:`GPTLightningModule` asks of its data, besides the loaders the Trainer reads
    (:class:`training.data.datamodule.GPTDataModule` is one)."""

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int64 bytes of text per token id, for bits per byte."""
        ...

    def on_train_batch_consumed(self, local_samples: int, batch) -> None:
        """This rank starts training on batch, local_samples windows: the data's position
        that checkpoints save (the next batch to train on)."""
        ...


def flops_per_token(config: GPTConfig, num_params_no_embeddings: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * n_layer * n_embd * seq_len.

    N counts the non-embedding parameters plus the lm_head matmul (vocab_size * n_embd, also
    when tied); the second term is attention's score and value matmuls, counted for the full
    square as in the PaLM paper (appendix B), so MFU is comparable across codebases.
    """
    n = num_params_no_embeddings + config.vocab_size * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


class GPTLightningModule(L.LightningModule):
    """Next-token training of a GPT.

    Args:
        model: the model to build and whether to compile its forward.
        optimizer: AdamW's settings (None: ``configs/optimizer/adamw.yaml``'s).
        scheduler: the learning-rate schedule's (None: ``configs/scheduler/cosine.yaml``'s);
            its total_steps None ends the decay at trainer.max_steps.
        vocab_size: the tokenizer's vocabulary, when the model config leaves it unset.
        check_finite: stop with :class:`NonFiniteLossError` on a NaN/inf loss (one
            device-to-host sync per step).
        data: the data it trains on (None: bits per byte count every token as one byte, and
            nothing records the batches trained on).
    Batches: (B, T + 1) int64 windows; inputs ``[:, :-1]``, targets ``[:, 1:]``. Or a dict
    of those windows ("tokens") and, for document masking, "document_starts" (B, T + 1) bool:
    attention and positions stay within documents and a document's first token is no target.
    The hyperparameters saved in checkpoints are the settings as plain dicts.
    """

    def __init__(
        self,
        model: ModelSettings,
        optimizer: OptimizerSettings | None = None,
        scheduler: SchedulerSettings | None = None,
        vocab_size: int | None = None,
        check_finite: bool = True,
        data: TrainingData | None = None,
    ):
        super().__init__()
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.scheduler_settings = scheduler or SchedulerSettings()
        self.save_hyperparameters(
            {
                "model": model.to_dict(),
                "optimizer": self.optimizer_settings.to_dict(),
                "scheduler": self.scheduler_settings.to_dict(),
                "vocab_size": vocab_size,
                "check_finite": check_finite,
            }
        )
        self.model = model.build(vocab_size)
        self.check_finite = check_finite
        self.data = data
        self.__dict__["forward_model"] = torch.compile(self.model) if model.compile else self.model
        # bytes of text per token id (for bits per byte), set from the tokenizer in setup()
        ones = torch.ones(self.model.config.vocab_size, dtype=torch.int64)
        self.register_buffer("token_bytes", ones, persistent=False)
        # counted before any sharding wraps the parameters
        self.num_params_no_embeddings = self.model.num_parameters(exclude_embeddings=True)
        self.flops_per_batch = None
        self.tokens_seen = 0
        self._val_sums = None
        self._step_sums = None  # (nats, scored tokens) of the optimizer step's micro-batches

    # -- loss --------------------------------------------------------------------------------
    def loss(self, batch, reduction: str = "mean") -> torch.Tensor:
        """The model's cross-entropy of every next token of the (B, T + 1) windows (fp32
        scalar), through the compiled forward when compile=True."""
        windows = batch_tokens(batch)
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        starts = batch.get("document_starts") if isinstance(batch, dict) else None
        if starts is not None:
            targets = targets.masked_fill(starts[:, 1:], -100)  # first tokens of documents
            starts = starts[:, :-1]
        output = self.forward_model(
            inputs, labels=targets, shift_labels=False, reduction=reduction, document_starts=starts
        )
        return output.loss

    @staticmethod
    def scored_targets(batch) -> torch.Tensor:
        """(B, T) bool: the targets of the (B, T + 1) windows that carry a loss (all of them, or
        all but each document's first token under document masking)."""
        if isinstance(batch, dict) and "document_starts" in batch:
            return ~batch["document_starts"][:, 1:]
        targets = batch_tokens(batch)[:, 1:]
        return torch.ones_like(targets, dtype=torch.bool)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, vocab) logits."""
        return self.forward_model(input_ids).logits

    def _count_flops(self, batch, share: float) -> None:
        """Set flops_per_batch, which Lightning's ThroughputMonitor reads after each batch: the
        batch's training FLOPs on this device times share (1/3: the forward alone)."""
        batch = batch_tokens(batch)
        seq_len = batch.shape[1] - 1
        per_token = flops_per_token(self.model.config, self.num_params_no_embeddings, seq_len)
        self.flops_per_batch = share * per_token * batch.shape[0] * seq_len

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.data is None:
            return
        token_bytes = self.data.token_bytes()
        if token_bytes.numel() != self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {token_bytes.numel()} tokens but the model "
                f"vocab_size is {self.model.config.vocab_size}"
            )
        self.token_bytes = token_bytes

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        windows = batch_tokens(batch)
        self.tokens_seen += (windows.shape[1] - 1) * windows.shape[0] * self.trainer.world_size
        self._count_flops(batch, share=1.0)
        if self.data is not None:
            self.data.on_train_batch_consumed(windows.shape[0], batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if self.check_finite:
            self._raise_if_not_finite(loss)
        self._add_to_step_loss(loss, batch)
        if self._ends_optimizer_step():
            self._log_step_loss()
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def _ends_optimizer_step(self) -> bool:
        """Whether this micro-batch's backward completes an optimizer step (Lightning's own
        test, which its loggers use too: the accumulation count is reached or the epoch ends)."""
        return not self.trainer.fit_loop._should_accumulate()

    def _add_to_step_loss(self, loss: torch.Tensor, batch) -> None:
        """Add a micro-batch's mean loss, weighted by its scored targets, to the step's sums."""
        scored = self.scored_targets(batch).sum().float()
        sums = torch.stack([loss.detach().float() * scored, scored])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums

    def _log_step_loss(self) -> None:
        """Log train/loss and train/ppl of the optimizer step: the mean loss per scored token
        over all its micro-batches (Lightning's own step output is the last micro-batch's loss
        divided by the accumulation count)."""
        nats, tokens = self._step_sums
        self._step_sums = None
        loss = nats / tokens
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        ppl = torch.exp(loss.clamp(max=50.0))  # a tensor: read only when logged
        self.log("train/ppl", ppl, on_step=True, on_epoch=False)

    def _raise_if_not_finite(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step}: "
                "stopping before the optimizer step. The last good checkpoint is kept; "
                "lower optimizer.lr, raise scheduler.warmup_steps, or use bf16-mixed "
                "instead of 16-mixed."
            )

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count_flops(batch, share=1 / 3)

    def validation_step(self, batch, batch_idx: int) -> None:
        nats = self.loss(batch, reduction="sum")
        targets = batch_tokens(batch)[:, 1:]
        scored = self.scored_targets(batch)
        num_bytes = self.token_bytes[targets][scored].sum()
        self._val_sums += torch.stack([nats.double(), scored.sum().double(), num_bytes.double()])

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums
        if dist.is_available() and dist.is_initialized():
            sums = sums.clone()
            dist.all_reduce(sums)
        nats, tokens, num_bytes = sums.tolist()
        if tokens == 0:
            return
        loss = nats / tokens
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=False)
        if num_bytes > 0:
            self.log("val/bpb", nats / (math.log(2) * num_bytes), prog_bar=True, sync_dist=False)

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        max_steps = self.trainer.max_steps
        if not max_steps or max_steps < 0:
            max_steps = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = self.optimizer_and_scheduler(max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip by the global norm; under FSDP, by FSDP's own norm over the sharded gradients
        (Lightning's FSDP precision plugin refuses norm clipping)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model
        if gradient_clip_val and isinstance(wrapped, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("under FSDP, trainer.gradient_clip_algorithm must be 'norm'")
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_and_scheduler(self, max_steps: int):
        """AdamW over the model and its per-step LambdaLR, which ends at scheduler.total_steps
        (None: max_steps); a warning when the warmup outlasts max_steps."""
        problem = self.scheduler_settings.warmup_problem(max_steps)
        if problem and rank_zero_only.rank == 0:
            log.warning("%s", problem)
        optimizer = self.optimizer_settings.build(self.model)
        return optimizer, self.scheduler_settings.build(optimizer, max_steps)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # plain lists and ints, so weights_only loading accepts the checkpoint
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            np.random.set_state(_numpy_state_from_plain(states["numpy"]))
            random.setstate(states["python"])
