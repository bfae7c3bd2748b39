//! `tollgate up` as a child process (bundled simulator, embedded store), for the tests that
//! drive the real binary from outside: the hostile-client run and the SIGKILL run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tollgate_records::ConsolidatedRecord;
use tollgate_store::{RecordQuery, Store};

use crate::harness::sha;

/// What differs between the runs' configurations.
pub(crate) struct UpConfig<'a> {
    pub consumer: &'a str,
    pub key: &'a str,
    pub admin_key: &'a str,
    /// More TOML sections (`[proxy.limits]`, `[proxy.recorder]`), as written.
    pub sections: &'a str,
    /// Environment variables the process gets besides the test's own.
    pub env: &'a [(&'a str, &'a str)],
}

/// A `tollgate up` child; killed on drop, its log's tail printed when the test failed.
pub(crate) struct Up {
    /// Shared, so that a test's worker can kill the process itself.
    pub child: Arc<Mutex<Child>>,
    pub addr: SocketAddr,
    /// The admin listener's address, when `[proxy.admin] listen` is set.
    pub admin: Option<SocketAddr>,
    log: PathBuf,
}

impl Up {
    /// Writes the configuration to `dir/tollgate.toml`, starts `tollgate up` on it with `data`
    /// as its data directory and stderr in `dir/{log_name}.log`, and reads where it listens
    /// from its banner.
    pub(crate) fn start(dir: &Path, data: &Path, log_name: &str, c: &UpConfig<'_>) -> Up {
        let config = dir.join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"shutdown_grace_ms = 2000
[proxy]
admin_key_sha256 = "{admin}"
[[proxy.consumers]]
id = "{consumer}"
key_sha256 = ["{key}"]
{sections}
[log]
filter = "warn"
"#,
                admin = sha(c.admin_key),
                consumer = c.consumer,
                key = sha(c.key),
                sections = c.sections,
            ),
        )
        .expect("write config");
        let log = dir.join(format!("{log_name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["up", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .envs(c.env.iter().copied())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tollgate up");
        let stdout = child.stdout.take().expect("stdout");
        let (mut addr, mut admin) = (None, None);
        // The banner is a handful of lines; `listening on` comes first (after the admin
        // listener's line). The rest of stdout (the banner's tail, `stopped`) is small; the
        // pipe holds it.
        for line in BufReader::new(stdout).lines().take(50) {
            let line = line.expect("stdout line");
            if let Some(url) = line.strip_prefix("admin API on http://") {
                let host = url.split('/').next().unwrap_or_default();
                admin = Some(host.parse().expect("admin address"));
            }
            if let Some(url) = line.strip_prefix("listening on http://") {
                addr = Some(url.trim().parse().expect("listen address"));
                break;
            }
        }
        let addr = addr.unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "tollgate up did not say where it listens:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Up {
            child: Arc::new(Mutex::new(child)),
            addr,
            admin,
            log,
        }
    }

    pub(crate) fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `VmHWM` (peak resident memory) of the child, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.lock().expect("child").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
        print_tail_if_failed("tollgate up", &self.log, 40);
    }
}

/// The last `lines` of a child's log, printed when the test is failing: they explain it.
#[expect(clippy::print_stderr, reason = "the child's log explains a failed run")]
pub(crate) fn print_tail_if_failed(name: &str, log: &Path, lines: usize) {
    if !std::thread::panicking() {
        return;
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    eprintln!("{name} log (tail):\n{}", tail.join("\n"));
}

/// The embedded store under `data`, opened from the test (the writing process may be gone).
pub(crate) async fn open_store(data: &Path) -> Arc<dyn Store> {
    tollgate_store::open(&tollgate_store::StoreConfig::embedded(data))
        .await
        .expect("open the store")
}

/// Every consolidated record in `store`, and how many there are of each request id.
pub(crate) async fn consolidated(
    store: &dyn Store,
) -> (Vec<ConsolidatedRecord>, BTreeMap<String, usize>) {
    let all = store
        .list(&RecordQuery {
            limit: Some(100_000),
            ..RecordQuery::default()
        })
        .await
        .expect("list");
    let mut count = BTreeMap::new();
    for r in &all {
        *count.entry(r.id.clone()).or_default() += 1;
    }
    (all, count)
}
