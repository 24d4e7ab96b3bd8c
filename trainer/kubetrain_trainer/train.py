"""The train and sanity stages: HF Trainer (pretrain, SFT) or TRL DPOTrainer (DPO) on DeepSpeed.

    torchrun --standalone --nproc_per_node N -m kubetrain_trainer train --config F --workdir W

What kubetrain adds to the libraries: the packed memory-mapped dataset and its resumable sample
stream (data.py), checkpoints that count only when complete and upload in the background
(checkpoint.py), Prometheus telemetry and health checks (callbacks.py), and the refusals of
combinations known to break. Everything else — the loop, mixed precision, ZeRO, LoRA, DPO — is
Trainer, DeepSpeed, PEFT and TRL as they come.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetrain_contract import memory
from kubetrain_contract.exit_codes import EXIT_TERMINATED
from kubetrain_contract.layout import CHECKPOINTS_DIR, checkpoint_name
from kubetrain_contract.methods import METHOD_FORMATS
from kubetrain_trainer import card, checkpoint, data, fit, lifetime, model, storage
from kubetrain_trainer.callbacks import (
    HealthCallback,
    MemoryPeaks,
    PrometheusCallback,
    SampleLedgerCallback,
    StepAccounting,
    StepClock,
    TrainLogCallback,
    flops_per_token,
    peak_flops,
)
from kubetrain_trainer.config import TrainConfig
from kubetrain_trainer.distributed import DistEnv
from kubetrain_trainer.metrics import TrainerMetrics, serve
from kubetrain_trainer.stage import InvalidInput, StageFailure, Unhealthy

log = logging.getLogger(__name__)

#: Which data format each method trains on (api.md).


def refuse_broken_combinations(config: TrainConfig, env: DistEnv, cuda: bool) -> None:
    """The combinations api.md refuses at admission, refused again here (exit 2): the config may
    come from anywhere — an older operator, a hand-edited file, `kubetrain run` on another box.
    Each message names the stage-config field and the fix (the run's field where they differ)."""
    t, dist, adapter = config.training, config.distributed, config.adapter.type
    if config.method == "dpo" and config.model.architecture is not None:
        raise InvalidInput(
            "model.architecture: method dpo needs a trained policy, not random weights — set "
            "model.uri (or model.fromRun in the run) to the model to align, e.g. an SFT run's"
        )
    if adapter != "none" and config.method == "pretrain":
        raise InvalidInput(
            f"method.adapter: a {adapter} adapter with method pretrain — adapters fine-tune a "
            "trained model, pretraining trains all weights; use adapter type none, or method sft"
        )
    if adapter != "none" and config.model.architecture is not None:
        raise InvalidInput(
            f"method.adapter: a {adapter} adapter on model.architecture (random weights) trains "
            "nothing useful and its base is never saved — use adapter type none with "
            "model.architecture, or set model.uri to a trained model"
        )
    if adapter == "qlora" and t.precision == "fp32" and cuda:
        raise InvalidInput(
            "training.precision: qlora computes in bf16 or fp16 on GPUs, not fp32 — use bf16"
        )
    if quantized_optimizer(t.optimizer) and dist.zero_stage >= 1 and env.world_size > 1:
        raise InvalidInput(
            f"training.optimizer: {t.optimizer} with zeroStage {dist.zero_stage} on "
            f"{env.world_size} processes — DeepSpeed does not shard the state of bitsandbytes "
            "optimizers (8-bit, 32-bit or paged); use adamw_torch, or zeroStage: 0"
        )
    if adapter == "qlora" and dist.zero_stage == 3:
        raise InvalidInput(
            "distributed.zeroStage: qlora with ZeRO-3 is not supported — ZeRO-3 would shard the "
            "packed 4-bit base weights, which needs bnb_4bit_quant_storage equal to the compute "
            "dtype and is not proven here; use zeroStage 2 (the 4-bit base is small), or lora"
        )
    if dist.world_size != env.world_size:
        raise InvalidInput(
            f"distributed.worldSize: the plan expects {dist.world_size} processes, the launcher "
            f"started {env.world_size} — launch with torchrun --nproc_per_node matching the plan"
        )
    if dist.zero_stage == 0 and dist.deepspeed is not None:
        raise InvalidInput(
            "distributed.deepspeed: set with zeroStage 0, where DeepSpeed is not used and the "
            "config would be ignored — set distributed.zeroStage to its zero_optimization.stage, "
            "or regenerate the stage config with the operator"
        )
    zero = (dist.deepspeed or {}).get("zero_optimization", {})
    offloaded = [
        name
        for name in ("offload_optimizer", "offload_param")
        if (zero.get(name) or {}).get("device", "none") != "none"
    ]
    if offloaded and dist.zero_stage < 2:
        raise InvalidInput(
            f"distributed.deepspeed: zero_optimization.{offloaded[0]} needs zeroStage 2 or 3, "
            f"zeroStage is {dist.zero_stage} — set distributed.zeroStage: 2 or 3, or "
            "distributed.offload: none in the run"
        )
    if dist.zero_stage >= 1:
        if zero.get("stage") != dist.zero_stage:
            raise InvalidInput(
                f"distributed.deepspeed: zero_optimization.stage is {zero.get('stage')!r}, "
                f"zeroStage is {dist.zero_stage} — regenerate the stage config with the operator"
            )
        if dist.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            raise InvalidInput(
                "distributed.deepspeed: stage 3 without "
                "stage3_gather_16bit_weights_on_model_save would save a final model with no "
                "weights — set it to true, or regenerate the stage config with the operator"
            )
    if t.precision == "fp16" and not cuda:
        raise InvalidInput("training.precision: fp16 needs a GPU — use bf16 or fp32 on CPU")
    model.attention(t.attention, "training.attention")


def quantized_optimizer(name: str) -> bool:
    """An optimizer whose state lives in bitsandbytes (Trainer's own dispatch table: 8-bit,
    32-bit and paged AdamW, Lion, RMSprop, AdEMAMix) or in 8-bit tensors of another library."""
    from transformers import trainer_optimizer

    table = getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", ())
    return name in {str(getattr(o, "value", o)) for o in table} or "8bit" in name


def training_arguments(config: TrainConfig, staging: Path, env: DistEnv, cuda: bool) -> Any:
    """TrainingArguments (DPOConfig for DPO) from the stage config. Creating them starts
    torch.distributed and, for ZeRO-3, makes from_pretrained load straight into shards."""
    t = config.training
    kwargs: dict[str, Any] = {
        "output_dir": str(staging),
        "max_steps": 1,  # the real count is known after the resume point: see run()
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # below 1: a ratio of the total steps
        "weight_decay": t.weight_decay,
        "optim": t.optimizer,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "use_cpu": not cuda,
        "ddp_backend": ("nccl" if cuda else "gloo") if env.world_size > 1 else None,
        "ddp_find_unused_parameters": False,
        "deepspeed": config.distributed.deepspeed if config.distributed.zero_stage else None,
        "activation_checkpointing": t.gradient_checkpointing,
        "torch_compile": t.compile,
        # Every step is logged to the callbacks (health checks see every loss); users get one line
        # per loggingSteps from TrainLogCallback.
        "logging_steps": 1,
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": config.checkpoints.every_steps,
        "save_total_limit": None,  # CheckpointCallback rotates: only complete checkpoints count
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "report_to": "none",
        "disable_tqdm": True,
        "ignore_data_skip": True,  # data.StreamSampler starts at the checkpoint's position
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,  # memory-mapped rows cost microseconds: see bench/train.py
        "restore_callback_states_from_checkpoint": False,
    }
    if config.method == "dpo":
        from trl.trainer.dpo_config import DPOConfig

        assert config.dpo is not None
        return DPOConfig(
            **kwargs,
            beta=config.dpo.beta,
            loss_type=[config.dpo.loss_type],
            max_length=None,
            precompute_ref_log_probs=config.dpo.precompute_reference_log_probs,
        )
    from transformers import TrainingArguments

    return TrainingArguments(**kwargs)


class KubetrainTrainerMixin:
    """Mixed into Trainer and DPOTrainer: kubetrain's sample stream and per-batch accounting."""

    kubetrain_sampler: data.StreamSampler
    kubetrain_accounting: StepAccounting
    kubetrain_rng_checkpoint: str | None = None
    """A resumed run's checkpoint, whose RNG state is restored before its first batch."""

    def _get_train_sampler(self, train_dataset: Any = None) -> data.StreamSampler:
        return self.kubetrain_sampler

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        timed = self.kubetrain_accounting.timed(epoch_iterator)
        batches = super().get_batch_samples(timed, num_batches, device)  # type: ignore[misc]
        if self.kubetrain_rng_checkpoint is not None:
            # Trainer restores the RNG state (dropout masks) only when it skips batches itself;
            # ours starts at the resume position (ignore_data_skip), so restore it here: after
            # the first batch (starting the data iterator draws a seed), before the forward.
            self._load_rng_state(self.kubetrain_rng_checkpoint)  # type: ignore[attr-defined]
            self.kubetrain_rng_checkpoint = None
        return batches

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Any:
        self.kubetrain_accounting.add_batch(inputs.pop(data.STATS_KEY))
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop(data.STATS_KEY, None)
        return super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


def total_steps(config: TrainConfig, rows: int, position: data.StreamPosition) -> int:
    """maxSteps, or enough steps to consume `epochs` passes from where the run stands."""
    t = config.training
    if t.max_steps is not None:
        return t.max_steps
    assert t.epochs is not None
    remaining = max(math.ceil(t.epochs * rows) - position.start_sample, 0)
    return position.start_step + math.ceil(remaining / position.samples_per_step)


@dataclass
class Session:
    """A prepared run: everything built and wired, nothing trained yet (tests add probes here)."""

    config: TrainConfig
    workdir: Path
    env: DistEnv
    metrics: TrainerMetrics | None
    dataset: data.PackedDataset
    tokenizer: Any
    trainer: Any
    position: data.StreamPosition
    resumed: bool
    callbacks: Callbacks
    memory_estimate: memory.Estimate | None = None
    """The estimate the device check made (None: the model could not be counted)."""

    @property
    def health(self) -> HealthCallback:
        return self.callbacks.health

    @property
    def stop(self) -> checkpoint.SignalStop:
        return self.callbacks.stop

    @property
    def saver(self) -> checkpoint.CheckpointCallback:
        return self.callbacks.saver

    def train(self) -> dict[str, Any]:
        """Train to the last step (or a termination signal), save final/ or judge the gate, then
        leave the process group — after a deliberate stop (SIGTERM, health, gate) too, which
        every rank takes. Any other error propagates without it: tearing down while other
        ranks may still wait in a collective can hang (torchtitan makes the same choice)."""
        try:
            result = self._train()
        except StageFailure:
            leave_process_group()
            raise
        leave_process_group()
        return result

    def _train(self) -> dict[str, Any]:
        config, trainer = self.config, self.trainer
        started = time.monotonic()
        estimate = self.memory_estimate.total if self.memory_estimate is not None else None
        if self.metrics is not None and estimate is not None:
            self.metrics.memory_estimate.labels(run=config.run).set(estimate)
        try:
            with lifetime.stop_on_signals(self.callbacks.clock.accounting):
                trainer.train(resume_from_checkpoint=self.resume_dir)
                eval_loss = None
                if self.dataset.rows("validation") and not self.stop.stopped:
                    eval_loss = trainer.evaluate().get("eval_loss")
        except Unhealthy as failed:  # raised by every rank at the same step (HealthCallback)
            failed.details.update(self.measured(estimate))
            raise
        finally:
            self.callbacks.ledger.close()
            self.callbacks.log.close()
            if self.saver.uploader is not None:
                self.saver.uploader.drain()
        measured = self.measured(estimate)
        result: dict[str, Any] = {
            "method": config.method,
            "step": trainer.state.global_step,
            "totalSteps": trainer.state.max_steps,
            "firstLoss": self.callbacks.log.first_loss,
            "loss": self.callbacks.log.last_loss,
            "evalLoss": eval_loss,
            "resumedFrom": self.position.start_step if self.resumed else None,
            "trainSeconds": round(time.monotonic() - started, 3),
            "checkpoint": self.last_checkpoint(),
            **measured,
        }
        if self.stop.stopped:
            raise StageFailure(
                EXIT_TERMINATED,
                f"terminated after step {trainer.state.global_step}; checkpoint saved, rerun "
                "to resume",
                result,
            )
        if config.sanity is not None:
            try:
                result["sanity"] = self.health.judge_gate()
            except Unhealthy as failed:  # a failed rung's figures are reported too
                failed.details.update(measured)
                raise
            if self.env.rank == 0:
                storage.write_text(
                    storage.join(config.output_uri, "metrics.json"),
                    json.dumps(result, indent=2, sort_keys=True),
                    config.s3,
                )
            return result
        result["outputs"] = {"final": self.save_final()}
        return result

    def measured(self, estimate: int | None) -> dict[str, Any]:
        """The result's peak memory (each figure's maximum over the ranks: a collective, which
        every rank must take) beside the estimate, and the throughput at the end."""
        device = self.trainer.args.device
        peaks = MemoryPeaks.measure(device).max_over_ranks(device, self.env.world_size)
        return {**peaks.result(estimate), "tokensPerSecond": self.callbacks.log.tokens_per_second}

    @property
    def resume_dir(self) -> str | None:
        if not self.resumed:
            return None
        return str(self.saver.staging / checkpoint_name(self.position.start_step))

    def last_checkpoint(self) -> dict[str, Any] | None:
        step = self.saver.last_step
        if step is None:
            return None
        uri = storage.join(self.config.output_uri, CHECKPOINTS_DIR, checkpoint_name(step))
        return {"step": step, "uri": uri}

    def card_fields(self) -> dict[str, Any]:
        """final/'s model card: what was trained; evaluation comes with the merge stage."""
        config, splits = self.config, self.dataset.manifest["splits"]
        return {
            "run": config.run,
            "summary": f"A {config.method} run of kubetrain"
            + (
                " (the adapter only; merged/ holds it merged)."
                if config.adapter.type != "none"
                else "."
            ),
            "method": config.method,
            "base": config.model.uri or card.FROM_SCRATCH,
            "adapter": config.adapter.type,
            "steps": self.trainer.state.global_step,
            "dataset": self.dataset.key,
            "train_tokens": splits["train"].get("tokens"),
            "block_size": self.dataset.block_size,
            "perplexity": "not evaluated (the merge stage evaluates)",
            "eval_tokens": 0,
            "precision": config.training.precision,
        }

    def save_final(self) -> str:
        """final/: the model (or adapter) in safetensors with its tokenizer, `COMPLETE` last."""
        config = self.config
        out = checkpoint.ModelDir.of(config.output_uri, "final", self.workdir)
        self.trainer.save_model(str(out.building))  # every rank: ZeRO-3 gathers weights for rank 0
        if self.env.rank != 0:
            return out.uri
        self.tokenizer.save_pretrained(str(out.building))
        # A pickle of TrainingArguments: not loadable safely, and the stage config says it all.
        (out.building / "training_args.bin").unlink(missing_ok=True)
        card.write(out.building, self.card_fields())
        out.publish(
            {"run": config.run, "step": self.trainer.state.global_step},
            s3=config.s3,
            what=f"final model → {out.uri}",
            metrics=self.metrics,
        )
        log.info("final model: %s", out.uri)
        return out.uri


def leave_process_group() -> None:
    """Destroy the process group while the interpreter is whole. Left to interpreter exit, Gloo's
    worker threads can abort the process ("terminate called without an active exception",
    SIGABRT): a rank that finished its work exits -6 and torchrun fails the node."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_dataset(config: TrainConfig, dataset: data.PackedDataset) -> None:
    """The dataset fits the method and has something to train on."""
    if dataset.format not in METHOD_FORMATS[config.method]:
        raise InvalidInput(
            f"method: {config.method} trains on {' or '.join(METHOD_FORMATS[config.method])} data, "
            f"the dataset is {dataset.format} — set data.format accordingly"
        )
    if not dataset.rows("train"):
        raise InvalidInput(
            f"datasetPointer: the dataset {dataset.key[:12]} at {dataset.root} has no training "
            "rows — check data.train and the rejected-row counts in its manifest.json, then "
            "rerun preprocessing"
        )


@dataclass(frozen=True)
class Inputs:
    """The local directories of the model and tokenizer (None: built / the dataset's)."""

    model_dir: Path | None
    tokenizer_dir: Path | None


def fetch_inputs(config: TrainConfig, workdir: Path, *, fetch: bool) -> Inputs:
    """Local copies of `model.uri` and `tokenizerUri`. S3 prefixes are downloaded by one process
    per node (`fetch=True`, run under `main_process_first(local=True)`); the others only name
    the directory it filled. Local and pvc paths are used in place. The same URI is fetched once
    even when both fields name it (a model directory usually holds its tokenizer)."""
    fetched: dict[str, Path] = {}

    def local(uri: str | None, what: str) -> Path | None:
        if uri is None:
            return None
        if uri not in fetched:
            fetched[uri] = model.local_dir(uri, workdir, config.s3, what, fetch=fetch)
        return fetched[uri]

    return Inputs(
        model_dir=local(config.model.uri, "model.uri"),
        tokenizer_dir=local(config.tokenizer_uri, "tokenizerUri"),
    )


def load_policy(config: TrainConfig, model_dir: Path | None, tokenizer: Any, device: str) -> Any:
    """The starting model, seeded so that a built model (and a reference copy) is reproducible."""
    from transformers import set_seed

    set_seed(config.training.seed)
    if config.distributed.zero_stage == 3 and torch.distributed.is_initialized():
        # from_pretrained loads into shards under deepspeed.zero.Init, whose config counts the
        # processes of DeepSpeed's own comm layer: on CPU (gloo) Accelerate started only
        # torch.distributed, so DeepSpeed saw one process and refused the batch arithmetic.
        # init_distributed adopts the existing process group.
        import deepspeed  # type: ignore[import-untyped]

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    return model.load_base(
        config.model,
        model_dir,
        tokenizer,
        adapter=config.adapter,
        precision=config.training.precision,
        weight_precision=config.training.weight_precision,
        attn_implementation=config.training.attention,
        device=device,
    )


def make_trainer(
    config: TrainConfig,
    args: Any,
    tokenizer: Any,
    dataset: data.PackedDataset,
    model_dir: Path | None,
) -> Any:
    """The library trainer for the method, with kubetrain's collator (sampler set by prepare)."""
    from transformers import PrinterCallback, Trainer

    device = str(args.device)
    policy = load_policy(config, model_dir, tokenizer, device)
    model.check_compatible(policy, tokenizer, dataset.manifest)
    adapter = config.adapter.type != "none"
    trainer: Any
    if config.method == "dpo":
        from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

        class KubetrainDPOTrainer(KubetrainTrainerMixin, DPOTrainer):
            """DPOTrainer on kubetrain's dataset. With precomputeReferenceLogProbs and no
            adapter, no reference copy is ever loaded: TRL 1.16 (`ref_model=None`) computes the
            reference log-probabilities with the policy itself in `__init__`, before its first
            step, and keeps no reference (`ref_model` stays None). Under DeepSpeed it wraps the
            policy in an inference engine for that pass and keeps it for later `evaluate`
            datasets; kubetrain evaluates only the datasets given here (precomputed too), so the
            engine is dropped once they are done. A resumed run precomputes again: the policy
            still holds the starting weights until `train` loads the checkpoint, and the
            log-probabilities live in this process's temporary cache only."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._precompute_engine = None

            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset  # tokenized by the preprocess stage

            def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
                inputs.pop(data.STATS_KEY, None)  # the precompute pass: not a training batch
                return super().compute_ref_log_probs(model, inputs)  # type: ignore[no-untyped-call]

        assert config.dpo is not None
        own_reference = not adapter and not config.dpo.precompute_reference_log_probs
        trainer = KubetrainDPOTrainer(
            model=policy,
            # Full DPO: a frozen copy of the starting policy (in the same dtype), unless its
            # log-probabilities are precomputed. Adapters: the base with the adapter disabled,
            # which is TRL's default with peft_config.
            ref_model=load_policy(config, model_dir, tokenizer, device) if own_reference else None,
            peft_config=model.lora_config(config.adapter) if adapter else None,
            args=args,
            train_dataset=dataset.preference_split("train"),
            eval_dataset=dataset.preference_split("validation"),
            data_collator=dataset.collator(
                DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id),
                prompt_limit=config.dpo.max_prompt_length,
            ),
            processing_class=tokenizer,
        )
    else:

        class KubetrainTrainer(KubetrainTrainerMixin, Trainer):
            pass

        if adapter:
            policy = model.attach_adapter(
                policy, config.adapter, config.training.gradient_checkpointing
            )
        trainer = KubetrainTrainer(
            model=policy,
            args=args,
            train_dataset=dataset.split("train"),
            eval_dataset=dataset.split("validation"),
            data_collator=dataset.collator(),
            processing_class=tokenizer,
        )
    trainer.remove_callback(PrinterCallback)  # TrainLogCallback logs, through logging
    return trainer


def open_inputs(
    config: TrainConfig, workdir: Path, args: Any
) -> tuple[data.PackedDataset, Inputs, Any]:
    """The dataset, model and tokenizer directories and the tokenizer. One fetch and check per
    node: the node's first process downloads (S3, hf://) and verifies while the others wait, then
    they open what it fetched. Only downloads happen here — loading the model may be collective
    (ZeRO-3) and comes after."""
    first = args.local_process_index == 0
    with args.main_process_first(local=True, desc="dataset, model and tokenizer download"):
        dataset = data.open_dataset(config.dataset_pointer, workdir, config.s3, check=first)
        check_dataset(config, dataset)  # before a model download that would be wasted
        inputs = fetch_inputs(config, workdir, fetch=first)
    if not dataset.rows("validation") and args.eval_strategy != "no":
        log.warning("training.evalSteps: the dataset has no validation split; not evaluating")
        args.eval_strategy = "no"
    tokenizer = (
        model.load_tokenizer(inputs.tokenizer_dir, "tokenizerUri")
        if inputs.tokenizer_dir is not None
        else model.load_tokenizer(
            dataset.tokenizer_dir,
            "datasetPointer",
            "the dataset's tokenizer/ is missing: rerun preprocessing, or set tokenizerUri",
        )
    )
    return dataset, inputs, tokenizer


@dataclass(frozen=True)
class Callbacks:
    """kubetrain's callbacks, in the order they run (the clock first: its all-reduce decides a
    pending stop for SignalStop; the ledger flushes before CheckpointCallback commits a save)."""

    clock: StepClock
    ledger: SampleLedgerCallback
    prometheus: PrometheusCallback | None
    log: TrainLogCallback
    health: HealthCallback
    stop: checkpoint.SignalStop
    saver: checkpoint.CheckpointCallback

    def in_order(self) -> list[Any]:
        first = [self.clock, self.ledger, *([self.prometheus] if self.prometheus else [])]
        return [*first, self.log, self.health, self.stop, self.saver]


def make_callbacks(
    config: TrainConfig,
    *,
    workdir: Path,
    env: DistEnv,
    cuda: bool,
    metrics: TrainerMetrics | None,
    trainer: Any,
    dataset: data.PackedDataset,
    position: data.StreamPosition,
    layout: checkpoint.CheckpointLayout,
    meta_now: dict[str, Any],
) -> Callbacks:
    t, rows = config.training, dataset.rows("train")
    accounting = trainer.kubetrain_accounting
    clock = StepClock(accounting=accounting, rows=rows, position=position)
    prometheus = None
    if metrics is not None:
        prometheus = PrometheusCallback(
            metrics=metrics,
            clock=clock,
            rank=env.rank,
            world_size=env.world_size,
            flops_per_token=flops_per_token(
                trainer.model.config, dataset.block_size, adapter=config.adapter.type != "none"
            ),
            peak_flops=peak_flops(torch.cuda.get_device_name() if cuda else "cpu", t.precision),
        )
    saver = checkpoint.CheckpointCallback(
        staging=layout.staging,
        finalizer=layout.finalizer,
        keep=config.checkpoints.keep,
        position=position,
        run_meta=meta_now,
        metrics=metrics,
    )
    if layout.remote_root is not None and layout.finalizer:
        saver.uploader = checkpoint.Uploader(
            remote_root=layout.remote_root,
            s3=config.s3,
            node=env.node,
            nodes=env.nodes,
            keep=config.checkpoints.keep,
            metrics=metrics,
            on_complete=saver.completed,
        )
    return Callbacks(
        clock=clock,
        ledger=SampleLedgerCallback(
            accounting=accounting,
            workdir=workdir,
            stage=config.stage,
            rank=env.rank,
            every=t.logging_steps,
        ),
        prometheus=prometheus,
        log=TrainLogCallback(
            clock=clock,
            workdir=workdir,
            stage=config.stage,
            rank=env.rank,
            logging_steps=t.logging_steps,
            prometheus=prometheus,
        ),
        health=HealthCallback(
            max_grad_norm_abort=t.max_grad_norm_abort,
            gate=config.sanity,
            window=t.logging_steps,
            metrics=metrics,
            fp16=t.precision == "fp16",
        ),
        stop=checkpoint.SignalStop(accounting),
        saver=saver,
    )


def prepare(config: TrainConfig, workdir: Path) -> Session:
    """Check the config, open the data, find the resume point, build the model and the trainer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # stages log lines
    workdir.mkdir(parents=True, exist_ok=True)
    env = DistEnv.from_environ()
    cuda = torch.cuda.is_available()
    refuse_broken_combinations(config, env, cuda)
    metrics = TrainerMetrics(config.run) if env.rank == 0 else None
    if metrics is not None:
        serve(metrics.registry, config.metrics_port)
    layout = checkpoint.CheckpointLayout.of(config, workdir, env)
    args = training_arguments(config, layout.staging, env, cuda)
    dataset, inputs, tokenizer = open_inputs(config, workdir, args)
    estimate = check_memory(config, inputs, tokenizer, env)
    meta_now = checkpoint.run_meta(config, env, dataset.key)
    position, resumed = checkpoint.find_resume_point(config, layout, env, meta_now, args)
    rows = dataset.rows("train")
    args.max_steps = total_steps(config, rows, position)
    if metrics is not None:  # a resumed stage shows where it stands before its first step
        metrics.step.labels(run=config.run).set(position.start_step)
        metrics.total_steps.labels(run=config.run).set(args.max_steps)

    trainer = make_trainer(config, args, tokenizer, dataset, inputs.model_dir)
    trainer.kubetrain_accounting = StepAccounting(world_size=env.world_size, device=args.device)
    if resumed:
        trainer.kubetrain_rng_checkpoint = str(
            layout.staging / checkpoint_name(position.start_step)
        )
    trainer.kubetrain_sampler = data.StreamSampler(
        rows, config.training.seed, position.start_sample, position.at(args.max_steps)
    )
    callbacks = make_callbacks(
        config,
        workdir=workdir,
        env=env,
        cuda=cuda,
        metrics=metrics,
        trainer=trainer,
        dataset=dataset,
        position=position,
        layout=layout,
        meta_now=meta_now,
    )
    for callback in callbacks.in_order():
        trainer.add_callback(callback)
    return Session(
        config=config,
        workdir=workdir,
        env=env,
        metrics=metrics,
        dataset=dataset,
        tokenizer=tokenizer,
        trainer=trainer,
        position=position,
        resumed=resumed,
        callbacks=callbacks,
        memory_estimate=estimate,
    )


def check_memory(
    config: TrainConfig, inputs: Inputs, tokenizer: Any, env: DistEnv
) -> memory.Estimate | None:
    """The device check, before any weight is loaded: the model's shape from its config.json
    (or the architecture with the tokenizer's size) against this process's GPU (fit.py)."""
    arch = config.model.architecture
    if arch is not None:
        shape: memory.ModelShape | None = memory.ModelShape.from_architecture(
            arch.model_dump(by_alias=True), len(tokenizer)
        )
    else:
        assert inputs.model_dir is not None
        shape = fit.shape_of_dir(inputs.model_dir, "model.uri")
    setup = memory.Setup.from_dict(config.memory.setup)
    return fit.check_device(setup, shape, env.local_rank)


def run(config: TrainConfig, workdir: Path) -> dict[str, Any]:
    """The train/sanity stage: lock the output (rank 0), prepare, train, save or judge."""
    rank_zero = DistEnv.from_environ().rank == 0
    with lifetime.OutputLock(config.output_uri, config.stage) if rank_zero else nullcontext():
        return prepare(config, workdir).train()
