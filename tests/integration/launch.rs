//! `vicinity launch` with real processes on the CPU (ranks meet over TCP): a two-rank run
//! finishes with rank 0's run directory, and a rank that dies or hangs ends the whole job with
//! a message naming it, leaving the last checkpoint whole.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vicinity::data::synth::{Encoding, write_image_folder};
use vicinity::train::checkpoint::RunState;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicinity-launch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn data(root: &Path) -> PathBuf {
    let d = root.join("data");
    write_image_folder(
        &d,
        &["train", "test"],
        &["a", "b", "c"],
        8,
        [32, 32],
        Encoding::Png,
    )
    .unwrap();
    d
}

/// `vicinity launch --nproc 2 train ...` on a micro VVT, with extra environment.
fn launch(root: &Path, data: &Path, env: &[(&str, &str)], extra: &[&str]) -> (Output, Duration) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vvt_mini.json");
    let out = root.join("run");
    let mut args = vec![
        "--backend",
        "flex",
        "launch",
        "--nproc",
        "2",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--recipe",
        "cifar-fast",
        "--resolution",
        "32",
        "--batch",
        "4",
        "--eval-batch",
        "4",
        "--epochs",
        "2",
        "--workers",
        "1",
        "--num-classes",
        "3",
    ];
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_vicinity"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    (o, t0.elapsed())
}

#[test]
fn two_processes_train_one_run() {
    let root = tmp("ok");
    let d = data(&root);
    let (o, _) = launch(&root, &d, &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("on 2 ranks (host collectives)"), "{err}");
    assert!(err.contains("batch 8 (4 per rank x 2)"), "{err}");
    let state = RunState::read(&root.join("run/last")).unwrap();
    assert!(state.finished);
    // 24 images, 8 per step: 3 steps an epoch.
    assert_eq!(
        (
            state.global_step,
            state.config.world_size,
            state.config.batch_size
        ),
        (6, 2, 4)
    );
    assert!(root.join("run/metrics.csv").is_file());
}

#[test]
fn a_rank_that_dies_ends_the_job_and_names_itself() {
    let root = tmp("dies");
    let d = data(&root);
    // Rank 1 exits as step 4 begins, after the first epoch's checkpoint.
    let (o, took) = launch(&root, &d, &[("VICINITY_DEBUG_FAULT", "exit:1:4")], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("rank 1 exited with status 3"), "{err}");
    assert!(err.contains("lost rank 1"), "{err}");
    assert!(took < Duration::from_secs(60), "the job took {took:?} to end");
    // The checkpoint of the finished epoch is whole and resumable.
    let state = RunState::read(&root.join("run/last")).unwrap();
    assert_eq!(state.global_step, 3);
}

#[test]
fn a_rank_that_hangs_is_named_after_the_timeout() {
    let root = tmp("hangs");
    let d = data(&root);
    let (o, took) = launch(
        &root,
        &d,
        &[
            ("VICINITY_DEBUG_FAULT", "hang:1:4"),
            ("VICINITY_DIST_TIMEOUT", "8"),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("rank 1 sent nothing for 8 s") || err.contains("rank(s) 1 stopped"),
        "{err}"
    );
    assert!(took < Duration::from_secs(90), "the job took {took:?} to end");
    assert_eq!(RunState::read(&root.join("run/last")).unwrap().global_step, 3);
}

#[test]
fn commands_other_than_train_refuse_to_run_under_a_launcher() {
    let o = Command::new(env!("CARGO_BIN_EXE_vicinity"))
        .args([
            "--backend",
            "flex",
            "launch",
            "--nproc",
            "2",
            "bench",
            "--model",
            "vvt_tiny",
        ])
        .output()
        .expect("the binary runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("only `train` runs over several processes"), "{err}");
}
