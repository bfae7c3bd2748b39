//! The CLI's own output to stdout (results and the startup banner). Diagnostics go through
//! `tracing` to stderr.

use std::io::Write;

/// Writes a line and flushes, so a parent process reading our stdout sees it at once.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
