//! The `vicinity` binary: everything lives in [`vicinity::cli`].

fn main() -> std::process::ExitCode {
    vicinity::cli::main()
}
