//! `--profile`: where a logged request's CPU goes, stage by stage. One more window of the
//! scenario runs against the logging proxy while `perf record` samples its call stacks; each
//! sample is given to a stage by the innermost frame that names one (walking from the leaf:
//! a SQLite frame is the store write; else the innermost `tollgate_*` frame's module; else the
//! library or the kernel the sample is in), and each stage's share of the samples, times the
//! CPU the proxy used per request in that window, is its CPU per request.
//!
//! Stacks need frame pointers: build the benchmark with
//! `RUSTFLAGS="-C force-frame-pointers=yes"` (its own target directory keeps the normal build).
//! glibc and the kernel have their own unwinding: a sample inside them is still given to the
//! Rust frame above.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A running `perf record` on one process.
pub(crate) struct Recording {
    child: Child,
    data: std::path::PathBuf,
}

/// Starts sampling `pid`'s call stacks (1999 Hz, frame-pointer call graphs) into `data`.
pub(crate) fn record(pid: u32, data: &Path) -> anyhow::Result<Recording> {
    let child = Command::new("perf")
        .args(["record", "-F", "1999", "-g", "-q", "-o"])
        .arg(data)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (Debian's linux-perf) is not on PATH")?;
    Ok(Recording {
        child,
        data: data.to_owned(),
    })
}

impl Recording {
    /// Stops sampling (SIGINT, so perf writes its file) and attributes the samples to stages:
    /// each stage's share of the samples.
    pub(crate) fn finish(mut self) -> anyhow::Result<Vec<Share>> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let out = Command::new("perf")
            .args(["script", "-F", "ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(shares(&text))
    }
}

/// One stage's share of the samples, and the share of its samples spent in the kernel
/// (system calls, the network stack).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Share {
    pub stage: String,
    pub share: f64,
    pub kernel: f64,
}

/// Each stage's share of the samples in `perf script` output (samples separated by blank
/// lines, one frame per line, leaf first, `ADDR SYMBOL (DSO)`), largest first.
fn shares(script: &str) -> Vec<Share> {
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for sample in script.split("\n\n") {
        let frames: Vec<&str> = sample
            .lines()
            .filter_map(|l| l.trim().split_once(' ').map(|(_, sym)| sym.trim()))
            .collect();
        if frames.is_empty() {
            continue;
        }
        total += 1;
        let in_kernel = frames[0].contains("kernel");
        let c = counts.entry(stage(&frames)).or_default();
        c.0 += 1;
        c.1 += u64::from(in_kernel);
    }
    let mut out: Vec<Share> = counts
        .into_iter()
        .map(|(s, (n, k))| Share {
            stage: s,
            share: n as f64 / total.max(1) as f64,
            kernel: k as f64 / n.max(1) as f64,
        })
        .collect();
    out.sort_by(|a, b| b.share.total_cmp(&a.share));
    out
}

/// The stage a stack (leaf first) belongs to.
fn stage(frames: &[&str]) -> String {
    if frames
        .iter()
        .any(|f| f.contains("rusqlite") || f.contains("sqlite3"))
    {
        return "store write (SQLite)".to_owned();
    }
    let mut ours = frames
        .iter()
        .filter_map(|f| f.split("tollgate_").nth(1))
        .map(module_stage);
    if let Some(innermost) = ours.next() {
        // Shared helpers are charged to the stage that called them: the spool's file writes
        // serve the journal too, and a record is serialised by the journal, the store's
        // `append` and others (named).
        return match innermost {
            "spool" | "record types (serialising)" => {
                let caller = ours.find(|s| *s != innermost && *s != "spool");
                match (innermost, caller) {
                    (_, Some("journal (write-ahead, kill safety)")) => {
                        if innermost == "spool" {
                            "journal (write-ahead, kill safety)"
                        } else {
                            "record JSON for the journal"
                        }
                    }
                    ("record types (serialising)", Some(caller)) => {
                        return format!("record JSON made in: {caller}");
                    }
                    ("record types (serialising)", None) => "record JSON, caller not in the stack",
                    _ => innermost,
                }
                .to_owned()
            }
            other => other.to_owned(),
        };
    }
    let leaf = frames.first().copied().unwrap_or_default();
    let any = |needle: &str| frames.iter().any(|f| f.contains(needle));
    let library = if any("reqwest") || any("hyper_util::client") || any("hyper::client") {
        "HTTP client to the backend (reqwest, hyper)"
    } else if any("hyper_util::server") || any("hyper::server") || any("axum::serve") {
        "HTTP server to the client (hyper)"
    } else if any("hyper") || any("httparse") {
        "HTTP, side not named in the stack (hyper)"
    } else if leaf.contains("malloc") || leaf.contains("free") || leaf.contains("realloc") {
        "allocator (outside the proxy's code)"
    } else if any("tokio") {
        "runtime (tokio scheduling, timers, I/O driver)"
    } else if leaf.contains("[unknown]") {
        "unknown"
    } else {
        "kernel and other"
    };
    library.to_owned()
}

/// The stage of a frame in a `tollgate_*` crate (`rest` follows `tollgate_`).
fn module_stage(rest: &str) -> &'static str {
    let has = |m: &str| rest.contains(m);
    if rest.starts_with("logging_proxy") {
        if has("recorder::journal") {
            "journal (write-ahead, kill safety)"
        } else if has("recorder::spool") {
            "spool"
        } else if has("recorder") {
            "recorder (queue, batching, record JSON)"
        } else if has("tee::") {
            "tee and segmenting"
        } else if has("exchange::") || has("pool::") || has("stall::") || has("backend_auth") {
            "exchange with the backend (forwarding)"
        } else if has("quota") {
            "limits"
        } else {
            "request phases and layers (auth, path, body, describe, route)"
        }
    } else if rest.starts_with("records") {
        "record types (serialising)"
    } else if rest.starts_with("store") {
        "store (outside SQLite)"
    } else if rest.starts_with("tokens") {
        "token counting"
    } else {
        "other Tollgate code"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_go_to_the_innermost_stage() {
        let script = "\
\t1 memcpy (libc.so.6)
\t2 tollgate_logging_proxy::tee::Tee::push (bench)
\t3 tollgate_logging_proxy::phases::handle (bench)

\t1 sqlite3VdbeExec (bench)
\t2 rusqlite::Statement::execute (bench)
\t3 tollgate_logging_proxy::recorder::writer::run (bench)

\t1 tcp_sendmsg ([kernel.kallsyms])
\t2 hyper::proto::h1::dispatch::Dispatcher::poll_write (bench)
\t3 hyper_util::server::conn::auto::Connection::poll (bench)

\t1 tollgate_logging_proxy::recorder::journal::append (bench)

\t1 write ([kernel.kallsyms])
\t2 tollgate_logging_proxy::recorder::spool::AppendFile::write_all (bench)
\t3 tollgate_logging_proxy::recorder::journal::Journal::run (bench)

\t1 serde_json::ser::format_escaped_str (bench)
\t2 tollgate_records::Body::serialize (bench)
\t3 tollgate_logging_proxy::recorder::spool::encode_frame (bench)
\t4 tollgate_logging_proxy::recorder::journal::Journal::frame (bench)
";
        let got: BTreeMap<String, (f64, f64)> = shares(script)
            .into_iter()
            .map(|s| (s.stage, (s.share, s.kernel)))
            .collect();
        let sixth = 1.0 / 6.0;
        assert_eq!(got["tee and segmenting"], (sixth, 0.0));
        assert_eq!(got["store write (SQLite)"], (sixth, 0.0));
        assert_eq!(got["HTTP server to the client (hyper)"], (sixth, 1.0));
        assert_eq!(
            got["journal (write-ahead, kill safety)"],
            (2.0 * sixth, 0.5)
        );
        assert_eq!(got["record JSON for the journal"], (sixth, 0.0));
    }
}
