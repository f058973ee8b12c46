"""Train pix2pix: `accelerate launch pipeline/train.py --config CONFIG.yaml [--section.key=value]`.

One process per device, on one machine or many, as the accelerate config says. This
file composes the pieces (config, models, data stream, GAN step, checkpoints,
evaluation, logs) and holds no model, loss or data detail of its own.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback

import torch
from accelerate import Accelerator

from pipeline import (
    checkpoint,
    cli,
    data,
    distributed,
    elastic,
    faults,
    jsonl,
    lease,
    progress,
    realism,
    startup,
    storage,
    tracking,
)
from pipeline.config import Config, ConfigError, from_cli, to_dict, to_yaml
from pipeline.engines import make_engines
from pipeline.errors import RunError
from pipeline.gan import train_step, train_step_accumulated
from pipeline.losses import Pix2PixObjective, VGGLoss
from pipeline.validation import Evaluator, log0

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up

class NonFiniteError(RunError):
    """A NaN or inf in a step under train.on_nonfinite=stop; the message names the step."""


# --------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator, stop: distributed.StopRequest,
                 plan: startup.RunPlan, held: lease.Lease | None = None):
        self.cfg, self.acc, self.lease = cfg, accelerator, held  # the run folder's lease: rank 0's
        self.plan = plan  # what the start-up gate decided: read here, never decided again
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.global_batch = plan.layout.global_batch  # samples per update (elastic.keep_global_batch's)
        self.engines = make_engines(cfg, accelerator, plan.engine)
        self.objective = make_objective(cfg, accelerator.device)
        self.loader = data.make_train_loader(
            cfg.data, rank=self.rank, world_size=self.world, seed=cfg.train.seed,
            in_channels=cfg.model.in_channels, out_channels=cfg.model.out_channels,
            have_batch_all_ranks=lambda flag: distributed.all_ranks(flag, accelerator.device),
            gather_all_ranks=distributed.gather_objects, accumulate=cfg.train.grad_accum,
            multiple=cfg.model.size_multiple)
        self.evaluator = Evaluator(cfg, accelerator, self.engines, stop, plan.metrics, plan.paths.metrics)
        self.step = self.resumed_step = 0
        self.stop = stop  # installed first thing: a signal during set-up is kept too
        self.skipped: list[str] = []  # this step's updates not applied: "D", "G"
        self.stopping = False  # every rank agreed to stop after this step
        self.hooks = self.engines.guarded_hooks(self.nonfinite_gradients)
        if cfg.train.freeze_global_steps:  # pix2pixHD's staged training: the enhancer first
            self.hooks = self.engines.freeze(self.hooks, self.engines.generator.frozen_part(),
                                             lambda: self.step < cfg.train.freeze_global_steps)
        self.best: float | None = None  # train.best_metric's best value so far (main process)
        self.keys = elastic.KeyRecord(plan.paths.keys) if cfg.data.record_keys else None
        self.step_batches: list[tuple[int, list[str]]] = []  # this step's (epoch, keys), for self.keys

    def resume(self) -> None:
        """From the plan's checkpoint (the gate chose and checked it), or a fresh start."""
        path = self.plan.resume_from
        if path is None:
            if self.plan.resume:
                log0(self.acc, f"resume: no checkpoint in {self.plan.paths.run_dir} yet, starting fresh")
            self.initialise()
            return
        state = checkpoint.load(path, rank=self.rank, world_size=self.world, load_models=self.engines.load)
        self.step = self.resumed_step = state.step
        self.best = self.recorded_best()
        self.loader.load_state_dict(state.data_states)
        if self.keys:
            self.keys.cut(self.step)
        if state.world_size == self.world:
            log0(self.acc, f"resumed from {path} at step {self.step}")
        else:
            log0(self.acc, f"resumed from {path} at step {self.step}; it was saved with "
                           f"{state.world_size} processes, this run has {self.world}: the data stream "
                           f"continues epoch {self.loader.epoch} at global sample {self.loader.consumed} "
                           "and RNGs are reseeded")
            torch.manual_seed(self.cfg.train.seed * 100003 + self.rank * 7919 + self.step)

    def initialise(self) -> None:
        """A fresh run's G from model.init_from, on every rank alike."""
        source_path = self.cfg.model.init_from
        if not source_path:
            return
        source, info = checkpoint.load_generator(source_path)
        try:
            self.engines.initialise_generator(source, info.model.generator)
        except (ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's shapes
            raise ConfigError(f"model.init_from: {source_path}: {str(err).splitlines()[0]}") from None
        log0(self.acc, f"G initialised from {source_path} (a {info.model.generator} generator, "
                       f"step {info.step})")

    def recorded_best(self) -> float | None:
        """The value metrics.jsonl holds for the checkpoint the `best` marker names."""
        name = checkpoint.marked(self.plan.paths.checkpoints, checkpoint.BEST)
        if not (name and self.cfg.train.best_metric and self.acc.is_main_process):
            return None
        record = self.evaluator.recorded(int(name.removeprefix("step_")))
        return None if record is None else record.get(realism.value_key(self.cfg.train.best_metric))

    def improved(self, result: dict | None) -> bool:
        """Whether this step's validation beat the best so far (the main process decides,
        every rank gets the same answer)."""
        metric = self.cfg.train.best_metric
        value = None if not (metric and result and self.step) else result.get(realism.value_key(metric))
        better = self.acc.is_main_process and value is not None and realism.better(metric, value, self.best)
        if distributed.any_rank(better, self.acc.device):
            if better:
                log0(self.acc, f"step {self.step}: best {metric} so far ({value:.4g}, was "
                               f"{'none' if self.best is None else f'{self.best:.4g}'})")
            self.best = value
            return True
        return False

    def lease_lost(self) -> bool:
        return self.lease is not None and self.lease.lost is not None

    def raise_lease_lost(self) -> None:
        """On every rank: the folder has another writer now (rank 0's lease says who)."""
        if self.lease is not None:
            self.lease.check()
        raise lease.LeaseLost("rank 0 lost the run folder's lease to another process: stopping "
                              "without writing to it")

    def save(self, best: bool = False) -> None:
        if distributed.any_rank(self.lease_lost(), self.acc.device):
            self.raise_lease_lost()
        e = self.engines
        snapshot = checkpoint.Snapshot(
            save_models=e.save, generator_state=e.generator_state_fp32(),
            discriminator_state=e.discriminator.state_dict(), data_state=self.loader.state_dict(),
            config=to_dict(self.cfg), precision=self.plan.precision.used,
            data_layout=self.plan.data_layout, data_size=self.plan.data_size)
        ranks = checkpoint.Ranks(self.rank, self.world, distributed.barrier,
                                 lambda flag: distributed.any_rank(flag, self.acc.device))
        path = checkpoint.save(self.cfg.train.run_dir, self.step, snapshot, ranks,
                               keep_last=self.cfg.train.keep_last, best=best)
        log0(self.acc, f"step {self.step}: checkpoint {path}")
        if self.cfg.train.mirror and self.acc.is_main_process:
            self.mirror(path)

    def mirror(self, path: str) -> None:
        """A failed copy costs the mirror one checkpoint, never the run: the local one
        is committed, the mirror's marker still names its last complete copy, and the
        next checkpoint tries again."""
        try:
            checkpoint.mirror(path, self.cfg.train.mirror)
        except (storage.StorageError, OSError) as err:
            log0(self.acc, f"step {self.step}: mirror to {self.cfg.train.mirror} failed ({err}); "
                           "the local checkpoint is intact, the next one is mirrored again")

    def periodic(self, every: int) -> bool:
        return every > 0 and self.step % every == 0 and self.step < self.cfg.train.max_steps

    def next_batches(self, batch_iter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The next update's train.grad_accum batches (the loader's), on the device:
        (inputs, targets)."""
        update = next(batch_iter)
        xs, ys, self.step_batches = [], [], [(update.epoch, batch["key"]) for batch in update.batches]
        for batch in update.batches:
            x, y = data.to_device(batch, self.acc.device, cfg=self.cfg.data,
                                  channels_last=self.engines.channels_last)
            if faults.triggered("train.nonfinite_batch"):  # tests: NaN through the real step
                x = torch.full_like(x, float("nan"))
            xs.append(x)
            ys.append(y)
        return xs, ys

    def train_one_step(self, batch_iter) -> tuple[dict, float, float]:
        """(losses, seconds waiting for data, seconds in total)."""
        start = time.perf_counter()
        xs, ys = self.next_batches(batch_iter)
        waited = time.perf_counter() - start
        e = self.engines
        buffers = [b.clone() for b in self.buffers()] if self.cfg.train.on_nonfinite == "skip" else None
        self.skipped = []
        if len(xs) == 1:  # the pix2pix step itself
            losses = train_step(e.G, e.D, e.opt_G, e.opt_D, xs[0], ys[0], self.objective, self.hooks)
        else:
            losses = train_step_accumulated(e.G, e.D, e.opt_G, e.opt_D, xs, ys, self.objective, self.hooks)
        finite = all(math.isfinite(v) for v in losses.values())
        # one collective a step for the two things all ranks must agree on
        nonfinite, self.stopping, lost = distributed.any_rank_each(
            [not finite, self.stop.requested, self.lease_lost()], self.acc.device)
        if lost:
            self.raise_lease_lost()
        if nonfinite or self.skipped:
            self.nonfinite_step(losses, buffers)
        if "G" not in self.skipped:
            e.update_ema()
        e.step_schedulers()
        return losses, waited, time.perf_counter() - start

    def buffers(self) -> list[torch.Tensor]:
        return [b for m in self.engines.modules() for b in m.buffers()]

    def nonfinite_gradients(self, model) -> None:
        """Called by the guarded step instead of an update with NaN or inf gradients."""
        which = "D" if model is self.engines.D else "G"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"step {self.step + 1}: non-finite gradients in {which}; stopped "
                                 f"before applying them (train.on_nonfinite=stop); "
                                 f"{self.newest_checkpoint()}")
        self.skipped.append(which)

    def nonfinite_step(self, losses: dict, buffers: list[torch.Tensor] | None) -> None:
        """A step whose losses (on some rank) or gradients held a NaN or an inf."""
        step = self.step + 1
        if buffers is None:  # stop; or DeepSpeed, where the update may be applied already
            raise NonFiniteError(f"step {step}: non-finite loss {losses} (on some rank); "
                                 f"stopped (train.on_nonfinite=stop), no checkpoint written "
                                 f"with these weights; {self.newest_checkpoint()}")
        # the forward passes already folded the bad batch into BatchNorm's running stats
        with torch.no_grad():
            for buffer, saved in zip(self.buffers(), buffers):
                buffer.copy_(saved)
        log0(self.acc, f"step {step}: non-finite loss or gradients; updates skipped: "
                       f"{', '.join(self.skipped) or 'none (finite gradients)'} "
                       "(train.on_nonfinite=skip)")

    def newest_checkpoint(self) -> str:
        path = checkpoint.latest(self.plan.paths.run_dir)
        return f"the newest checkpoint is {path}" if path else "no checkpoint written yet"

    def log(self, losses: dict, waited: float, elapsed: float) -> None:
        batch = self.global_batch
        scalars = {f"train/{k}": v for k, v in losses.items()}
        scalars.update({"train/lr": self.engines.lr(),
                        "perf/samples_per_s": batch / max(elapsed, 1e-9),
                        "perf/data_wait_share": waited / max(elapsed, 1e-9)})
        # every rank's skips (a shard one rank could not read shows in rank 0's log too)
        skipped = distributed.sum_counts(self.loader.skipped)
        scalars.update({f"data/skipped_{k}": v for k, v in skipped.items()})
        scalars["train/skipped_updates"] = len(self.skipped)  # non-finite gradients
        self.acc.log(scalars, step=self.step)
        if self.acc.is_main_process:  # a plain record of every logged step, for people and tests
            record = {"step": self.step, **scalars}
            if self.skipped:
                record["skipped"] = self.skipped
            jsonl.append(self.plan.paths.train_log, [record])

    def run(self) -> int:
        cfg = self.cfg
        if self.step == 0 and cfg.train.eval_at_start:
            self.evaluator.metrics(0)  # the untrained baseline
            if self.evaluator.abandoned:
                return self.stop_now()
        bar = progress.Progress(cfg.train.max_steps, initial=self.step, desc="step", unit="step",
                                enabled=self.acc.is_main_process and cfg.log.progress)
        try:
            stopped = self.train_loop(bar)
        finally:
            bar.close()
        return self.stop_now() if stopped else self.finish_run()

    def train_loop(self, bar: progress.Progress) -> bool:
        """Steps, with their logs, evaluations, samples and checkpoints, up to
        train.max_steps (False) or until every rank agreed to stop (True)."""
        cfg = self.cfg
        batch_iter = iter(self.loader)
        wait_total = time_total = 0.0
        while self.step < cfg.train.max_steps:
            losses, waited, elapsed = self.train_one_step(batch_iter)
            self.step += 1
            if self.keys:
                self.keys.write(self.step, self.step_batches)
            wait_total, time_total = wait_total + waited, time_total + elapsed
            if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps or self.skipped:
                self.log(losses, waited, elapsed)
            faults.kill_point("train.step")  # tests: a worker dies mid-run (an OOM kill, a bad GPU)
            bar.update(1, D=f"{losses['loss_D']:.3f}", G=f"{losses['loss_G']:.2f}",
                       L1=f"{losses['loss_G_l1']:.3f}", sps=f"{self.global_batch / max(elapsed, 1e-9):.1f}",
                       wait=f"{wait_total / max(time_total, 1e-9):.0%}")
            if self.stopping:
                return True
            best = self.periodic(cfg.train.eval_every) and self.improved(self.evaluator.metrics(self.step))
            if self.evaluator.abandoned:
                return True
            if self.periodic(cfg.log.sample_every):
                self.evaluator.samples(self.step)
            if self.periodic(cfg.train.ckpt_every) or best:
                self.save(best=best)
        return False

    def stop_now(self) -> int:
        """A stop request every rank agreed on: checkpoint what was trained since the last
        one (nothing before the first step: the folder stays free for the same command)."""
        log0(self.acc, f"step {self.step}: stop requested ({self.stop.signal_name or 'by a peer'}); "
                       + ("checkpointing and exiting" if self.step > self.resumed_step else
                          "nothing trained since the last checkpoint, exiting"))
        if self.step > self.resumed_step:
            self.save()
        return 0

    def finish_run(self) -> int:
        best, final = False, None
        if self.step > self.resumed_step or self.step == 0 or not self.evaluated(self.step):
            final = self.evaluator.metrics(self.step)
            if self.evaluator.abandoned:
                return self.stop_now()
            best = self.improved(final)
            self.evaluator.samples(self.step)
        else:  # resumed with nothing left to do: this state was evaluated and saved already
            final = self.evaluator.recorded(self.step) if self.acc.is_main_process else None
            log0(self.acc, f"step {self.step} of {self.cfg.train.max_steps}: nothing left to train")
        if self.step > self.resumed_step:  # else the checkpoint just loaded is this state
            self.save(best=best)
        digests = distributed.replica_digests(*self.engines.modules())
        if len(set(digests)) != 1:
            raise RuntimeError(f"replicas diverged: parameter digests differ across ranks {digests}")
        log0(self.acc, f"replicas agree: G and D digest {digests[0][:16]} on {len(digests)} rank(s)")
        if final is not None:
            log0(self.acc, f"final val: {self.evaluator.summary(final)} over {final['images']} images"
                           f"{self.ema_note()}")
        return 0

    def evaluated(self, step: int) -> bool:
        """Whether metrics.jsonl holds `step` (rank 0 reads it, every rank hears), or there
        is nothing to evaluate."""
        if not self.evaluator.enabled:
            return True
        return distributed.from_rank0(lambda: self.evaluator.recorded(step) is not None)

    def ema_note(self) -> str:
        """Why a short run with an EMA seems not to have learned: the EMA trails G."""
        decay = self.cfg.train.ema_decay
        horizon = round(1 / (1 - decay)) if decay else 0
        if not decay or self.step >= 3 * horizon:
            return ""
        return (f" (the EMA of G, train.ema_decay {decay}: it averages G over the last ~{horizon} "
                f"steps, so after {self.step} it is still close to the untrained G)")


def main(argv: list[str] | None = None) -> int:
    """The trainer process: parse, check, build, run; the exit code. A user mistake raises a
    UserError (a bad key, path, bucket or checkpoint: one line, exit 2), a failed run a
    RunError (one line, exit 1); see pipeline/cli.py."""
    stop = distributed.StopRequest()  # first: a signal during start-up is kept too
    cfg = parse(argv)
    launch = startup.check_before_launch(cfg)  # before anything is created: one line for what is wrong
    with startup.hold_run_folder(cfg) as held:  # rank 0's lease, before anything is written there
        accelerator, plan = startup.start(cfg, launch, held)
        trainer = build(cfg, accelerator, plan, stop, held)
        return run(trainer)


def parse(argv: list[str] | None) -> Config:
    """The config from the command line, and the log level it names."""
    cfg, _ = from_cli(argv, prog="train.py", description=__doc__.split("\n\n")[0])
    cli.setup_logging(cfg.log.level)
    return cfg


def build(cfg: Config, accelerator: Accelerator, plan: startup.RunPlan, stop: distributed.StopRequest,
          held: lease.Lease | None) -> Trainer:
    """The trainer at the plan's step (resumed, or initialised); the config it runs with
    written into the run folder and logged."""
    trainer = Trainer(cfg, accelerator, stop, plan, held)
    trainer.resume()
    if accelerator.is_main_process:
        storage.write_bytes(plan.paths.config, to_yaml(cfg).encode())
        log0(accelerator, "config:\n" + to_yaml(cfg) + "environment: "
             + json.dumps({**startup.environment(accelerator), **trainer.engines.describe()}))
    return trainer


def run(trainer: Trainer) -> int:
    """The training itself, its tracker's run ended as failed by any exception."""
    accelerator, cfg = trainer.acc, trainer.cfg
    tracking.start(accelerator, cfg.log.tracker, trainer.plan.paths.run_dir, _flat_config(cfg))
    try:
        code = trainer.run()
    except BaseException:
        tracking.end_failed(accelerator)
        raise
    accelerator.end_training()
    return code


def make_objective(cfg: Config, device: torch.device) -> Pix2PixObjective:
    """The loss config as the step takes it; the VGG19 of loss.lambda_vgg loaded here."""
    perceptual = None
    if cfg.loss.lambda_vgg > 0:
        features = realism.load_vgg19_features(realism.weights_dir(cfg.eval.weights_dir))
        perceptual = VGGLoss(features).to(device)
    return Pix2PixObjective(cfg.loss.gan, cfg.loss.lambda_l1, cfg.loss.lambda_feat,
                            cfg.loss.lambda_vgg, perceptual)


def _flat_config(cfg: Config) -> dict:
    """section.key -> value, as trackers' hyper-parameter tables want it."""
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items()
            for key, value in values.items()}


def run_and_exit(argv: list[str] | None = None) -> None:
    """The script's and `python -m pipeline.train`'s entry: exit codes by pipeline/cli.py's
    convention, then a clean exit that never waits for a dead peer."""
    try:
        code = cli.entry_point("train.py", main)(argv)
    except SystemExit as done:  # argparse: --help, or a usage mistake it has reported (cli.Parser)
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except Exception as err:  # noqa: BLE001 - a bug or a lost peer: report, leave without waiting
        traceback.print_exc()
        if lost := distributed.lost_peer(err):  # the line to read in a launcher's log
            print(f"{cli.rank_prefix()}{cli.prog_name('train.py')}: error: {lost}", file=sys.stderr)
        code = 1
    distributed.finish(code)


if __name__ == "__main__":
    run_and_exit()
