//! `curves.png`: loss and accuracy against the epoch.

use anyhow::Result;

use super::metrics::EpochMetrics;
use crate::plot::{PALETTE, Panel, Series, two_panels_png};

/// The PNG bytes of the two panels: train/val loss, and val top-1/top-5 (and EMA top-1) in %.
pub fn curves_png(history: &[EpochMetrics], title: &str) -> Result<Vec<u8>> {
    let series = |name: &str, color: usize, f: &dyn Fn(&EpochMetrics) -> Option<f64>| Series {
        name: name.to_string(),
        color: PALETTE[color],
        points: history
            .iter()
            .filter_map(|m| f(m).filter(|v| v.is_finite()).map(|v| (m.epoch as f64, v)))
            .collect(),
    };
    let epochs = history.last().map_or(1, |m| m.epoch.max(1));
    // x ticks at whole epochs (at most ~10 labels).
    let every = epochs.div_ceil(10).max(1);
    let xticks: Vec<f64> = (1..=epochs)
        .filter(|e| *e == 1 || *e == epochs || e % every == 0)
        .map(|e| e as f64)
        .collect();
    let loss = Panel {
        ylabel: "loss".into(),
        xlabel: "epoch".into(),
        xticks: xticks.clone(),
        yrange: None,
        legend_below: false,
        series: vec![
            series("train loss", 0, &|m| Some(m.train_loss)),
            series("val loss", 1, &|m| m.val_loss),
        ],
    };
    let acc = Panel {
        ylabel: "accuracy %".into(),
        xlabel: "epoch".into(),
        xticks,
        yrange: Some((0.0, 100.0)),
        legend_below: true,
        series: vec![
            series("val top-1", 0, &|m| m.val_top1.map(|v| v * 100.0)),
            series("val top-5", 2, &|m| m.val_top5.map(|v| v * 100.0)),
            series("ema top-1", 3, &|m| m.ema_top1.map(|v| v * 100.0)),
        ],
    };
    two_panels_png(title, &loss, &acc)
}
