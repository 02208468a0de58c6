//! Evaluation metrics (top-1/top-5, loss, per-class accuracy, confusion matrix) and the per-epoch
//! records that go to `metrics.csv` / `metrics.jsonl`.

use serde::{Deserialize, Serialize};

/// Accumulates logits batch by batch; everything on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalAccumulator {
    pub num_classes: usize,
    pub count: u64,
    pub top1: u64,
    pub top5: u64,
    pub loss_sum: f64,
    /// Row = true class, column = predicted class.
    pub confusion: Vec<u64>,
}

impl EvalAccumulator {
    pub fn new(num_classes: usize) -> Self {
        EvalAccumulator {
            num_classes,
            count: 0,
            top1: 0,
            top5: 0,
            loss_sum: 0.0,
            confusion: vec![0; num_classes * num_classes],
        }
    }

    /// Adds a batch of row-major `B×K` logits with their labels. A sample counts in the top-k when
    /// fewer than `k` classes score strictly higher than its label (ties favour the label); the
    /// predicted class is the first highest logit.
    pub fn add(&mut self, logits: &[f32], labels: &[usize]) {
        let k = self.num_classes;
        assert_eq!(logits.len(), labels.len() * k, "logits are not B×{k}");
        for (row, &y) in logits.chunks_exact(k).zip(labels) {
            let target = row[y];
            let above = row.iter().filter(|&&v| v > target).count();
            self.top1 += (above == 0) as u64;
            self.top5 += (above < 5) as u64;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max as f64 + row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
            self.loss_sum += lse - target as f64;
            let pred = row.iter().position(|&v| v == max).unwrap_or(0);
            self.confusion[y * k + pred] += 1;
            self.count += 1;
        }
    }

    pub fn top1(&self) -> f64 {
        self.top1 as f64 / self.count.max(1) as f64
    }

    pub fn top5(&self) -> f64 {
        self.top5 as f64 / self.count.max(1) as f64
    }

    /// Mean cross-entropy against the hard labels.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    /// Accuracy of each class (`None` for classes without samples).
    pub fn per_class(&self) -> Vec<Option<f64>> {
        let k = self.num_classes;
        (0..k)
            .map(|c| {
                let row = &self.confusion[c * k..(c + 1) * k];
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[c] as f64 / n as f64)
            })
            .collect()
    }

    /// The confusion matrix as CSV: a header of predicted classes, one row per true class.
    pub fn confusion_csv(&self, classes: &[String]) -> String {
        let k = self.num_classes;
        let mut out = String::from("true\\predicted");
        for c in classes {
            out.push(',');
            out.push_str(&csv_field(c));
        }
        out.push('\n');
        for (i, c) in classes.iter().enumerate().take(k) {
            out.push_str(&csv_field(c));
            for j in 0..k {
                out.push_str(&format!(",{}", self.confusion[i * k + j]));
            }
            out.push('\n');
        }
        out
    }

    /// Per-class accuracy as CSV: `class,index,samples,correct,accuracy`.
    pub fn per_class_csv(&self, classes: &[String]) -> String {
        let k = self.num_classes;
        let mut out = String::from("class,index,samples,correct,accuracy\n");
        for (i, c) in classes.iter().enumerate().take(k) {
            let row = &self.confusion[i * k..(i + 1) * k];
            let n: u64 = row.iter().sum();
            let acc = if n > 0 {
                format!("{:.6}", row[i] as f64 / n as f64)
            } else {
                String::new()
            };
            out.push_str(&format!("{},{i},{n},{},{acc}\n", csv_field(c), row[i]));
        }
        out
    }

    pub fn summary(&self) -> EvalSummary {
        EvalSummary {
            samples: self.count,
            top1: self.top1(),
            top5: self.top5(),
            loss: self.loss(),
        }
    }
}

/// The headline numbers of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    pub samples: u64,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One epoch of a run, as written to `metrics.csv` and `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Global step at the end of the epoch.
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
    pub ema_top1: Option<f64>,
    pub ema_top5: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Training seconds of the epoch (without evaluation).
    pub epoch_s: f64,
    pub eval_s: f64,
    /// Training images per second.
    pub img_per_s: f64,
    /// Seconds of `epoch_s` the loop spent waiting for the data loader (near 0: decoding keeps up).
    #[serde(default)]
    pub data_wait_s: f64,
}

const CSV_HEADER: &str = "epoch,step,train_loss,val_loss,val_top1,val_top5,ema_top1,ema_top5,lr,epoch_s,eval_s,img_per_s,data_wait_s";

/// The whole history as CSV.
pub fn history_csv(history: &[EpochMetrics]) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut out = format!("{CSV_HEADER}\n");
    for m in history {
        out.push_str(&format!(
            "{},{},{:.6},{},{},{},{},{},{:.6e},{:.3},{:.3},{:.1},{:.3}\n",
            m.epoch,
            m.step,
            m.train_loss,
            opt(m.val_loss),
            opt(m.val_top1),
            opt(m.val_top5),
            opt(m.ema_top1),
            opt(m.ema_top5),
            m.lr,
            m.epoch_s,
            m.eval_s,
            m.img_per_s,
            m.data_wait_s
        ));
    }
    out
}

/// The whole history as JSON lines.
pub fn history_jsonl(history: &[EpochMetrics]) -> String {
    history
        .iter()
        .map(|m| serde_json::to_string(m).expect("metrics serialise") + "\n")
        .collect()
}
