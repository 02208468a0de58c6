//! The live progress line: `\r`-updated on a terminal, plain lines at most every
//! [`Progress::PLAIN_EVERY_S`] seconds otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    tty: bool,
    quiet: bool,
    last_plain: Option<Instant>,
    open_line: bool,
}

impl Progress {
    pub const PLAIN_EVERY_S: f64 = 15.0;

    pub fn new(quiet: bool) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            quiet,
            last_plain: None,
            open_line: false,
        }
    }

    /// Refreshes the progress line.
    pub fn update(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{text}\x1b[K");
            let _ = err.flush();
            self.open_line = true;
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed().as_secs_f64() >= Self::PLAIN_EVERY_S)
        {
            let _ = writeln!(err, "{text}");
            self.last_plain = Some(Instant::now());
        }
    }

    /// Prints a permanent line (clearing the progress line first).
    pub fn line(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.open_line {
            let _ = write!(err, "\r\x1b[K");
            self.open_line = false;
        }
        let _ = writeln!(err, "{text}");
    }
}
