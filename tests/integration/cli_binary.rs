//! The `vicinity` binary run as a user runs it: help texts, exit codes, errors on bad arguments,
//! and a command that needs no device staying quiet about the GPU.

use std::process::{Command, Output};

use crate::common::fixtures_dir;

fn vicinity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicinity"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const COMMANDS: [&str; 12] = [
    "models",
    "flops",
    "features",
    "convert",
    "compare",
    "bench",
    "train",
    "ablate",
    "eval",
    "predict",
    "check-kernels",
    "explain",
];

#[test]
fn help_describes_every_command() {
    let o = vicinity(&["--help"]);
    assert!(o.status.success());
    let (out, _) = text(&o);
    for c in COMMANDS {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{c} ")))
            .unwrap_or_else(|| panic!("`vicinity --help` does not list {c}:\n{out}"));
        assert!(
            line.split_whitespace().count() > 2,
            "{c} has no description: {line}"
        );
    }
    for c in COMMANDS {
        let o = vicinity(&[c, "--help"]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{c} --help: {err}");
        assert!(out.contains("Usage: vicinity"), "{c} --help:\n{out}");
    }
    let (convert, _) = text(&vicinity(&["convert", "--help"]));
    assert!(
        convert.contains("official .pth checkpoint to native safetensors"),
        "{convert}"
    );
    let (check, _) = text(&vicinity(&["check-kernels", "--help"]));
    assert!(check.contains("fused GPU kernel"), "{check}");
}

#[test]
fn models_and_flops_run_without_a_device() {
    let o = vicinity(&["models"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for name in [
        "vvt_tiny",
        "vvt_large",
        "lsagt_cifar_tiny",
        "lsagt_imagenet_small",
    ] {
        assert!(
            out.contains(name),
            "{name} missing from `vicinity models`:\n{out}"
        );
    }
    assert!(
        !err.to_lowercase().contains("cublas"),
        "models spoke of cuBLAS: {err}"
    );
    let o = vicinity(&["flops", "vvt_tiny", "--total"]);
    let (out, _) = text(&o);
    assert!(
        o.status.success() && out.contains("GFLOPs") && out.contains("224²"),
        "{out}"
    );
}

#[test]
fn bad_arguments_fail_with_a_message_and_a_non_zero_code() {
    // A misspelled model: the error names the valid ones.
    let o = vicinity(&["flops", "vvt_tinyy"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unknown model 'vvt_tinyy'") && err.contains("vvt_tiny"),
        "{err}"
    );
    // Flags clap rejects: exit code 2 and a usage line.
    for args in [
        &["bench", "--model", "vvt_tiny", "--batch", "0"][..],
        &["bench", "--model", "vvt_tiny", "--dtype", "f16"],
        &["no-such-command"],
        &["train", "--budget", "4x"],
    ] {
        let o = vicinity(args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("error:"), "{args:?}: {err}");
    }
    // A training without a model says what is missing.
    let o = vicinity(&["--backend", "flex", "train", "--data", "nowhere"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--model"), "{err}");
}

/// `features` on an official checkpoint, then `compare` against the authors' outputs: exit 0;
/// against another model's outputs: exit 1.
#[test]
fn features_then_compare_reproduce_a_fixture() {
    let dir = std::env::temp_dir().join(format!("vicinity-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("vvt_mini.safetensors");
    let fixtures = fixtures_dir();
    let pth = fixtures.join("vvt_mini.pth");
    let io = fixtures.join("vvt_mini_io.safetensors");
    let o = vicinity(&[
        "--backend",
        "flex",
        "features",
        "--model",
        "configs/vvt_mini.json",
        "--weights",
        pth.to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let o = vicinity(&["compare", out.to_str().unwrap(), io.to_str().unwrap()]);
    let (stdout, _) = text(&o);
    assert!(o.status.success() && stdout.contains("OK"), "{stdout}");
    let other = fixtures.join("vvt_mini_sr_io.safetensors");
    let o = vicinity(&["compare", out.to_str().unwrap(), other.to_str().unwrap()]);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench --from` draws the report of saved rows without measuring, and names a line that is no
/// bench row.
#[test]
fn bench_redraws_saved_rows() {
    let dir = crate::common::TempDir::new("bench-from");
    let row = |model: &str, res: usize, ips: f64| {
        format!(
            r#"{{"model":"{model}","mode":"train","dtype":"f32","resolution":{res},"batch":16,"first_step_s":1.0,"mean_step_ms":10.0,"images_per_s":{ips},"last_loss":2.3,"peak_in_use_gib":1.5,"peak_reserved_gib":2.0}}"#
        )
    };
    let (a, b) = (dir.0.join("a.jsonl"), dir.0.join("b.jsonl"));
    std::fs::write(
        &a,
        format!(
            "{}\n{}\n",
            row("vvt_tiny", 224, 400.0),
            row("vvt_tiny", 384, 200.0)
        ),
    )
    .unwrap();
    std::fs::write(&b, format!("{}\n", row("vvt_tiny_pvt", 224, 700.0))).unwrap();
    let report = dir.0.join("report");
    let o = vicinity(&[
        "--backend",
        "flex",
        "bench",
        "--from",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("vvt_tiny")).count(),
        3,
        "{out}"
    );
    for f in ["bench.csv", "bench.jsonl", "bench.png"] {
        assert!(report.join(f).is_file(), "{f}");
    }
    std::fs::write(&b, "{\"model\": 3}\n").unwrap();
    let o = vicinity(&["--backend", "flex", "bench", "--from", b.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("b.jsonl line 1: not a bench row"),
        "{err}"
    );
}
