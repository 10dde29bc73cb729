"""``train(cfg)``: build everything a composed Hydra config describes, fit, summarise."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from training.callbacks import LossCurve, TrainingSpan
from training.checkpointing import Resume, VerifiedCheckpointIO
from training.hf_export import HuggingFaceFolder
from training.lightning_module import GPTLightningModule, TrainingData
from training.loggers import keep_history
from training.preflight import check_before_data
from training.run_folder import (
    check_fresh_start,
    check_resume_folder_exists,
    resolve_resume,
    run_dir_chosen,
    run_folder_lock,
)
from training.settings import (
    ModelSettings,
    OptimizerSettings,
    SchedulerSettings,
    check_settings,
)
from training.stop_signals import exit_status_on_stop_signal

if TYPE_CHECKING:
    from training.data.datamodule import GPTDataModule

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit the model a composed config describes; returns a summary of the run.

    Returns a dict with the final train/val losses, val bits per byte, the corpus' unigram
    entropy, tokens seen since step 0, this process's part of the run (first step, tokens,
    training seconds and their tokens/s), wall time, the run folder, checkpoint paths and a
    sample.
    The run folder is locked for the run (a second run there fails at once); a stop by
    SIGTERM or SIGINT raises ``StoppedBySignal`` (exit status 143 or 130) after saving. A fresh
    start in the folder of an earlier run that left checkpoints stops with the commands that
    resume it or start elsewhere (unless overwrite_run_folder=true). ``cpu_threads`` in the
    summary is the intra-op thread count of CPU training (else None).
    """
    check_settings(cfg)
    check_before_data(cfg)  # accelerator, model family and sizes: before any data work
    output_dir = Path(cfg.paths.output_dir)
    check_resume_folder_exists(cfg.get("ckpt_path"), output_dir)  # before the lock creates it
    with run_folder_lock(output_dir):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict:
    """A run's three steps, inside :func:`train`'s checks and lock."""
    run = build_run(cfg)
    fit(run)
    return summarise(run)


@dataclass
class Run:
    """What :func:`build_run` made of a composed config: what :func:`fit` trains and
    :func:`summarise` reports."""

    cfg: DictConfig
    started: float  # time.perf_counter() when the run began
    resume: Resume | None  # the checkpoint it continues from (None: a fresh start)
    cpu_threads: int | None  # intra-op threads of CPU training (None: PyTorch's default)
    datamodule: GPTDataModule
    module: GPTLightningModule
    entropy: dict  # the training tokens' unigram entropy (GPTDataModule.unigram_entropy)
    span: TrainingSpan
    trainer: L.Trainer

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def hf_folder(self) -> Path:
        return _hf_folder(self.output_dir)

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / "checkpoints" / "last.ckpt"


def build_run(cfg: DictConfig) -> Run:
    """The checkpoint to resume, the process settings (seed, matmul precision, CPU threads),
    the datamodule (tokenizer and token cache built), the LightningModule given that data,
    and the Trainer with its callbacks and loggers; logs the start on rank zero."""
    started = time.perf_counter()
    resume = _resume_or_fresh_start(cfg)
    threads = _set_up_process(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.build()  # tokenizer + token cache (locked, built once per cache key)
    module = build_module(cfg, datamodule.vocab_size, data=datamodule)
    entropy = datamodule.unigram_entropy()
    span = TrainingSpan()
    trainer = _build_trainer(cfg, resume, entropy, span)
    run = Run(
        cfg=cfg,
        started=started,
        resume=resume,
        cpu_threads=threads,
        datamodule=datamodule,
        module=module,
        entropy=entropy,
        span=span,
        trainer=trainer,
    )
    if trainer.is_global_zero:
        _log_start(run)
    return run


def fit(run: Run) -> None:
    """Train from the resumed checkpoint (or step 0) to trainer.max_steps; a stop signal
    saves and exits (see :mod:`training.stop_signals`). Then ``last.ckpt`` holds the final
    state, also when max_steps is not a multiple of the checkpoint interval (resuming from it
    is a no-op)."""
    with exit_status_on_stop_signal(run.output_dir):
        run.trainer.fit(
            run.module,
            datamodule=run.datamodule,
            ckpt_path=run.resume.path if run.resume else None,
            weights_only=True,
        )
    if run.cfg.save_final_checkpoint:
        run.trainer.save_checkpoint(run.last_checkpoint, weights_only=False)


def summarise(run: Run) -> dict:
    """The run's summary (see :func:`train`). Rank zero adds the sample, prints the summary
    and writes it to ``summary.txt``."""
    trainer, span, entropy = run.trainer, run.span, run.entropy
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = [p for cb in trainer.checkpoint_callbacks if (p := getattr(cb, "best_model_path", ""))]
    last, hf_folder = run.last_checkpoint, run.hf_folder
    summary = {
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "val_bpb": metrics.get("val/bpb"),
        "unigram_entropy_nats": entropy["nats_per_token"],
        "unigram_entropy_bpb": entropy["bits_per_byte"],
        "tokens_seen": run.module.tokens_seen,
        "global_step": trainer.global_step,
        # this process's part of the run (after a resume: from the resumed step on)
        "first_step": span.first_step,
        "tokens_trained": span.tokens,
        "train_s": span.seconds,
        "tokens_per_s": span.tokens_per_s,
        "mfu": _mfu(trainer),
        "wall_s": time.perf_counter() - run.started,
        "output_dir": str(run.output_dir),
        "last_checkpoint": str(last) if last.is_file() else None,
        "best_checkpoint": best[0] if best else None,
        "hf_folder": str(hf_folder) if (hf_folder / "config.json").is_file() else None,
        "cpu_threads": run.cpu_threads,
        "sample": None,
    }
    if trainer.is_global_zero:
        summary["sample"] = _sample(run)
        _print_summary(summary)
    return summary


def _hf_folder(output_dir: Path) -> Path:
    return output_dir / "hf"  # every run ends with a Hugging Face folder


def _resume_or_fresh_start(cfg: DictConfig) -> Resume | None:
    """The checkpoint ckpt_path resumes from; with none, a fresh start must not replace an
    earlier run's checkpoints (unless overwrite_run_folder)."""
    output_dir = Path(cfg.paths.output_dir)
    resume = resolve_resume(cfg.get("ckpt_path"), output_dir, run_dir_chosen())
    if resume is None:
        check_fresh_start(output_dir, overwrite=bool(cfg.get("overwrite_run_folder")))
    return resume


def _set_up_process(cfg: DictConfig) -> int | None:
    """Seed every generator, set the matmul precision and the CPU threads; returns those
    threads (None: PyTorch's default)."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    threads = cpu_threads(cfg.get("cpu_threads"), cfg.trainer.accelerator, cfg.trainer.devices)
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("training on the CPU with %d thread(s) (cpu_threads=%s)", threads, cfg.cpu_threads)
    return threads


def build_module(
    cfg: DictConfig, vocab_size: int | None, data: TrainingData | None = None
) -> GPTLightningModule:
    """The LightningModule of a composed config's model, optimizer and scheduler groups.

    vocab_size: the tokenizer's, used when model.config leaves it unset; data: what it trains
    on (see :class:`~training.lightning_module.TrainingData`).
    """
    return GPTLightningModule(
        model=ModelSettings.from_config(cfg.model),
        optimizer=OptimizerSettings.from_config(cfg.optimizer),
        scheduler=SchedulerSettings.from_config(cfg.scheduler),
        vocab_size=vocab_size,
        data=data,
    )


def _build_trainer(
    cfg: DictConfig, resume: Resume | None, entropy: dict, span: TrainingSpan
) -> L.Trainer:
    """The Trainer of cfg.trainer with the configured callbacks and loggers, the Hugging Face
    folder and span callbacks, checked checkpoint files, and gradient accumulation from
    global_batch_size."""
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    callbacks += [HuggingFaceFolder(_hf_folder(Path(cfg.paths.output_dir))), span]
    for cb in callbacks:
        if isinstance(cb, LossCurve):
            cb.reference.setdefault("unigram entropy", entropy["nats_per_token"])
    loggers = _instantiate_loggers(cfg.get("logger"))
    keep_history(loggers, resume.step if resume else 0)
    if not loggers:  # nothing to send learning rates to
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    accumulation = _accumulation(cfg)
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[VerifiedCheckpointIO()],
        accumulate_grad_batches=accumulation,
        val_check_interval=_val_check_batches(cfg.trainer.val_check_interval, accumulation),
    )


def _accumulation(cfg: DictConfig) -> int:
    """Micro-batches per optimizer step so that batch_size * devices * accumulation reaches
    global_batch_size (trainer.accumulate_grad_batches when unset)."""
    global_batch = cfg.get("global_batch_size")
    if not global_batch:
        return int(cfg.trainer.get("accumulate_grad_batches") or 1)
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        world = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        world = len(devices)
    else:
        world = max(1, torch.cuda.device_count())
    world *= int(cfg.trainer.num_nodes)
    per_step = cfg.data.batch_size * world
    if global_batch % per_step:
        raise ValueError(
            f"global_batch_size={global_batch} is not a multiple of data.batch_size "
            f"({cfg.data.batch_size}) x devices ({world})"
        )
    return global_batch // per_step


def _val_check_batches(interval, accumulation: int):
    """trainer.val_check_interval as Lightning counts it (micro-batches): the config counts
    optimizer steps, as the progress bar does (an int), or gives a fraction of an epoch (a
    float, passed on)."""
    if isinstance(interval, int) and not isinstance(interval, bool):
        return interval * accumulation
    return interval


def _instantiate_dict(node) -> list:
    return [hydra.utils.instantiate(v) for v in (node or {}).values() if v and "_target_" in v]


def _instantiate_loggers(node) -> list:
    """Loggers of the config; one whose constructor finds its package missing (tensorboard,
    wandb) is skipped with a warning instead of stopping the run. A wrong _target_ is an error."""
    from hydra.errors import InstantiationException

    loggers = []
    for name, spec in (node or {}).items():
        if not spec or "_target_" not in spec:
            continue
        hydra.utils.get_class(spec["_target_"])  # raises for a target that does not exist
        try:
            loggers.append(hydra.utils.instantiate(spec))
        except InstantiationException as exc:
            if not isinstance(exc.__cause__, ImportError):
                raise
            log.warning("logger %r skipped: %s", name, exc.__cause__)
    return loggers


def _log_start(run: Run) -> None:
    """The run folder and the unigram entropy in the log; the config and the entropy to the
    loggers."""
    entropy = run.entropy
    log.info("run folder: %s", run.output_dir)
    log.info(
        "unigram entropy of the training tokens: %.3f nats/token, %.3f bits/byte",
        entropy["nats_per_token"],
        entropy["bits_per_byte"],
    )
    for lg in run.trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(run.cfg, resolve=True))
        lg.log_metrics(
            {
                "data/unigram_entropy_nats": entropy["nats_per_token"],
                "data/unigram_entropy_bpb": entropy["bits_per_byte"],
            },
            step=0,
        )


def _sample(run: Run) -> str | None:
    """The model's continuation of sample.prompt (None when sample.max_new_tokens is 0)."""
    sample = run.cfg.sample
    if sample.max_new_tokens <= 0:
        return None
    return sample_text(
        run.module.model,
        run.datamodule.tokenizer,
        sample.prompt,
        int(sample.max_new_tokens),
        float(sample.temperature),
        int(sample.top_k),
        int(run.cfg.seed),
    )


def sample_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """The prompt and up to max_new_tokens after it, decoded with the model's KV-cache
    ``generate``, within the model's positions: what transformers' ``generate`` can also do
    with the exported folder, whose max_position_embeddings are the same positions. A prompt
    that fills them keeps its last tokens."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    max_len = model.config.max_seqlen
    if max_len is not None:
        ids = ids[-max(1, max_len - 1) :]
        fits = max(0, max_len - len(ids))
        if fits < max_new_tokens:
            log.info(
                "sample: %d new tokens, as the prompt and the model's %d positions allow "
                "(sample.max_new_tokens=%d)",
                fits,
                max_len,
                max_new_tokens,
            )
        max_new_tokens = min(max_new_tokens, fits)
    if max_new_tokens == 0:
        return tokenizer.decode(ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    torch.manual_seed(seed)
    out = model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k)
    return tokenizer.decode(out[0].tolist())


def _mfu(trainer: L.Trainer) -> float | None:
    """MFU as Lightning's ThroughputMonitor last logged it (None when it did not: no loggers,
    fewer batches than its window, no known peak FLOP/s)."""
    mfu = trainer.logged_metrics.get("train/device/mfu")
    return None if mfu is None else float(mfu)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_summary(s: dict) -> None:
    lines = [
        "",
        f"run folder        {s['output_dir']}",
        f"steps             {s['global_step']}  ({s['tokens_seen']:,} tokens from step 0)",
        f"this run          steps {s['first_step']} to {s['global_step']}: "
        f"{s['tokens_trained']:,} tokens in {s['train_s']:.0f} s of training, "
        f"{_fmt(s['tokens_per_s'], ',.0f')} tokens/s, MFU {_fmt(s['mfu'], '.1%')} "
        f"({s['wall_s']:.0f} s with set-up)",
        f"train loss        {_fmt(s['train_loss'])} nats/token",
        f"val loss          {_fmt(s['val_loss'])} nats/token   "
        f"(unigram entropy {s['unigram_entropy_nats']:.3f})",
        f"val bits/byte     {_fmt(s['val_bpb'])}              "
        f"(unigram entropy {s['unigram_entropy_bpb']:.3f})",
        f"checkpoints       last {s['last_checkpoint']}",
        f"                  best {s['best_checkpoint']}",
        f"hugging face      {s['hf_folder']}",
    ]
    if s.get("cpu_threads") is not None:
        lines.append(f"cpu threads       {s['cpu_threads']}")
    if s["sample"] is not None:
        lines += ["", "--- sample " + "-" * 60, s["sample"], "-" * 71]
    text = "\n".join(lines)
    print(text, flush=True)
    Path(s["output_dir"], "summary.txt").write_text(text.lstrip("\n") + "\n")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cgroup cpusets, SLURM
    allocations), or os.cpu_count() where the OS has no sched_getaffinity."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(setting, accelerator: str, devices) -> int | None:
    """Intra-op threads for training on the CPU (None: leave PyTorch's default).

    "auto": the cores this process may run on (:func:`available_cores`), shared among the
    processes of a CPU DDP run. Other jobs on the machine are not subtracted (a load average
    lags by a minute, and a run started beside any job would train on one thread); with
    cores shared on purpose, give the number (cpu_threads=N).
    """
    if setting in (None, "none") or accelerator not in ("cpu", "auto"):
        return None
    if accelerator == "auto" and torch.cuda.is_available():
        return None
    if setting != "auto":
        return max(1, int(setting))
    procs = devices if isinstance(devices, int) and devices > 0 else 1
    return max(1, available_cores() // procs)


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, which also runs CPU processes (gloo), as PyTorch's FSDP
    does when given the CPU as its device: how FSDP is tested without GPUs. Lightning
    refuses its own class exactly on a CPU accelerator and hands FSDP no device there."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )

    def _determine_device_ids(self):
        return None if self.root_device.type == "cpu" else super()._determine_device_ids()


def fsdp_strategy(
    wrap_modules=("flash_attn.modules.block.Block",),
    activation_checkpointing: bool = False,
    **kwargs,
):
    """Lightning's FSDPStrategy wrapping each transformer block (named by import path, so a
    YAML file can say which), optionally with activation checkpointing of those blocks."""
    classes = {hydra.utils.get_class(name) for name in wrap_modules}
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = classes
    return BlockFSDPStrategy(auto_wrap_policy=classes, **kwargs)


def main_env_defaults() -> None:
    """Quiet defaults for the entry point (fork-safe tokenizers, no telemetry)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
