//! The learning-rate schedule (linear warm-up, then cosine to a floor, per step) and the sizing
//! of a run to a wall-clock budget.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// How long the linear warm-up lasts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// A number of epochs (the papers: 5).
    Epochs(f64),
    /// A fraction of all steps (the fast CIFAR recipe: 0.05).
    Fraction(f64),
}

impl Warmup {
    /// `5` (epochs), `5%` (of the run) or `0`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let w = if let Some(p) = s.strip_suffix('%') {
            Warmup::Fraction(p.trim().parse::<f64>()? / 100.0)
        } else {
            Warmup::Epochs(s.parse::<f64>()?)
        };
        match w {
            Warmup::Epochs(e) if e >= 0.0 && e.is_finite() => Ok(w),
            Warmup::Fraction(f) if (0.0..1.0).contains(&f) => Ok(w),
            _ => bail!(
                "warm-up must be a number of epochs (e.g. 5) or a percentage below 100 (e.g. 5%), got '{s}'"
            ),
        }
    }

    /// Warm-up steps for a run of `total` steps with `per_epoch` steps per epoch (never all of it).
    pub fn steps(self, total: u64, per_epoch: usize) -> u64 {
        let w = match self {
            Warmup::Epochs(e) => (e * per_epoch as f64).round() as u64,
            Warmup::Fraction(f) => (f * total as f64).round() as u64,
        };
        w.min(total.saturating_sub(1))
    }
}

impl std::fmt::Display for Warmup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warmup::Epochs(e) => write!(f, "{e} epochs"),
            Warmup::Fraction(p) => write!(f, "{}% of the steps", p * 100.0),
        }
    }
}

/// Per-step learning rate: `peak·(s+1)/W` for the first `W` steps, then a half cosine from
/// `peak` down to `min` at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps + 1).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
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
    /// Kept free at the end (final checkpoint, chart, slack).
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
