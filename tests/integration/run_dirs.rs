//! Runs are never lost: a new run does not write over another's results, two processes do not
//! share a run directory, a run resumes from any folder and from moved data, bad data is found
//! before training, and a signal or `kill -9` leaves a checkpoint that resumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vicinity::data::synth::{Encoding, write_image_folder};
use vicinity::train::checkpoint::{RunState, lock_run};
use vicinity::train::schedule::Warmup;
use vicinity::train::{Recipe, ResumeOptions, Stop, TrainConfig, demo, resume, train};

use crate::common::TempDir;

type AB = burn::backend::Autodiff<burn::backend::Flex>;

fn data(root: &Path, splits: &[&str]) -> PathBuf {
    let d = root.join("data");
    write_image_folder(&d, splits, &["a", "b"], 4, [16, 16], Encoding::Png).unwrap();
    d
}

fn config(data: PathBuf, out: PathBuf) -> TrainConfig {
    let mut c = TrainConfig::new(Recipe::CifarFast, "micro", demo::micro_vvt(2), data, out);
    c.resolution = Some(32);
    c.batch_size = 4;
    c.eval_batch_size = 4;
    c.epochs = 1;
    c.warmup = Warmup::Epochs(0.0);
    c.workers = 1;
    c.quiet = true;
    c
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_new_run_never_writes_over_another_or_shares_its_folder() {
    let t = TempDir::new("runs-over");
    let d = data(&t.0, &["train", "test"]);
    let out = t.0.join("run");
    std::fs::create_dir_all(out.join("best")).unwrap();
    std::fs::write(out.join("best/model.safetensors"), b"earlier results").unwrap();
    std::fs::write(out.join("metrics.csv"), b"epoch\n1\n").unwrap();
    let err = err_text(train::<AB>(config(d.clone(), out.clone()), &Default::default()));
    assert!(
        err.contains("is not empty") && err.contains("best") && err.contains("metrics.csv"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("best/model.safetensors")).unwrap(),
        b"earlier results"
    );

    // A folder another process trains in is refused while it holds the lock.
    let busy = t.0.join("busy");
    let lock = lock_run(&busy).unwrap();
    let err = err_text(train::<AB>(config(d.clone(), busy.clone()), &Default::default()));
    assert!(
        err.contains("another vicinity process") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    drop(lock);
    let done = train::<AB>(config(d, busy), &Default::default()).unwrap();
    assert_eq!(done.stop, Stop::Finished);
}

#[test]
fn a_run_resumes_with_its_data_moved() {
    let t = TempDir::new("runs-moved");
    let d = data(&t.0, &["train", "test"]);
    let out = t.0.join("run");
    let mut cfg = config(d.clone(), out.clone());
    cfg.epochs = 2;
    cfg.stop_at_step = Some(1);
    assert_eq!(
        train::<AB>(cfg, &Default::default()).unwrap().stop,
        Stop::Paused(1)
    );
    let state = RunState::read(&out.join("last")).unwrap();
    assert!(
        state.config.data.is_absolute(),
        "the stored data path is absolute"
    );

    let moved = t.0.join("elsewhere");
    std::fs::rename(&d, &moved).unwrap();
    let opts = |data| ResumeOptions {
        data,
        quiet: true,
        ..Default::default()
    };
    let err = err_text(resume::<AB>(&out, opts(None), &Default::default()));
    assert!(err.contains("--data") && err.contains("does not exist"), "{err}");
    let done = resume::<AB>(&out, opts(Some(moved)), &Default::default()).unwrap();
    assert_eq!(done.stop, Stop::Finished);
}

#[test]
fn bad_validation_images_and_missing_splits_are_found_before_training() {
    let t = TempDir::new("runs-bad-val");
    let d = data(&t.0, &["train", "val"]);
    std::fs::write(d.join("val/b/0001.png"), b"not a png").unwrap();
    let out = t.0.join("run");
    let err = err_text(train::<AB>(config(d.clone(), out.clone()), &Default::default()));
    assert!(err.contains("0001.png") && err.contains("--skip-bad"), "{err}");
    assert!(!out.join("last").exists(), "no training happened");
    // Retried in the same folder (a failed start leaves at most its config.json).
    let mut cfg = config(d.clone(), out.clone());
    cfg.skip_bad = true;
    assert_eq!(
        train::<AB>(cfg, &Default::default()).unwrap().stop,
        Stop::Finished
    );

    // A damaged 'val' split is reported as it is, not as "no validation split".
    std::fs::remove_dir_all(d.join("val/a")).unwrap();
    std::fs::create_dir_all(d.join("val/a")).unwrap();
    let err = err_text(train::<AB>(
        config(d.clone(), t.0.join("run3")),
        &Default::default(),
    ));
    assert!(
        err.contains("class 'a'") && !err.contains("no validation split"),
        "{err}"
    );
    std::fs::remove_dir_all(d.join("val")).unwrap();
    let err = err_text(train::<AB>(
        config(d.clone(), t.0.join("run4")),
        &Default::default(),
    ));
    assert!(err.contains("neither 'val' nor 'test'"), "{err}");
    // A missing training split is named as such.
    std::fs::rename(d.join("train"), d.join("val")).unwrap();
    let err = err_text(train::<AB>(config(d, t.0.join("run5")), &Default::default()));
    assert!(
        err.contains("no 'train' split") && !err.contains("neither"),
        "{err}"
    );
}

#[test]
fn the_papers_recipe_starts_at_any_batch_size() {
    let mut c = TrainConfig::new(Recipe::Papers, "m", demo::micro_vvt(2), "d".into(), "o".into());
    for batch in [1, 8, 512, 4096] {
        c.batch_size = batch;
        c.validate().unwrap_or_else(|e| panic!("batch {batch}: {e:#}"));
        assert!(c.floor_lr() < c.peak_lr());
        assert!((c.floor_lr() / c.peak_lr() - 1e-5 / 5e-4).abs() < 1e-12);
    }
}

// ------------------------------------------------------------------ signals, as a user sends them

fn spawn_training(root: &Path, d: &Path, out: &Path) -> Child {
    let model = root.join("micro.json");
    std::fs::write(&model, serde_json::to_string(&demo::micro_vvt(2)).unwrap()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_vicinity"))
        .args([
            "--backend",
            "flex",
            "train",
            "--recipe",
            "cifar-fast",
            "--resolution",
            "32",
        ])
        .args([
            "--batch",
            "4",
            "--epochs",
            "500",
            "--save-every",
            "2",
            "--workers",
            "1",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(d)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs")
}

/// Waits until the run has written its first `last` checkpoint.
fn wait_for_checkpoint(child: &mut Child, out: &Path) {
    let start = Instant::now();
    while RunState::read(&out.join("last")).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before its first checkpoint"
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg(unix)]
fn signals_pause_with_a_checkpoint_and_kill_leaves_one_that_resumes() {
    let t = TempDir::new("runs-signals");
    let d = data(&t.0, &["train", "test"]);
    for (sig, name) in [
        (libc::SIGHUP, "hup"),
        (libc::SIGINT, "int"),
        (libc::SIGTERM, "term"),
        (libc::SIGKILL, "kill"),
    ] {
        let out = t.0.join(name);
        let mut child = spawn_training(&t.0, &d, &out);
        wait_for_checkpoint(&mut child, &out);
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait_with_output().unwrap();
        let code = std::os::unix::process::ExitStatusExt::signal(&status.status);
        if sig == libc::SIGKILL {
            assert_eq!(code, Some(libc::SIGKILL));
        } else {
            let stderr = String::from_utf8_lossy(&status.stderr);
            assert_eq!(status.status.code(), Some(128 + sig), "{name}: {stderr}");
            assert!(stderr.contains("paused at step"), "{name}: {stderr}");
        }
        // Whatever the signal, `last` is whole and the run continues from it.
        let state = RunState::read(&out.join("last")).unwrap();
        let opts = ResumeOptions {
            stop_at_step: Some(state.global_step + 1),
            quiet: true,
            ..Default::default()
        };
        let resumed = resume::<AB>(&out, opts, &Default::default()).unwrap();
        assert_eq!(resumed.stop, Stop::Paused(state.global_step + 1), "{name}");
    }
}

/// `vicinity ablate`: two configurations × two seeds into one table; run again, it reads the
/// finished runs back instead of training them again.
#[test]
fn an_ablation_trains_each_configuration_and_seed_once_and_writes_one_table() {
    let t = TempDir::new("ablate");
    let d = data(&t.0, &["train", "test"]);
    let mut models = Vec::new();
    for kind in ["vicinity", "softmax"] {
        let vicinity::models::ModelConfig::Vvt(mut c) = demo::micro_vvt(2) else {
            unreachable!()
        };
        c.attention = vicinity::models::PerStage::All(kind.parse().unwrap());
        let path = t.0.join(format!("micro_{kind}.json"));
        std::fs::write(
            &path,
            serde_json::to_string(&vicinity::models::ModelConfig::Vvt(c)).unwrap(),
        )
        .unwrap();
        models.push(path.display().to_string());
    }
    let out = t.0.join("ablation");
    let ablate = |epochs: &str, seeds: &str, models: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_vicinity"))
            .args([
                "--backend",
                "flex",
                "ablate",
                "--recipe",
                "cifar-fast",
                "--resolution",
                "32",
            ])
            .args([
                "--batch",
                "4",
                "--workers",
                "1",
                "--epochs",
                epochs,
                "--seeds",
                seeds,
                "--models",
                models,
            ])
            .arg("--data")
            .arg(&d)
            .arg("--out")
            .arg(out)
            .output()
            .expect("the binary runs")
    };
    let run = || ablate("1", "0,1", &models.join(","), &out);
    let first = run();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let table = std::fs::read_to_string(out.join("ablation.md")).unwrap();
    for kind in ["micro_vicinity", "micro_softmax"] {
        let line = table
            .lines()
            .find(|l| l.contains(kind))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(line.contains("| 2 |"), "two seeds: {line}");
    }
    let csv = std::fs::read_to_string(out.join("ablation.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(
        std::fs::read(out.join("ablation.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    let stamp = |p: &Path| {
        std::fs::metadata(p.join("last/state.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let runs: Vec<PathBuf> = ["micro_vicinity-seed0", "micro_softmax-seed1"]
        .iter()
        .map(|r| out.join(r))
        .collect();
    let before: Vec<_> = runs.iter().map(|r| stamp(r)).collect();
    let second = run();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let after: Vec<_> = runs.iter().map(|r| stamp(r)).collect();
    assert_eq!(before, after, "finished runs are read back, not trained again");
    assert_eq!(std::fs::read_to_string(out.join("ablation.csv")).unwrap(), csv);
    // Another recipe into the same folder, or a model named twice, is refused.
    let other = ablate("2", "0", &models[0], &out);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("epochs: 1 then, 2 now"),
        "{err}"
    );
    let twice = ablate("1", "0,0", "vvt_tiny", &t.0.join("twice"));
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(
        !twice.status.success() && err.contains("would share the run folder"),
        "{err}"
    );
}
