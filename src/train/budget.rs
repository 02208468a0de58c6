//! Sizing a run to a wall-clock budget (`--budget 4m`): the plan made from measured step,
//! evaluation and checkpoint times before training, its revision after every epoch, and the
//! stop before the deadline. One margin ([`margin_s`]) serves all three.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};

use super::loss::one_hot;
use super::trainer::{Session, mix_seed, train_step};

/// Seconds kept free at the end of a budget of `budget_s` besides the final checkpoint: 1 s and
/// 2 % of the budget (timing noise, the chart and the reports).
pub fn margin_s(budget_s: f64) -> f64 {
    1.0 + 0.02 * budget_s
}

/// What the plan keeps free at the end of a budget: the margin, the final checkpoint, and a
/// second for the steps timed before training being slightly optimistic.
pub fn reserve_s(budget_s: f64, save_s: f64) -> f64 {
    margin_s(budget_s) + 1.0 + save_s
}

/// Parses a duration: `90s`, `4m`, `1.5h`, `1h30m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return check_positive(v, s);
    }
    let mut total = 0.0;
    let mut num = String::new();
    let mut any = false;
    for ch in s.chars() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86400.0,
            _ => bail!("cannot read duration '{s}': unknown unit '{ch}' (use s, m, h, e.g. 4m or 1h30m)"),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("cannot read duration '{s}' (e.g. 90s, 4m, 1h30m)"))?;
        total += v * unit;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        bail!("cannot read duration '{s}': every number needs a unit (e.g. 90s, 4m, 1h30m)");
    }
    check_positive(total, s)
}

fn check_positive(v: f64, s: &str) -> Result<f64> {
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        bail!("duration '{s}' must be positive")
    }
}

/// `2m05s`-style rendering of seconds.
pub fn format_duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let s = s.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// What is known when a run is sized to a budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetInputs {
    pub budget_s: f64,
    /// Already spent (data loading, model set-up, the measured steps).
    pub elapsed_s: f64,
    /// Seconds per training step after warm-up.
    pub step_s: f64,
    pub steps_per_epoch: usize,
    /// Seconds of one evaluation (all models evaluated at an epoch end).
    pub eval_s: f64,
    /// Evaluate every this many epochs (and always at the end).
    pub eval_every: usize,
    /// Kept free at the end (final checkpoint, chart, slack): [`reserve_s`].
    pub reserve_s: f64,
    /// Cost of each epoch end besides evaluation (the checkpoint).
    pub epoch_overhead_s: f64,
}

/// The run that fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPlan {
    /// Epochs started (the last may be partial when not even one whole epoch fits).
    pub epochs: usize,
    pub total_steps: u64,
}

/// The longest run that fits: whole epochs when at least one fits (`E` epochs cost
/// `E·(steps·step_s + overhead) + ⌈E/eval_every⌉·eval_s`), otherwise as many steps of a single epoch as fit
/// before the final evaluation.
pub fn plan_budget(i: &BudgetInputs) -> Result<BudgetPlan> {
    let available = i.budget_s - i.elapsed_s - i.reserve_s;
    let every = i.eval_every.max(1);
    let cost = |epochs: usize| -> f64 {
        epochs as f64 * (i.steps_per_epoch as f64 * i.step_s + i.epoch_overhead_s)
            + epochs.div_ceil(every) as f64 * i.eval_s
    };
    let mut epochs = 0;
    while cost(epochs + 1) <= available && epochs < 1_000_000 {
        epochs += 1;
    }
    if epochs >= 1 {
        return Ok(BudgetPlan {
            epochs,
            total_steps: (epochs * i.steps_per_epoch) as u64,
        });
    }
    let steps = ((available - i.eval_s - i.epoch_overhead_s) / i.step_s).floor();
    if steps < 1.0 {
        bail!(
            "the budget of {} is too small: {} are already spent, a training step takes {:.2} s and an evaluation {:.1} s",
            format_duration(i.budget_s),
            format_duration(i.elapsed_s),
            i.step_s,
            i.eval_s
        );
    }
    Ok(BudgetPlan {
        epochs: 1,
        total_steps: (steps as u64).min(i.steps_per_epoch as u64),
    })
}

/// Whether a run re-sized to `planned` total steps replaces the current schedule of `current`
/// after `done` steps: never once the schedule has run its course (growing it then would add
/// steps at a learning rate near zero: a 4-minute run on the H100 spent its last 20 s so), always when it must shrink, and when it grows by at least half an epoch.
fn should_resize(done: u64, current: u64, planned: u64, steps_per_epoch: u64) -> bool {
    if done >= current {
        return false;
    }
    planned < current || planned >= current + steps_per_epoch / 2
}

impl<B: AutodiffBackend> Session<B> {
    /// Measures steps and an evaluation on throwaway copies, then sizes the run to the budget.
    pub(super) fn size_to_budget(&mut self, budget: f64) -> Result<()> {
        self.progress.line(&format!(
            "sizing the run to a budget of {}: measuring a few steps...",
            format_duration(budget)
        ));
        if let Some(first) = self.train_loader.epoch(0, 0).next() {
            self.compile_ahead(&first?)?;
        }
        let mut model = self.model.clone();
        let mut optim = self.optim.clone();
        let lr = self.state.schedule.peak * 1e-3;
        let clip = self.cfg().clip;
        let spe = self.state.steps_per_epoch;
        let mut times = Vec::new();
        for (i, batch) in self.train_loader.epoch(0, 0).take(spe.min(12)).enumerate() {
            let b = batch?;
            let t0 = Instant::now();
            let n = b.len();
            let [h, w] = b.size;
            let k = b.num_classes;
            B::seed(&self.device, mix_seed(self.cfg().seed, i as u64));
            let x = Tensor::<B, 4>::from_data(TensorData::new(b.images, [n, 3, h, w]), &self.device);
            let targets = b.targets.unwrap_or_else(|| one_hot(&b.labels, k));
            let t = Tensor::<B, 2>::from_data(TensorData::new(targets, [n, k]), (&self.device, DType::F32));
            let stepped = train_step(model, &mut optim, None, (x, t), lr, clip)?;
            model = stepped.model;
            let _ = stepped.loss.into_scalar();
            times.push(t0.elapsed().as_secs_f64());
            crate::dist::watchdog::beat(None);
            // First step compiles; then at least 3 timed steps or 3% of the budget. Every rank
            // takes as many steps as rank 0 (each step averages gradients over the ranks).
            let timed: f64 = times.iter().skip(1).sum();
            let enough = times.len() >= 4 && (timed >= 0.03 * budget || times.len() >= 8);
            if self.dist.main_says(enough)? {
                break;
            }
        }
        // The median of the later half: early steps still compile kernels.
        let mut later = times[times.len() / 2..].to_vec();
        later.sort_by(f64::total_cmp);
        let step_s = later[later.len() / 2];
        // Evaluation: time a few batches (the first compiles), scale to the split.
        let valid = model.valid();
        let vb = self.val_loader.len();
        let mut eval_times = Vec::new();
        for batch in self.val_loader.epoch(0, 0).take(3) {
            let b = batch?;
            let t0 = Instant::now();
            let [h, w] = b.size;
            let x = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(b.images, [b.labels.len(), 3, h, w]),
                &self.device,
            );
            let _ = crate::io::to_host(valid.forward(x))?;
            eval_times.push(t0.elapsed().as_secs_f64());
        }
        // (A rank's share of a small split can be empty: it then times nothing.)
        let later_evals = &eval_times[1.min(eval_times.len().saturating_sub(1))..];
        let per_batch = later_evals.iter().sum::<f64>() / later_evals.len().max(1) as f64;
        let passes = if self.ema.is_some() { 2.0 } else { 1.0 };
        let eval_s = per_batch * vb as f64 * passes;
        // A checkpoint of the initial state times the saves (and makes the run resumable from step 0).
        let t0 = Instant::now();
        self.save(false)?;
        let save_s = t0.elapsed().as_secs_f64();
        self.eval_s = Some(eval_s);
        self.save_s = Some(save_s);
        // Rank 0's measurements size the run for every rank.
        if self.dist.is_main() {
            let plan = self.plan_budget(budget, self.elapsed(), step_s)?;
            self.apply_plan(plan);
        }
        self.agree_on_schedule()?;
        self.save(false)?; // the initial checkpoint again, now with the sized schedule
        self.step_s = Some(step_s);
        self.progress.line(&format!(
            "measured {:.3} s/step ({:.0} img/s), {:.1} s per evaluation, {:.2} s per checkpoint; {} spent; {} epochs ({} steps) fit",
            step_s,
            self.cfg().global_batch() as f64 / step_s,
            eval_s,
            save_s,
            format_duration(self.elapsed()),
            self.state.epochs,
            self.state.schedule.total_steps
        ));
        Ok(())
    }

    /// After every epoch, sizes the rest of the run again from the mean speed of the epochs so far,
    /// in both directions: the steps timed before training can be slower (kernels still compiling)
    /// or faster (the data loader's queue was full) than the real run, and a run that hits the
    /// deadline before its schedule ends stops with the learning rate still high. It shrinks
    /// whenever it must, but grows only by at least half an epoch, so that noise in the epoch times
    /// does not move the schedule back and forth.
    pub(super) fn resize_to_budget(&mut self) {
        let Some(budget) = self.cfg().budget_s else {
            return;
        };
        let done_steps = self.state.global_step;
        let epoch_steps = done_steps - self.state.history.last().map_or(0, |m| m.step);
        if epoch_steps == 0 {
            return;
        }
        let train_s: f64 =
            self.state.history.iter().map(|m| m.epoch_s).sum::<f64>() + self.state.epoch_train_s;
        let step_s = train_s / done_steps as f64;
        self.step_s = Some(step_s);
        let done_epochs = self.state.epoch + 1;
        // The epochs still to come after this one's evaluation, planned from now.
        let eval_now = if self.evaluates_after(self.state.epoch) {
            self.eval_s.unwrap_or(0.0)
        } else {
            0.0
        };
        let later = self.plan_budget(budget, self.elapsed() + eval_now, step_s);
        let (epochs, total_steps) = match later {
            Ok(plan) => (done_epochs + plan.epochs, done_steps + plan.total_steps),
            Err(_) => (done_epochs, done_steps),
        };
        let current = self.state.schedule.total_steps;
        if !should_resize(
            done_steps,
            current,
            total_steps,
            self.state.steps_per_epoch as u64,
        ) {
            return;
        }
        self.progress.line(&format!(
            "after epoch {done_epochs} ({step_s:.3} s/step on average): re-sized the run from {} to {epochs} epochs ({total_steps} steps)",
            self.state.epochs
        ));
        self.apply_plan(BudgetPlan { epochs, total_steps });
    }

    /// The run that fits `budget` when training started `elapsed_s` into it, at `step_s` per step
    /// (evaluation and checkpoint costs as measured by `size_to_budget`).
    fn plan_budget(&self, budget: f64, elapsed_s: f64, step_s: f64) -> Result<BudgetPlan> {
        let save_s = self.save_s.unwrap_or(0.0);
        plan_budget(&BudgetInputs {
            budget_s: budget,
            elapsed_s,
            step_s,
            steps_per_epoch: self.state.steps_per_epoch,
            eval_s: self.eval_s.unwrap_or(0.0),
            eval_every: self.cfg().eval_every,
            reserve_s: reserve_s(budget, save_s),
            epoch_overhead_s: save_s,
        })
    }

    /// Every rank takes rank 0's schedule (each timed its own steps; rank 0's plan is the one).
    pub(super) fn agree_on_schedule(&mut self) -> Result<()> {
        if self.dist.world() == 1 {
            return Ok(());
        }
        let mine = serde_json::to_vec(&(self.state.epochs, self.state.schedule))?;
        let theirs = self.dist.collective().broadcast(mine)?;
        (self.state.epochs, self.state.schedule) =
            serde_json::from_slice(&theirs).context("the schedule from rank 0")?;
        Ok(())
    }

    fn apply_plan(&mut self, plan: BudgetPlan) {
        let spe = self.state.steps_per_epoch;
        self.state.epochs = plan.epochs;
        self.state.schedule.total_steps = plan.total_steps;
        self.state.schedule.warmup_steps = self.cfg().warmup.steps(plan.total_steps, spe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_schedule_is_never_re_sized() {
        // 195 steps an epoch, a 10-epoch schedule.
        let (spe, current) = (195, 1950);
        // Mid-run: grows by at least half an epoch, shrinks whenever it must.
        assert!(should_resize(780, current, current + 195, spe));
        assert!(!should_resize(780, current, current + 90, spe));
        assert!(should_resize(780, current, current - 195, spe));
        assert!(!should_resize(780, current, current, spe));
        // The schedule has ended (its learning rate is at its final value): no more epochs.
        assert!(!should_resize(1950, current, current + 187, spe));
        assert!(!should_resize(1950, current, current + 1950, spe));
    }
}
