//! Segmentation metrics as mmsegmentation computes them (`mmseg.core.evaluation.metrics`): per
//! class, the intersection and union of predicted and true pixels summed over the whole dataset
//! (not averaged per image), pixels labelled `ignore` left out; then
//!
//! - IoU_c = intersection_c / union_c, Acc_c = intersection_c / label_c,
//! - mIoU and mAcc: their means over the classes whose union (label area) is not empty (NaN
//!   classes skipped, `nanmean`),
//! - aAcc: all intersections over all labelled pixels (pixel accuracy).

use serde::Serialize;

/// The label of pixels that count for nothing (padding, ADE20K's "other").
pub const IGNORE: u8 = 255;

/// Per-class pixel areas, summed image by image.
#[derive(Debug, Clone, PartialEq)]
pub struct SegAccumulator {
    pub num_classes: usize,
    pub intersect: Vec<u64>,
    pub pred: Vec<u64>,
    pub label: Vec<u64>,
}

/// What `SegAccumulator::summary` reports; IoU and accuracy per class are NaN for a class that is
/// neither predicted nor present (IoU) or not present (accuracy).
#[derive(Debug, Clone, Serialize)]
pub struct SegSummary {
    pub miou: f64,
    pub macc: f64,
    pub aacc: f64,
    pub iou: Vec<f64>,
    pub acc: Vec<f64>,
}

impl SegAccumulator {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            intersect: vec![0; num_classes],
            pred: vec![0; num_classes],
            label: vec![0; num_classes],
        }
    }

    /// Adds one image: `pred` and `label` are class indices per pixel, the same length; pixels
    /// labelled [`IGNORE`] are left out.
    ///
    /// # Panics
    /// When the lengths differ or a class index is out of range (readers check labels first).
    pub fn add(&mut self, pred: &[u8], label: &[u8]) {
        assert_eq!(pred.len(), label.len(), "prediction and label of different sizes");
        let k = self.num_classes;
        for (&p, &l) in pred.iter().zip(label) {
            if l == IGNORE {
                continue;
            }
            let (p, l) = (p as usize, l as usize);
            assert!(p < k && l < k, "class index {} of {k} classes", p.max(l));
            self.pred[p] += 1;
            self.label[l] += 1;
            if p == l {
                self.intersect[l] += 1;
            }
        }
    }

    pub fn summary(&self) -> SegSummary {
        let ratio = |a: u64, b: u64| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
        let iou: Vec<f64> = (0..self.num_classes)
            .map(|c| {
                ratio(
                    self.intersect[c],
                    self.pred[c] + self.label[c] - self.intersect[c],
                )
            })
            .collect();
        let acc: Vec<f64> = (0..self.num_classes)
            .map(|c| ratio(self.intersect[c], self.label[c]))
            .collect();
        let nanmean = |v: &[f64]| {
            let kept: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            if kept.is_empty() {
                f64::NAN
            } else {
                kept.iter().sum::<f64>() / kept.len() as f64
            }
        };
        SegSummary {
            miou: nanmean(&iou),
            macc: nanmean(&acc),
            aacc: ratio(self.intersect.iter().sum(), self.label.iter().sum()),
            iou,
            acc,
        }
    }

    /// `class,name,iou,acc` rows (empty fields for NaN), one per class.
    pub fn per_class_csv(&self, names: &[String]) -> String {
        let s = self.summary();
        let cell = |v: f64| {
            if v.is_nan() {
                String::new()
            } else {
                format!("{v:.6}")
            }
        };
        let mut out = String::from("class,name,iou,acc\n");
        for c in 0..self.num_classes {
            let name = names.get(c).map_or("", String::as_str);
            out.push_str(&format!("{c},{name},{},{}\n", cell(s.iou[c]), cell(s.acc[c])));
        }
        out
    }
}

/// ADE20K's label convention (mmseg's `reduce_zero_label`): 0 is "other" and becomes [`IGNORE`],
/// every class moves down by one, and [`IGNORE`] stays ignored.
pub fn reduce_zero_label(label: &mut [u8]) {
    for l in label {
        *l = match *l {
            0 | IGNORE => IGNORE,
            v => v - 1,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made pair: 3 classes, 8 pixels, one ignored.
    ///
    /// label: 0 0 0 1 1 2 2 255
    /// pred:  0 0 1 1 2 2 2 0
    /// class 0: intersection 2, pred 2, label 3 → IoU 2/3, Acc 2/3
    /// class 1: intersection 1, pred 2, label 2 → IoU 1/3, Acc 1/2
    /// class 2: intersection 2, pred 3, label 2 → IoU 2/3, Acc 1
    #[test]
    fn hand_made_pairs_give_mmsegs_numbers() {
        let mut acc = SegAccumulator::new(3);
        acc.add(&[0, 0, 1, 1, 2, 2, 2, 0], &[0, 0, 0, 1, 1, 2, 2, IGNORE]);
        let s = acc.summary();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            close(s.iou[0], 2.0 / 3.0) && close(s.iou[1], 1.0 / 3.0) && close(s.iou[2], 2.0 / 3.0),
            "{s:?}"
        );
        assert!(
            close(s.acc[0], 2.0 / 3.0) && close(s.acc[1], 0.5) && close(s.acc[2], 1.0),
            "{s:?}"
        );
        assert!(close(s.miou, 5.0 / 9.0), "{}", s.miou);
        assert!(close(s.aacc, 5.0 / 7.0), "{}", s.aacc);
        // Areas add up over images before dividing: a second image of class 1 only, all right.
        acc.add(&[1, 1], &[1, 1]);
        let s = acc.summary();
        assert!(close(s.iou[1], 3.0 / 5.0), "{}", s.iou[1]);
    }

    #[test]
    fn absent_classes_are_left_out_of_the_means() {
        let mut acc = SegAccumulator::new(4);
        acc.add(&[0, 1], &[0, 1]);
        let s = acc.summary();
        assert!(s.iou[2].is_nan() && s.acc[3].is_nan());
        assert_eq!((s.miou, s.macc, s.aacc), (1.0, 1.0, 1.0));
        let csv = acc.per_class_csv(&["a".into(), "b".into(), "c".into(), "d".into()]);
        assert!(csv.contains("\n2,c,,\n"), "{csv}");
    }

    #[test]
    fn ade20k_labels_move_down_and_zero_is_ignored() {
        let mut l = [0, 1, 150, IGNORE];
        reduce_zero_label(&mut l);
        assert_eq!(l, [IGNORE, 0, 149, IGNORE]);
    }
}
