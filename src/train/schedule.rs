//! The learning-rate schedule: linear warm-up, then cosine to a floor, per step.

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
