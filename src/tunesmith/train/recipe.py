"""`tunesmith train`: setup -> train -> save, in one readable loop for every stage (stages/ say what differs).

One optimizer step = `gradient_accumulation_steps` micro-batches. The loss is the sum of token cross-entropies
divided by the number of supervised tokens in the whole accumulated batch (across all ranks), so batch 4 x
accumulation 1 and batch 2 x accumulation 2 give the same gradients.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.config.validate import raise_if, validate_for_train
from tunesmith.errors import StopError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import fsdp
from tunesmith.train.launch import launch, processes_wanted
from tunesmith.train.logger import TrainLogger, plot_losses, write_results
from tunesmith.train.memory import recompute_cheap_activations
from tunesmith.train.objectives import averaged
from tunesmith.train.passes import PassResult
from tunesmith.train.profile import choose_profile
from tunesmith.train.resume import find_resume_point, saved_config, start_fresh, trim_log
from tunesmith.train.setup import Setup, build_setup

log = logging.getLogger("tunesmith.train")


class Trainer:
    def __init__(self, cfg: Config, s: Setup):
        self.cfg, self.s = cfg, s
        t = cfg.training
        self.accum = t.gradient_accumulation_steps
        self.out = Path(t.output_dir)  # type: ignore[arg-type]
        self.total_steps = s.total_steps
        self.eval_every = t.eval_steps or t.logging_steps
        self.state = ckpt.TrainerState()
        self.window = self.new_window()
        self.last_saved: Path | None = None
        self.run_loss = {"loss": 0.0, "units": 0}
        self.logger: TrainLogger | None = None
        self.passes = s.profile.prepare(s)  # how a step's samples become passes, and how they run
        self.iterations = getattr(s.objective, "iterations", 1)
        self.save_due = False

    @staticmethod
    def new_window() -> dict[str, Any]:
        return {"sums": {}, "units": 0, "time": time.time(), "all_tokens": 0}

    # ---------------------------------------------------------------- one optimizer step
    def optimizer_step(self, window: list[list[list[int]]]) -> dict[str, Any]:
        s, acc, objective = self.s, self.s.accelerator, self.s.objective

        def to_batch(units: list[list[int]]) -> tuple[Any, float]:
            # A rank whose share of the last batch is empty still runs a sample, weighted 0, so DDP stays in step.
            return objective.collate(s.data.train, units or [[0]]).to(acc.device), 1.0 if units else 0.0

        plan = self.passes.plan(window).map(to_batch)
        local = sum(objective.count(b) * weight for b, weight in plan.every())
        n_global = int(acc.reduce(torch.tensor(local, device=acc.device), "sum"))
        s.model.train()
        # DDP and ZeRO average gradients over ranks; scaling by world size turns that into a global mean.
        scale = acc.num_processes / max(n_global, 1)
        metrics = self.passes.run(plan, lambda passes, collect: self.run_passes(passes, scale, collect))
        sums = {name: sum((m[name].float() for m in metrics), torch.zeros((), device=acc.device))
                for name in objective.metric_names}
        grad_norm = s.stepper.update()
        s.scheduler.step()
        all_tokens = sum(b.n_tokens * w for b, w in plan.every())
        return {"sums": {k: float(acc.reduce(v, "sum")) for k, v in sums.items()}, "units": n_global,
                "grad_norm": grad_norm, "all_tokens": all_tokens * acc.num_processes}

    def run_passes(self, passes: list[tuple[Any, float]], scale: float, collect_grads: bool = False) -> PassResult:
        """Forward and backward of each (batch, weight): the backward accumulates into .grad, or, with
        `collect_grads` (a worker thread of the CPU's parallel passes), into gradients returned with the metrics."""
        s, objective = self.s, self.s.objective
        result = PassResult([])
        for k, (batch, weight) in enumerate(passes):
            s.profile.before_pass()
            with torch.enable_grad(), s.stepper.accumulating(last=k == len(passes) - 1), s.accelerator.autocast(), \
                    recompute_cheap_activations():
                loss, values = objective.loss_sum(s.model, batch)
                if not collect_grads:
                    s.stepper.backward(loss * weight * scale)
                else:
                    new = torch.autograd.grad(loss * weight * scale, s.stepper.trainable, allow_unused=True)
                    result.grads = list(new) if result.grads is None else [
                        b if a is None else a if b is None else a.add_(b) for a, b in zip(result.grads, new)]
            result.metrics.append({name: value * weight for name, value in values.items()})
        return result

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every metric of the objective averaged over the whole eval set (tokens or pairs), all ranks."""
        s, acc, objective = self.s, self.s.accelerator, self.s.objective
        s.model.eval()
        sums = {name: torch.zeros((), device=acc.device, dtype=torch.float64) for name in objective.metric_names}
        count = torch.zeros((), device=acc.device, dtype=torch.float64)
        for units in s.eval_plan.micro_batches(0):  # type: ignore[union-attr]
            if not units:
                continue
            batch = objective.collate(s.data.eval, units).to(acc.device)
            with acc.autocast():
                _, metrics = objective.loss_sum(s.model, batch)
            for name, value in metrics.items():
                sums[name] += value.double()
            count += objective.count(batch)
        count = float(acc.reduce(count, "sum"))
        s.model.train()
        totals = {name: float(acc.reduce(value, "sum")) for name, value in sums.items()}
        return {f"eval_{name}": value for name, value in averaged(totals, count, objective).items()}

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        st, plan, started = self.state, self.s.plan, time.time()
        self.logger = TrainLogger(self.cfg, self.total_steps, self.s.accelerator.is_main_process)
        self.logger.resume_at(st.global_step)
        self.window = self.new_window()  # throughput counts only the steps this process runs
        steps_run = 0
        while st.global_step < self.total_steps:
            batches = plan.micro_batches(st.epoch)
            windows = [batches[i : i + self.accum] for i in range(0, len(batches), self.accum)]
            for window in windows[st.batches_done_in_epoch // self.accum :]:
                for iteration in range(self.iterations):  # grpo's num_iterations: steps on the same batch
                    metrics = self.optimizer_step(window)
                    self.s.profile.after_step()
                    st.global_step += 1
                    steps_run += 1
                    whole, epoch_done = iteration == self.iterations - 1, False
                    if whole:  # the window's data is used up
                        st.batches_done_in_epoch += len(window)
                        epoch_done = st.batches_done_in_epoch >= len(batches)
                        if epoch_done:
                            st.epoch, st.batches_done_in_epoch = st.epoch + 1, 0
                    self.after_step(metrics, epoch_done, whole)
                    if st.global_step >= self.total_steps:
                        break
                if st.global_step >= self.total_steps:
                    break
        self.logger.close()
        runtime = time.time() - started
        return {"epoch": round(self.epoch_float(), 4),
                "train_loss": self.run_loss["loss"] / max(self.run_loss["units"], 1),
                "train_runtime": round(runtime, 3), "train_steps_per_second": round(steps_run / runtime, 3),
                f"train_{self.s.objective.unit}_per_second": round(self.run_loss["units"] / runtime, 1),
                **peak_memory(), **self.s.profile.memory()}

    def epoch_float(self) -> float:
        n = len(self.s.plan)
        return self.state.epoch + self.state.batches_done_in_epoch / max(n, 1)

    def after_step(self, metrics: dict[str, float], epoch_done: bool, whole: bool = True) -> None:
        """Logs, evaluation and checkpoints after a step; `whole`: the step finished its window's iterations
        (a checkpoint due in between is written then, so that resuming never starts inside a window)."""
        st, t = self.state, self.cfg.training
        w = self.window
        for name, value in metrics["sums"].items():
            w["sums"][name] = w["sums"].get(name, 0.0) + value
        w["units"] += metrics["units"]
        w["all_tokens"] += metrics["all_tokens"]
        self.run_loss["loss"] += metrics["sums"]["loss"]
        self.run_loss["units"] += metrics["units"]
        step_loss = metrics["sums"]["loss"] / max(metrics["units"], 1)
        if not math.isfinite(step_loss):
            kept = ckpt.list_checkpoints(self.out)
            raise StopError(f"the loss became {step_loss} at step {st.global_step}: training stopped. "
                            + (f"The last good checkpoint is {kept[-1]}. " if kept else "No checkpoint was saved. ")
                            + "Lower `learning_rate` (or raise `warmup_steps`), check the data, then rerun.")
        lr = self.s.scheduler.get_last_lr()[0]
        self.logger.advance(st.global_step, metrics["sums"]["loss"] / max(metrics["units"], 1), lr)  # type: ignore
        last = st.global_step >= self.total_steps
        if st.global_step % t.logging_steps == 0 or last:
            elapsed = max(time.time() - w["time"], 1e-9)
            means = {name: round(value, 6) for name, value in averaged(w["sums"], w["units"],
                                                                          self.s.objective).items()}
            entry = {**means, "lr": lr, "epoch": round(self.epoch_float(), 4),
                     "grad_norm": round(metrics["grad_norm"], 6),
                     f"{self.s.objective.unit}_per_s": round(w["units"] / elapsed, 1),
                     "tokens_per_s": round(w["all_tokens"] / elapsed, 1)}
            st.log_history.append(self.logger.record(entry, st.global_step))  # type: ignore[union-attr]
            self.window = self.new_window()
        evaluated = None
        if self.s.eval_plan is not None and ((t.eval_strategy == "steps" and st.global_step % self.eval_every == 0)
                                             or (t.eval_strategy == "epoch" and epoch_done)):
            evaluated = self.evaluate()
            entry = {**{k: round(v, 6) for k, v in evaluated.items()}, "epoch": round(self.epoch_float(), 4)}
            st.log_history.append(self.logger.record(entry, st.global_step))  # type: ignore[union-attr]
        due = (t.save_strategy == "steps" and st.global_step % t.save_steps == 0) or \
            (t.save_strategy == "epoch" and epoch_done)
        self.save_due = self.save_due or due
        if whole and self.save_due:
            self.save_due = False
            self.save_checkpoint(evaluated)

    def save_checkpoint(self, evaluated: dict[str, float] | None) -> None:
        st, t, s = self.state, self.cfg.training, self.s
        name = f"checkpoint-{st.global_step}"
        if evaluated and t.metric_for_best_model in evaluated:
            value = evaluated[t.metric_for_best_model]
            greater = t.greater_is_better if t.greater_is_better is not None else not t.metric_for_best_model.endswith("loss")
            if st.best_metric is None or (value > st.best_metric if greater else value < st.best_metric):
                st.best_metric, st.best_checkpoint = value, str(self.out / name)
        acc = s.accelerator
        ckpt.save_checkpoint(self.out, st.global_step, acc.unwrap_model(s.model), s.tokenizer, s.stepper,
                             s.scheduler, st, acc.process_index, acc.is_main_process, acc.wait_for_everyone)
        if acc.is_main_process:
            ckpt.rotate(self.out, t.save_total_limit, st.best_checkpoint)


def peak_memory() -> dict[str, float]:
    """Peak host RSS of this process and, on a GPU, peak allocated GPU memory."""
    import resource

    out = {"train_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["train_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def save_final(cfg: Config, s: Setup, trainer: Trainer) -> None:
    """The trained weights, tokenizer (with the chat template used) and template info, moved in atomically."""
    from tunesmith.model.loading import save_template_info

    acc, out = s.accelerator, trainer.out
    best = trainer.state.best_checkpoint
    if cfg.training.load_best_model_at_end and best and Path(best).is_dir():
        s.stepper.load_weights(acc.unwrap_model(s.model), Path(best))
        log.info("loaded the best checkpoint %s (%s = %.4f)", best, cfg.training.metric_for_best_model,
                 trainer.state.best_metric)
    acc.wait_for_everyone()
    tmp = out / ".final.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    s.stepper.save_weights(acc.unwrap_model(s.model), tmp, acc.is_main_process)
    if not acc.is_main_process:
        return
    if s.template is not None:
        s.tokenizer.chat_template = s.template.jinja
    s.tokenizer.save_pretrained(tmp)
    save_template_info(tmp, s.template)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def run(cfg: Config, extras: dict[str, Any]) -> int:
    t = cfg.training
    if not t.do_train:
        if t.do_predict:  # the classic `train --do_predict --predict_with_generate` spelling
            from tunesmith.predict.run import run as predict

            return predict(cfg, extras)
        if t.do_eval:  # classic `--do_eval` alone: the eval loss of the model (and adapter) as it is
            return evaluate_only(cfg)
        raise ConfigError(["`do_train: false`: nothing to do (use `tunesmith predict` or `tunesmith eval`)"])
    validate_for_train(cfg)
    fsdp.adopt_accelerate_fsdp(cfg)
    processes = processes_wanted(cfg)
    if fsdp.fsdp_requested(cfg):
        raise_if(fsdp.problems(cfg, int(os.environ.get("WORLD_SIZE", processes))))
    if processes > 1:
        return launch(cfg, processes)
    profile = choose_profile(cfg)
    profile.start()
    resume = find_resume_point(cfg)
    rerun_config = saved_config(cfg)  # as the user wrote it, before setup adapts it to this machine
    s = build_setup(cfg, profile)
    trainer = Trainer(cfg, s)
    out = trainer.out
    if s.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial_folders(out)
        if resume is None:
            start_fresh(out)
        (out / "tunesmith_config.yaml").write_text(rerun_config, encoding="utf-8")
    s.accelerator.wait_for_everyone()
    if resume is not None:
        trainer.state = ckpt.load_checkpoint(resume, s.accelerator.unwrap_model(s.model), s.stepper, s.scheduler,
                                             s.accelerator.process_index)
        log.info("resuming from %s (step %d of %d)", resume.name, trainer.state.global_step, trainer.total_steps)
        if s.accelerator.is_main_process:
            trim_log(out / "trainer_log.jsonl", trainer.state.global_step)
    try:
        results = trainer.train()
    except KeyboardInterrupt:
        raise StopError(interrupted_message(cfg, out), exit_code=130) from None
    save_final(cfg, s, trainer)
    eval_metrics = None
    if s.eval_plan is not None and (t.do_eval or t.eval_strategy != "no"):
        eval_metrics = {**trainer.evaluate(), "epoch": results["epoch"]}
    if s.accelerator.is_main_process:
        report(cfg, s, trainer, results, eval_metrics)
    # every rank reaches the end before any tears its process group down: a rank whose peer's connections close
    # under it while it is still in a collective's teardown can abort at exit
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
    return 0


def interrupted_message(cfg: Config, out: Path) -> str:
    kept = ckpt.list_checkpoints(out)
    if not kept:
        return "interrupted before the first checkpoint: nothing was saved (rerun to start again)"
    return (f"interrupted; the latest checkpoint is {kept[-1]}. Resume with:\n"
            f"  tunesmith train {out / 'tunesmith_config.yaml'}")


def report(cfg: Config, s: Setup, trainer: Trainer, results: dict[str, Any], eval_metrics: dict | None) -> None:
    out = trainer.out
    write_results(out, "train", results)
    if eval_metrics:
        write_results(out, "eval", eval_metrics)
    if cfg.finetuning.plot_loss:
        plot_losses(out)
    unit = s.objective.unit
    print(f"done: {trainer.state.global_step} steps in {results['train_runtime']:.1f}s, "
          f"train_loss {results['train_loss']:.4f}"
          + (f", eval_loss {eval_metrics['eval_loss']:.4f}" if eval_metrics else "")
          + f", {results[f'train_{unit}_per_second']:.0f} {unit.replace('_', ' ')}/s -> {out}")


def evaluate_only(cfg: Config) -> int:
    """Every metric of the stage on the eval data, without training; written to output_dir/eval_results.json."""
    from tunesmith.config.validate import check_data, check_finetuning, check_model, raise_if

    raise_if(check_model(cfg) + check_data(cfg) + check_finetuning(cfg)
             + ([] if cfg.data.val_size > 0 or cfg.data.eval_dataset else
                ["`do_eval` needs evaluation data: set `val_size` or `eval_dataset`"])
             + ([] if cfg.training.output_dir else ["`output_dir` is required: where eval_results.json goes"]))
    s = build_setup(cfg, choose_profile(cfg))
    metrics = Trainer(cfg, s).evaluate()
    if s.accelerator.is_main_process:
        out = Path(cfg.training.output_dir)  # type: ignore[arg-type]
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, "eval", metrics)
        print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" -> {out / 'eval_results.json'}")
    return 0
