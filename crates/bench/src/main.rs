//! Load benchmark: the same load generator against the simulator directly, through the proxy
//! with a discarding store (the cost of proxying and teeing alone), and through the proxy with
//! logging on (embedded store), in one run, non-stream and stream; then the proxy's memory with
//! many open streams. Prints figures and ratios; asserts nothing.
//!
//! The proxy runs in a child process (this binary re-executed with `serve-proxy`) so its CPU
//! and memory are its own; the simulator and the load generator share this process.
//!
//! Run: `cargo run --release -p tollgate-bench -- --seconds 5 --rounds 3 --concurrency 64`
//!
//! Before/after: build an earlier commit's benchmark (`git worktree add /tmp/base COMMIT`,
//! `cargo build --release -p tollgate-bench` there) and pass it as `--baseline
//! /tmp/base/target/release/tollgate-bench`; its proxy joins the same rounds as one more
//! target, so both are measured under the same conditions. Figures from separate runs are not
//! comparable on a shared machine: the direct target alone moved by a third between runs.

#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![expect(
    clippy::disallowed_methods,
    reason = "the benchmark owns its runtime and stops its tasks itself"
)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::serve::ListenerExt;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use null_writer::NullWriter;
use serde_json::json;
use tollgate_aoai_sim::{SimConfig, Simulator};
use tollgate_logging_proxy::config::{BackendConfig, ConsumerConfig};
use tollgate_logging_proxy::{Proxy, ProxyConfig, ProxyDeps};
use tollgate_store::RawWriter;

mod cosmos;
mod nginx;
mod profile;

const KEY: &str = "bench-key";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Seconds of load per scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open streams for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    open_streams: usize,
    /// Rounds per scenario; targets are interleaved within each round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only these scenarios, as `CONCURRENCY:KIND` (`64:stream`, `1:non-stream`); repeat
    /// the flag for several. Default: all four. Useful to profile one scenario.
    #[arg(long)]
    only: Vec<String>,
    /// Another build of this benchmark (an earlier commit's `tollgate-bench`) whose proxy runs,
    /// logging on, as one more target in the same rounds: a before/after comparison measured
    /// side by side, under the same machine conditions.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Runtime worker threads of the proxy process (default: one per core).
    #[arg(long)]
    proxy_workers: Option<usize>,
    /// Also the Cosmos DB store, on the Cosmos test server: a proxy logging to it joins the
    /// rounds, then the Cosmos cost of one logged request and the parser's rate on each store.
    #[arg(long)]
    cosmos: bool,
    /// Also a proxy whose consumer has request and token limits it never reaches: what
    /// counting them (the token estimate included) adds, in the same rounds.
    #[arg(long)]
    limits: bool,
    /// With --limits: also a proxy counting the same limits in a Redis (a `redis-server`
    /// started here on a free port), shared state's round trip included.
    #[arg(long)]
    redis: bool,
    /// Also a proxy whose deployment is a pool of three simulators (equal weights, logging
    /// on): what pool selection adds against the single-backend proxy, in the same rounds.
    #[arg(long)]
    pool: bool,
    /// Also a proxy whose consumers (this many) are all in the store's registry, none in its
    /// file, the load generator's key among them: what authenticating against the registry's
    /// directory costs against the one file consumer, in the same rounds.
    #[arg(long)]
    registry: Option<usize>,
    /// Also an nginx reverse-proxy hop in front of the simulator (`nginx` on PATH, buffering
    /// off, no logging): the floor of what one extra hop costs, in the same rounds.
    #[arg(long)]
    nginx: bool,
    /// After each scenario's rounds, one more window on the logging proxy under `perf record`:
    /// its CPU per request split by stage (see `profile.rs`; build with frame pointers).
    #[arg(long)]
    profile: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: run the proxy alone, print its address, serve until stdin closes.
    ServeProxy(ServeArgs),
}

/// How the proxy child is set up (`serve-proxy`).
#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    backend: String,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    null_store: bool,
    /// A Cosmos store configuration (JSON) instead of the embedded store.
    #[arg(long)]
    cosmos_config: Option<String>,
    /// The consumer has limits (never reached): requests and tokens counted per request.
    #[arg(long)]
    limits: bool,
    /// Count the limits in this Redis instead of the proxy's memory.
    #[arg(long)]
    redis_url: Option<String>,
    /// Register this many consumers in the (embedded) store, the benchmark's key among
    /// them, and declare none in the file.
    #[arg(long)]
    registered: Option<usize>,
}

mod null_writer {
    use async_trait::async_trait;
    use tollgate_records::RawRecord;
    use tollgate_store::{RawWriter, StoreError};

    /// Accepts and discards records: "logging off" at the store.
    pub(crate) struct NullWriter;

    #[async_trait]
    impl RawWriter for NullWriter {
        async fn append(&self, _batch: &[RawRecord]) -> Result<(), StoreError> {
            Ok(())
        }
    }
}

fn key_sha256() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Cmd::ServeProxy(args)) => runtime.block_on(serve_proxy(args)),
        None => runtime.block_on(bench(cli)),
    }
}

async fn serve_proxy(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        backend,
        data_dir,
        null_store,
        cosmos_config,
        limits,
        redis_url,
        registered,
    } = args;
    let mut config = proxy_config(&backend);
    if limits && registered.is_some() {
        bail!("--limits and --registered are separate targets");
    }
    let registry = match registered {
        Some(n) => {
            config.consumers.clear();
            Some(register(&data_dir, n).await?)
        }
        None => None,
    };
    let store: Arc<dyn RawWriter> = match (null_store, cosmos_config) {
        (true, _) => Arc::new(NullWriter),
        (false, Some(json)) => {
            let config = serde_json::from_str(&json).context("--cosmos-config")?;
            tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config)).await?
                as Arc<dyn RawWriter>
        }
        (false, None) => match &registry {
            Some(store) => store.clone() as Arc<dyn RawWriter>,
            None => {
                tollgate_store::open(&tollgate_store::StoreConfig::embedded(&data_dir)).await?
                    as Arc<dyn RawWriter>
            }
        },
    };
    if limits {
        // Far above what a run sends: every request is counted, none refused.
        config.consumers[0].limits = tollgate_logging_proxy::quota::ConsumerLimits {
            requests_per_minute: Some(u64::MAX / 4),
            tokens_per_minute: Some(u64::MAX / 4),
            tokens_per_day: Some(u64::MAX / 4),
            ..Default::default()
        };
    }
    config.limits_store.redis_url = redis_url;
    let proxy = Proxy::build(
        &config,
        ProxyDeps {
            store,
            registry,
            data_dir,
            after_flush: None,
            reload: None,
        },
    )?;
    proxy.load_registry().await?;
    serve_child(proxy).await
}

/// The embedded store under `data_dir` with `n` registered consumers: `n - 1` with keys of
/// their own, and one with the benchmark's key.
async fn register(
    data_dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<Arc<dyn tollgate_store::Store>> {
    use tollgate_logging_proxy::config::KeyConfig;
    use tollgate_logging_proxy::consumers::registry::{ConsumerDoc, hash_key, new_key};
    let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(data_dir)).await?;
    for i in 0..n {
        let sha256 = if i == 0 {
            key_sha256()
        } else {
            hash_key(&new_key())
        };
        let doc = ConsumerDoc {
            consumer: ConsumerConfig {
                id: format!("registered-{i}"),
                keys: vec![KeyConfig {
                    sha256,
                    ..KeyConfig::default()
                }],
                ..ConsumerConfig::default()
            },
            ..ConsumerDoc::default()
        };
        let written = store
            .put_consumer(&doc.consumer.id, &serde_json::to_value(&doc)?, None)
            .await?;
        if written.is_none() {
            bail!(
                "{} is already registered in {}",
                doc.consumer.id,
                data_dir.display()
            );
        }
    }
    Ok(store)
}

/// The proxy every target runs: one consumer, the simulator as its backend (several,
/// comma-separated: one pool of equal weights).
pub(crate) fn proxy_config(backends: &str) -> ProxyConfig {
    ProxyConfig {
        consumers: vec![ConsumerConfig {
            id: "bench".into(),
            key_sha256: vec![key_sha256()],
            ..Default::default()
        }],
        backends: backends
            .split(',')
            .enumerate()
            .map(|(i, endpoint)| BackendConfig {
                name: if i == 0 {
                    "sim".into()
                } else {
                    format!("sim{i}")
                },
                endpoint: endpoint.to_owned(),
                api_key: Some("sim".to_owned().into()),
                deployments: vec!["gpt-4o".into()],
                ..Default::default()
            })
            .collect(),
        ..ProxyConfig::default()
    }
}

/// Serves `proxy` as `tollgate proxy` does, prints its address, and stops when stdin closes.
async fn serve_child(proxy: Proxy) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let stop = async {
        // The parent closes our stdin to stop us.
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
    };
    // Served as `tollgate proxy` serves it: with the connection limits and header timeout.
    let token = tokio_util::sync::CancellationToken::new();
    let grace = std::time::Duration::from_secs(5);
    let (_, served) = tokio::join!(
        async {
            stop.await;
            token.cancel();
        },
        proxy.serve(listener, token.clone(), grace)
    );
    served?;
    proxy.shutdown(tokio::time::Instant::now() + grace).await;
    Ok(())
}

struct ChildProxy {
    child: Child,
    addr: String,
}

impl ChildProxy {
    fn start(
        exe: &std::path::Path,
        backend: &str,
        null_store: bool,
        dir: &std::path::Path,
        workers: Option<usize>,
        cosmos: Option<&tollgate_store::CosmosConfig>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(exe);
        if let Some(n) = workers {
            // Read by tokio's runtime builder in the child only.
            cmd.env("TOKIO_WORKER_THREADS", n.to_string());
        }
        cmd.args(["serve-proxy", "--backend", backend, "--data-dir"])
            .arg(dir);
        if null_store {
            cmd.arg("--null-store");
        }
        if let Some(c) = cosmos {
            cmd.arg("--cosmos-config").arg(serde_json::to_string(c)?);
        }
        cmd.args(extra);
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().to_owned();
        if addr.is_empty() {
            bail!("proxy child did not start");
        }
        Ok(ChildProxy { child, addr })
    }

    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time (user + system) the child has used so far, in milliseconds.
    fn cpu_ms(&self) -> f64 {
        cpu_ms_of(&self.child.id().to_string())
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) process `pid` (or `self`) has used so far, in milliseconds.
pub(crate) fn cpu_ms_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // /proc reports clock ticks in USER_HZ, which the kernel ABI fixes at 100 per second.
    ticks * 10.0
}

#[derive(Default)]
struct Figures {
    requests: usize,
    errors: usize,
    seconds: f64,
    latency: Vec<Duration>,
    ttfb: Vec<Duration>,
}

#[derive(Clone, Copy)]
struct Row {
    /// The proxy process's CPU time per request, in ms (NaN for the direct target).
    cpu_ms: f64,
    rps: f64,
    p50: f64,
    p99: f64,
    t50: f64,
    t99: f64,
    errors: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

async fn load(base: &str, key: &str, stream: bool, seconds: u64, concurrency: usize) -> Figures {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default();
    let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = json!({"messages": [{"role": "user", "content": "benchmark"}], "stream": stream,
                      "max_tokens": 48});
    let body = Arc::new(serde_json::to_vec(&body).unwrap_or_default());
    // Warm the connection pool and both tokenizers before measuring.
    for _ in 0..concurrency.min(8) {
        let _ = client
            .post(&url)
            .header("api-key", key)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        let key = key.to_owned();
        tasks.spawn(async move {
            let mut f = Figures::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let resp = client
                    .post(&url)
                    .header("api-key", &key)
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await;
                let Ok(resp) = resp else {
                    f.errors += 1;
                    continue;
                };
                if !resp.status().is_success() {
                    f.errors += 1;
                }
                let mut s = resp.bytes_stream();
                let mut first = true;
                while let Some(chunk) = s.next().await {
                    if chunk.is_err() {
                        f.errors += 1;
                        break;
                    }
                    if first {
                        f.ttfb.push(t0.elapsed());
                        first = false;
                    }
                }
                f.latency.push(t0.elapsed());
                f.requests += 1;
            }
            f
        });
    }
    let mut all = Figures::default();
    while let Some(Ok(f)) = tasks.join_next().await {
        all.requests += f.requests;
        all.errors += f.errors;
        all.latency.extend(f.latency);
        all.ttfb.extend(f.ttfb);
    }
    all.seconds = start.elapsed().as_secs_f64();
    all
}

/// A target of the rounds: its name, base URL, key, and the proxy child measured (none for the
/// simulator itself).
/// A target's name, base URL, key, and what its CPU is read from (none: not measured).
type Target<'a> = (&'static str, String, &'static str, Option<&'a dyn Measured>);

/// A process tree whose CPU time the benchmark reads.
trait Measured {
    /// CPU time (user + system) used so far, in milliseconds.
    fn cpu_ms(&self) -> f64;
}

impl Measured for ChildProxy {
    fn cpu_ms(&self) -> f64 {
        ChildProxy::cpu_ms(self)
    }
}

impl Measured for nginx::Nginx {
    fn cpu_ms(&self) -> f64 {
        nginx::Nginx::cpu_ms(self)
    }
}

/// Adds `child` (when it was started) as the target `name`; its place among the targets.
fn add_target<'a>(
    targets: &mut Vec<Target<'a>>,
    name: &'static str,
    child: Option<&'a ChildProxy>,
) -> Option<usize> {
    let c = child?;
    targets.push((
        name,
        format!("http://{}", c.addr),
        KEY,
        Some(c as &dyn Measured),
    ));
    Some(targets.len() - 1)
}

/// Prints target `t` against "proxy, logging on" (index 2) over the same rounds: throughput
/// and CPU per request as ratios, and the latency it adds, each the median of the rounds.
fn compare(rounds: &[Vec<Row>], t: usize, label: &str, note: &str) {
    let med = |f: &dyn Fn(&Vec<Row>) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "  {label}: throughput {:.2}x, CPU per request {:.2}x; added p50 {:.3} ms, p99 {:.3} ms (medians of rounds{note})",
        med(&|r| r[t].rps / r[2].rps),
        med(&|r| r[t].cpu_ms / r[2].cpu_ms),
        med(&|r| r[t].p50 - r[2].p50),
        med(&|r| r[t].p99 - r[2].p99),
    );
}

/// A simulator served from this process; its base URL and its server task.
async fn start_sim() -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let sim = Simulator::new(SimConfig::default())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = listener.local_addr()?;
    let router = sim.router();
    let task = tokio::spawn(async move {
        axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router,
        )
        .await
    });
    Ok((format!("http://{sim_addr}"), task))
}

async fn bench(cli: Cli) -> anyhow::Result<()> {
    let (sim_base, sim_task) = start_sim().await?;
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let null = ChildProxy::start(
        &exe,
        &sim_base,
        true,
        &dir.path().join("null"),
        cli.proxy_workers,
        None,
        &[],
    )?;
    let logged = ChildProxy::start(
        &exe,
        &sim_base,
        false,
        &dir.path().join("logged"),
        cli.proxy_workers,
        None,
        &[],
    )?;
    let on_cosmos = if cli.cosmos {
        Some(ChildProxy::start(
            &exe,
            &sim_base,
            false,
            &dir.path().join("cosmos"),
            cli.proxy_workers,
            Some(&cosmos::config("load")),
            &[],
        )?)
    } else {
        None
    };
    let baseline = cli
        .baseline
        .as_deref()
        .map(|exe| {
            ChildProxy::start(
                exe,
                &sim_base,
                false,
                &dir.path().join("baseline"),
                cli.proxy_workers,
                None,
                &[],
            )
        })
        .transpose()?;
    let mut pool_sims = Vec::new();
    let pooled = if cli.pool {
        let mut bases = vec![sim_base.clone()];
        for _ in 0..2 {
            let (base, task) = start_sim().await?;
            bases.push(base);
            pool_sims.push(task);
        }
        Some(ChildProxy::start(
            &exe,
            &bases.join(","),
            false,
            &dir.path().join("pool"),
            cli.proxy_workers,
            None,
            &[],
        )?)
    } else {
        None
    };
    let limited = if cli.limits {
        Some(ChildProxy::start(
            &exe,
            &sim_base,
            false,
            &dir.path().join("limits"),
            cli.proxy_workers,
            None,
            &["--limits"],
        )?)
    } else {
        None
    };
    // A redis-server of the benchmark's own, for the shared-limits target.
    let redis = if cli.limits && cli.redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("redis-server")?;
        // Accepting connections: bounded wait for the server to listen.
        let mut up = false;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        if !up {
            bail!("redis-server did not listen on {port}");
        }
        Some((child, format!("redis://127.0.0.1:{port}/")))
    } else {
        None
    };
    let shared = match &redis {
        Some((_, url)) => Some(ChildProxy::start(
            &exe,
            &sim_base,
            false,
            &dir.path().join("limits-redis"),
            cli.proxy_workers,
            None,
            &["--limits", "--redis-url", url],
        )?),
        None => None,
    };
    let registered = match cli.registry {
        Some(n) => Some(ChildProxy::start(
            &exe,
            &sim_base,
            false,
            &dir.path().join("registry"),
            cli.proxy_workers,
            None,
            &["--registered", &n.to_string()],
        )?),
        None => None,
    };
    let hop = if cli.nginx {
        Some(nginx::Nginx::start(&sim_base, &dir.path().join("nginx"))?)
    } else {
        None
    };
    let idle_rss = logged.rss_mb();

    println!(
        "machine: {} cores; {} s per run; same load generator for every target",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cli.seconds
    );
    let mut targets: Vec<Target<'_>> = vec![
        ("direct", sim_base.clone(), "sim", None),
        (
            "proxy, store discards",
            format!("http://{}", null.addr),
            KEY,
            Some(&null as &dyn Measured),
        ),
        (
            "proxy, logging on",
            format!("http://{}", logged.addr),
            KEY,
            Some(&logged as &dyn Measured),
        ),
    ];
    let nginx_at = match &hop {
        Some(n) => {
            targets.push((
                "nginx hop",
                format!("http://{}", n.addr),
                "sim",
                Some(n as &dyn Measured),
            ));
            Some(targets.len() - 1)
        }
        None => None,
    };
    // Each optional proxy joins the rounds when it was started; its place, for the comparisons.
    let baseline_at = add_target(&mut targets, "baseline, logging on", baseline.as_ref());
    let cosmos_at = add_target(&mut targets, "proxy, logging to Cosmos", on_cosmos.as_ref());
    let pool_at = add_target(&mut targets, "proxy, pool of 3", pooled.as_ref());
    let limits_at = add_target(&mut targets, "proxy, consumer limits", limited.as_ref());
    let shared_at = add_target(&mut targets, "proxy, limits in Redis", shared.as_ref());
    let registry_at = add_target(&mut targets, "proxy, registry keys", registered.as_ref());
    for concurrency in [1, cli.concurrency] {
        for stream in [false, true] {
            let kind = if stream { "stream" } else { "non-stream" };
            if !cli.only.is_empty() && !cli.only.contains(&format!("{concurrency}:{kind}")) {
                continue;
            }
            println!();
            println!(
                "concurrency {concurrency}, {kind}: {} rounds, targets interleaved",
                cli.rounds
            );
            println!(
                "{:<24} {:>9} {:>8} {:>8} {:>9} {:>9} {:>7} {:>12}",
                "target (median)",
                "req/s",
                "p50 ms",
                "p99 ms",
                "ttfb p50",
                "ttfb p99",
                "errors",
                "proxy CPU/req"
            );
            // Rounds interleave the targets so that drift in the machine's speed (other
            // tenants) hits all of them alike; medians and per-round ratios are reported.
            let mut rounds: Vec<Vec<Row>> = Vec::new();
            for _ in 0..cli.rounds {
                let mut round = Vec::new();
                for (_, base, key, child) in &targets {
                    let cpu_before = child.map(|c| c.cpu_ms());
                    let mut f = load(base, key, stream, cli.seconds, concurrency).await;
                    // The proxy's CPU over the run (its background work included: the
                    // recorder's writes land within the run at these rates) per request.
                    let cpu_ms = cpu_before
                        .zip(child.map(|c| c.cpu_ms()))
                        .map_or(f64::NAN, |(a, b)| (b - a) / f.requests.max(1) as f64);
                    round.push(Row {
                        cpu_ms,
                        rps: f.requests as f64 / f.seconds,
                        p50: pct(&mut f.latency, 0.5),
                        p99: pct(&mut f.latency, 0.99),
                        t50: pct(&mut f.ttfb, 0.5),
                        t99: pct(&mut f.ttfb, 0.99),
                        errors: f.errors,
                    });
                }
                rounds.push(round);
            }
            let med = |t: usize, get: fn(&Row) -> f64| {
                median(rounds.iter().map(|r| get(&r[t])).collect())
            };
            for (t, (name, _, _, _)) in targets.iter().enumerate() {
                let errors: usize = rounds.iter().map(|r| r[t].errors).sum();
                println!(
                    "{name:<24} {:>9.0} {:>8.3} {:>8.3} {:>9.3} {:>9.3} {errors:>7} {:>12.3}",
                    med(t, |r| r.rps),
                    med(t, |r| r.p50),
                    med(t, |r| r.p99),
                    med(t, |r| r.t50),
                    med(t, |r| r.t99),
                    med(t, |r| r.cpu_ms),
                );
            }
            let ratios: Vec<f64> = rounds.iter().map(|r| r[2].rps / r[0].rps).collect();
            println!(
                "  logging on vs direct: throughput {:.2}x (rounds {}); added p50 {:.3} ms, p99 {:.3} ms; added ttfb p50 {:.3} ms, p99 {:.3} ms",
                median(ratios.clone()),
                ratios
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                median(rounds.iter().map(|r| r[2].p50 - r[0].p50).collect()),
                median(rounds.iter().map(|r| r[2].p99 - r[0].p99).collect()),
                median(rounds.iter().map(|r| r[2].t50 - r[0].t50).collect()),
                median(rounds.iter().map(|r| r[2].t99 - r[0].t99).collect()),
            );
            if cli.profile {
                let data = dir.path().join(format!("perf-{concurrency}-{kind}.data"));
                let before = logged.cpu_ms();
                let recording = profile::record(logged.child.id(), &data)?;
                let f = load(
                    &format!("http://{}", logged.addr),
                    KEY,
                    stream,
                    cli.seconds,
                    concurrency,
                )
                .await;
                let cpu_us = (logged.cpu_ms() - before) * 1000.0 / f.requests.max(1) as f64;
                let shares = recording.finish()?;
                println!(
                    "  where the logging proxy's {cpu_us:.0} µs of CPU per request go (perf, one more window):"
                );
                for s in shares {
                    println!(
                        "    {:<56} {:>7.1} µs  {:>5.1} %  (in the kernel {:>3.0} %)",
                        s.stage,
                        s.share * cpu_us,
                        s.share * 100.0,
                        s.kernel * 100.0
                    );
                }
            }
            if let Some(n) = nginx_at {
                let med = |f: &dyn Fn(&Vec<Row>) -> f64| median(rounds.iter().map(f).collect());
                println!(
                    "  logging on vs the nginx hop: throughput {:.2}x, CPU per request {:.2}x; added p50 {:.3} ms, p99 {:.3} ms; the hop vs direct: throughput {:.2}x (medians of rounds)",
                    med(&|r| r[2].rps / r[n].rps),
                    med(&|r| r[2].cpu_ms / r[n].cpu_ms),
                    med(&|r| r[2].p50 - r[n].p50),
                    med(&|r| r[2].p99 - r[n].p99),
                    med(&|r| r[n].rps / r[0].rps),
                );
            }
            if let Some(t) = cosmos_at {
                let rps: Vec<f64> = rounds.iter().map(|r| r[t].rps / r[2].rps).collect();
                let cpu: Vec<f64> = rounds.iter().map(|r| r[t].cpu_ms / r[2].cpu_ms).collect();
                println!(
                    "  Cosmos vs embedded: throughput {:.2}x, CPU per request {:.2}x; p99 {:.3} against {:.3} ms (medians of rounds; the Cosmos test server shares the cores)",
                    median(rps),
                    median(cpu),
                    median(rounds.iter().map(|r| r[t].p99).collect()),
                    median(rounds.iter().map(|r| r[2].p99).collect()),
                );
            }
            let against_logged = [
                (pool_at, "pool of 3 vs one backend (logging on)", ""),
                (
                    limits_at,
                    "consumer limits vs none (logging on, in-memory counters)",
                    "",
                ),
                (
                    shared_at,
                    "limits in Redis vs none (logging on)",
                    "; redis-server shares the cores",
                ),
                (
                    registry_at,
                    "key among the registry's consumers vs one file consumer (logging on)",
                    "",
                ),
            ];
            for (at, label, note) in against_logged {
                if let Some(t) = at {
                    compare(&rounds, t, label, note);
                }
            }
            if let Some(b) = baseline_at {
                let rps: Vec<f64> = rounds.iter().map(|r| r[2].rps / r[b].rps).collect();
                let cpu: Vec<f64> = rounds.iter().map(|r| r[2].cpu_ms / r[b].cpu_ms).collect();
                println!(
                    "  logging on vs baseline: throughput {:.2}x, CPU per request {:.2}x (medians of rounds)",
                    median(rps),
                    median(cpu)
                );
            }
        }
    }
    println!();
    if let Some(c) = on_cosmos {
        c.stop();
        cosmos::cost_per_request(&sim_base, 10).await?;
        cosmos::parser_rates(&sim_base, 2000).await?;
        println!();
    }

    if let Some(p) = pooled {
        p.stop();
    }
    if let Some(l) = limited {
        l.stop();
    }
    if let Some(l) = shared {
        l.stop();
    }
    if let Some(r) = registered {
        r.stop();
    }
    if let Some(n) = hop {
        n.stop();
    }
    if let Some((mut child, _)) = redis {
        let _ = child.kill();
        let _ = child.wait();
    }
    for t in pool_sims {
        t.abort();
    }
    if cli.open_streams == 0 {
        null.stop();
        logged.stop();
        if let Some(b) = baseline {
            b.stop();
        }
        sim_task.abort();
        return Ok(());
    }
    // Memory with many open streams: slow streams, held open until all have started.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(cli.open_streams)
        .build()?;
    let url = format!(
        "http://{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        logged.addr
    );
    let body = json!({"messages": [{"role": "user", "content": "hold"}], "stream": true});
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(cli.open_streams);
    let release = Arc::new(tokio::sync::Notify::new());
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..cli.open_streams {
        let (client, url, body, tx, release) = (
            client.clone(),
            url.clone(),
            body.clone(),
            started_tx.clone(),
            release.clone(),
        );
        holders.spawn(async move {
            let resp = client
                .post(&url)
                .header("api-key", KEY)
                .header("x-sim-inter-token-ms", "200")
                .json(&body)
                .send()
                .await;
            let Ok(resp) = resp else { return };
            let mut s = resp.bytes_stream();
            let _ = s.next().await;
            let _ = tx.send(()).await;
            release.notified().await;
        });
    }
    drop(started_tx);
    let mut open = 0;
    while open < cli.open_streams && started_rx.recv().await.is_some() {
        open += 1;
    }
    let busy_rss = logged.rss_mb();
    println!("proxy RSS: {idle_rss:.1} MB idle, {busy_rss:.1} MB with {open} open streams");
    release.notify_waiters();
    holders.abort_all();
    null.stop();
    logged.stop();
    if let Some(b) = baseline {
        b.stop();
    }
    sim_task.abort();
    Ok(())
}
