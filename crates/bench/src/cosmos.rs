//! The Cosmos DB figures (`--cosmos`): what one logged request costs in Cosmos operations and
//! bytes, and the parser's records per second and per CPU second on the embedded store and on
//! Cosmos. Cosmos here is the Cosmos test server (in-memory JavaScript, one process on the same
//! cores): its speed is not Cosmos DB's, and its CPU is not counted as the parser's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::serve::ListenerExt;
use serde_json::json;
use tollgate_log_parser::{Parser, ParserConfig, RecordSink, StoreSink};
use tollgate_logging_proxy::{Proxy, ProxyDeps};
use tollgate_store::cosmos::CosmosStore;
use tollgate_store::{ChangeFeed, RawWriter, RequestStore, Store, StoreConfig};

use crate::{KEY, proxy_config};

/// A Cosmos configuration for the test server with a database of its own.
pub(crate) fn config(name: &str) -> tollgate_store::CosmosConfig {
    tollgate_store::conformance::cosmos_test_config(&format!("bench-{name}-{}", std::process::id()))
}

/// CPU time (user + system) this process has used, in milliseconds.
fn own_cpu_ms() -> f64 {
    crate::cpu_ms_of("self")
}

/// An in-process proxy logging to `store`, served on a free port; its address, and the
/// directory of its spool and journal (removed when dropped).
async fn proxy_on(
    sim_base: &str,
    store: Arc<dyn RawWriter>,
) -> anyhow::Result<(Proxy, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let proxy = Proxy::build(
        &proxy_config(sim_base),
        ProxyDeps {
            store,
            registry: None,
            data_dir: dir.path().to_path_buf(),
            after_flush: None,
            reload: None,
        },
    )?;
    let base = serve(&proxy).await?;
    Ok((proxy, base, dir))
}

async fn serve(proxy: &Proxy) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = proxy.router();
    tokio::spawn(async move {
        axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok(format!("http://{addr}"))
}

/// Sends one chat request and reads it to the end; the SSE frames it carried.
async fn one(client: &reqwest::Client, base: &str, stream: bool) -> anyhow::Result<usize> {
    let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let body = json!({"messages": [{"role": "user", "content": "benchmark"}],
                      "stream": stream, "max_tokens": 46});
    let text = client
        .post(&url)
        .header("api-key", KEY)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text.lines().filter(|l| l.starts_with("data:")).count())
}

/// Cosmos operations, documents and bytes one logged request costs when it is alone (the
/// writer's batch holds that request only): the mean over `n` requests of each kind.
pub(crate) async fn cost_per_request(sim_base: &str, n: usize) -> anyhow::Result<()> {
    let store = Arc::new(CosmosStore::open(&config("ops")).await?);
    let (proxy, base, _dir) = proxy_on(sim_base, store.clone()).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    println!("Cosmos per logged request (alone in its batch; mean of {n}):");
    for stream in [false, true] {
        let stats = store.raw_write_stats();
        let before = (
            stats.operations.load(Ordering::Relaxed),
            stats.documents.load(Ordering::Relaxed),
            stats.bytes.load(Ordering::Relaxed),
        );
        let mut frames = 0;
        for _ in 0..n {
            frames += one(&client, &base, stream).await?;
            proxy.flush().await;
        }
        let ops = stats.operations.load(Ordering::Relaxed) - before.0;
        let docs = stats.documents.load(Ordering::Relaxed) - before.1;
        let bytes = stats.bytes.load(Ordering::Relaxed) - before.2;
        let n = n as f64;
        let kind = if stream {
            format!("stream of {:.0} frames", frames as f64 / n)
        } else {
            "non-stream".to_owned()
        };
        println!(
            "  {kind:<22} {:.2} operations, {:.2} documents, {:.1} KB",
            ops as f64 / n,
            docs as f64 / n,
            bytes as f64 / n / 1024.0
        );
    }
    Ok(())
}

/// Logs `n` requests (half of them streams) through a proxy on `store`, then times one parser
/// consolidating them: raw records per second and per CPU second of this process.
async fn parse_rate(
    name: &str,
    sim_base: &str,
    store: Arc<dyn Store>,
    n: usize,
) -> anyhow::Result<()> {
    let (proxy, base, _dir) = proxy_on(sim_base, store.clone()).await?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(16)
        .build()?;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, base) = (client.clone(), base.clone());
        tasks.spawn(async move {
            for i in (worker..n).step_by(16) {
                one(&client, &base, i % 2 == 0).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    proxy.flush().await;
    let sinks: Vec<Arc<dyn RecordSink>> = vec![Arc::new(StoreSink::new(
        store.clone() as Arc<dyn RequestStore>
    ))];
    let parser = Parser::new(
        ParserConfig::default(),
        store.clone() as Arc<dyn ChangeFeed>,
        sinks,
    )?;
    let (cpu0, t0) = (own_cpu_ms(), Instant::now());
    parser.catch_up().await?;
    let (cpu, wall) = (own_cpu_ms() - cpu0, t0.elapsed().as_secs_f64());
    let s = parser.stats();
    println!(
        "  {name:<22} {} raw records, {} requests: {:.0} records/s, {:.0} records per CPU second",
        s.raw_records,
        s.consolidated,
        s.raw_records as f64 / wall,
        s.raw_records as f64 / (cpu / 1000.0).max(1e-9)
    );
    Ok(())
}

/// The parser's rate on each store.
pub(crate) async fn parser_rates(sim_base: &str, n: usize) -> anyhow::Result<()> {
    println!("parser, {n} requests (half streams) logged first, then consolidated by one parser:");
    let dir = tempfile::tempdir()?;
    let embedded = tollgate_store::open(&StoreConfig::embedded(dir.path())).await?;
    parse_rate("embedded", sim_base, embedded, n).await?;
    let cosmos = tollgate_store::open(&StoreConfig::Cosmos(config("parser"))).await?;
    parse_rate("Cosmos test server", sim_base, cosmos, n).await?;
    Ok(())
}
