//! Ctrl-C, SIGTERM and SIGHUP (a closed terminal) pause a run: the loop finishes its step,
//! writes `last` and stops. A second signal exits at once (checkpoints are atomic, so even that
//! leaves no torn file). The command then exits with 128 + the signal's number, as a shell
//! expects of a process stopped by a signal, so that scripts can tell a pause from a finish.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked for a pause (0: none), see [`install_interrupt_handler`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Installs the handler (once per process is enough; again is harmless).
pub fn install_interrupt_handler() {
    #[cfg(unix)]
    {
        extern "C" fn on_signal(sig: libc::c_int) {
            if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(128 + sig) };
            }
        }
        // SAFETY: installing a handler that only touches an atomic and calls _exit.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Whether a pause was asked for.
pub(crate) fn interrupted() -> bool {
    interrupting_signal().is_some()
}

/// The signal that asked for a pause, if one did.
fn interrupting_signal() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Ends the process with 128 + the signal's number if a signal asked for the pause that stopped
/// the command (its checkpoint is written by then): the commands' one exit for a pause.
pub fn exit_if_paused_by_signal(what: &str) {
    if let Some(sig) = interrupting_signal() {
        eprintln!("{what} paused by signal {sig}; run the same command (train: --resume) to continue");
        std::process::exit(128 + sig);
    }
}
