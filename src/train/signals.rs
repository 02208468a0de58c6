//! Ctrl-C, SIGTERM and SIGHUP (a closed terminal) pause a run: the loop finishes its step,
//! writes `last` and stops. A second signal exits at once (checkpoints are atomic, so even that
//! leaves no torn file).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by Ctrl-C / SIGTERM (see [`install_interrupt_handler`]): the loop checkpoints and pauses.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process is enough; again is harmless).
pub fn install_interrupt_handler() {
    #[cfg(unix)]
    {
        extern "C" fn on_signal(_: libc::c_int) {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(130) };
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
pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
