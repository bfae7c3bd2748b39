//! The proxy in-process on port 0 (served by `Proxy::serve`, so the connection limits and the
//! header-read timeout apply) in front of the simulator, a raw HTTP/1 client for what an HTTP
//! library would refuse or normalise, and readers of the raw records through the change feed.
//! Tests synchronise on events (the simulator receiving a request, `Proxy::flush`, a connection
//! reaching EOF), never on sleeps; every wait has an outer timeout so a break fails instead of
//! hanging.
#![expect(clippy::expect_used, reason = "test helpers fail loudly")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_aoai_sim::{SimConfig, Simulator};
use tollgate_logging_proxy::config::{BackendConfig, ConsumerConfig};
use tollgate_logging_proxy::{Proxy, ProxyConfig, ProxyDeps, REQUEST_ID_HEADER};
use tollgate_records::{EndRecord, RawRecord, RequestRecord};
use tollgate_store::{DeadLetter, RawWriter, Store, StoreError};

pub(crate) const KEY: &str = "hostile-consumer-key";
pub(crate) const SIM_KEY: &str = "hostile-sim-key";
pub(crate) const API: &str = "api-version=2024-10-21";
/// The outer safety net of every wait: far above anything a passing run needs.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Awaits `f`, failing the test (instead of hanging) if it takes longer than [`PATIENCE`].
pub(crate) async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The store behind the proxy, failing on demand (transiently) to put records in the spool.
pub(crate) struct Flaky {
    inner: Arc<dyn Store>,
    pub(crate) failing: AtomicBool,
}

#[async_trait]
impl RawWriter for Flaky {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.append(batch).await
    }

    // Forwarded, so the proxy's records reach the store with their JSON as in production.
    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<std::sync::Arc<str>>],
    ) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.append_encoded(batch, json).await
    }
}

pub(crate) struct Stack {
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) flaky: Arc<Flaky>,
    pub(crate) sim: Simulator,
    pub(crate) addr: SocketAddr,
    pub(crate) http: reqwest::Client,
    /// Requests the simulator has received so far, updated as each arrives.
    arrivals: watch::Receiver<u64>,
    stop: CancellationToken,
    /// The proxy's server alone, so a test can wait for it to stop.
    server: TaskTracker,
    _tasks: TaskTracker,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Stack {
    /// Simulator + proxy (consumer `tester` with [`KEY`]), `tweak` applied to the proxy's
    /// configuration.
    pub(crate) async fn start(tweak: impl FnOnce(&mut ProxyConfig)) -> Stack {
        Self::start_with_sim(|_| {}, tweak).await
    }

    /// [`Stack::start`] with `sim` applied to the simulator's configuration too.
    pub(crate) async fn start_with_sim(
        sim: impl FnOnce(&mut SimConfig),
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
            .await
            .expect("store");
        let mut sim_config = SimConfig {
            api_key: Some(SIM_KEY.into()),
            ..SimConfig::default()
        };
        sim(&mut sim_config);
        let sim = Simulator::new(sim_config).expect("sim");
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();

        let (seen, arrivals) = watch::channel(0u64);
        let seen = Arc::new(seen);
        let sim_router = sim.router().layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                seen.send_modify(|n| *n += 1);
                next.run(request)
            },
        ));
        let sim_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
        let sim_addr = sim_listener.local_addr().expect("sim addr");
        let sim_stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(sim_listener, sim_router)
                .with_graceful_shutdown(sim_stop.cancelled_owned())
                .await
        });

        let mut config = ProxyConfig {
            consumers: vec![ConsumerConfig {
                id: "tester".into(),
                key_sha256: vec![sha(KEY)],
                ..Default::default()
            }],
            backends: vec![BackendConfig {
                name: "sim".into(),
                endpoint: format!("http://{sim_addr}"),
                api_key: Some(SIM_KEY.to_owned().into()),
                deployments: sim
                    .config()
                    .deployments
                    .iter()
                    .map(|d| d.name.clone())
                    .collect(),
                ..Default::default()
            }],
            ..ProxyConfig::default()
        };
        tweak(&mut config);
        let flaky = Arc::new(Flaky {
            inner: store.clone(),
            failing: AtomicBool::new(false),
        });
        let proxy = Arc::new(
            Proxy::build(
                &config,
                ProxyDeps {
                    store: flaky.clone(),
                    registry: None,
                    data_dir: dir.path().to_path_buf(),
                    after_flush: None,
                    reload: None,
                },
            )
            .expect("proxy"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let serving = proxy.clone();
        let server_stop = stop.clone();
        let server = TaskTracker::new();
        server.spawn(async move {
            serving
                .serve(listener, server_stop, Duration::from_secs(1))
                .await
        });
        server.close();
        tasks.close();
        Stack {
            proxy,
            store,
            flaky,
            sim,
            addr,
            // No pooled connections: each request its own, so a connection the proxy closed
            // (header-read timeout, connection caps) is never reused by accident.
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
            arrivals,
            stop,
            server,
            _tasks: tasks,
            _dir: dir,
        }
    }

    /// Stops the server: no new connections; open ones get the serve grace, then are closed.
    /// Returns once the server has stopped.
    pub(crate) async fn stop_serving(&self) {
        self.stop.cancel();
        within("the server stops", self.server.wait()).await;
    }

    pub(crate) fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub(crate) fn chat_url(&self, deployment: &str) -> String {
        self.url(&format!(
            "/openai/deployments/{deployment}/chat/completions?{API}"
        ))
    }

    /// A chat request with the consumer key and a JSON body.
    pub(crate) fn chat(&self, body: &serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(self.chat_url("gpt-4o"))
            .header("api-key", KEY)
            .json(body)
    }

    /// Waits until the simulator has received `n` requests in all.
    pub(crate) async fn sim_received(&self, n: u64) {
        let mut rx = self.arrivals.clone();
        within(&format!("{n} requests at the simulator"), async {
            rx.wait_for(|seen| *seen >= n).await.expect("sim running");
        })
        .await;
    }

    /// Every exchange has ended and its records are in the store.
    pub(crate) async fn flush(&self) {
        within("the proxy's flush", self.proxy.flush()).await;
    }

    /// The raw records of one request, by seq.
    pub(crate) async fn records(&self, request_id: &str) -> Vec<RawRecord> {
        self.store
            .read_request(request_id)
            .await
            .expect("read request")
    }

    /// The whole change feed from the start, and the documents it could not read.
    pub(crate) async fn feed(&self) -> (Vec<RawRecord>, Vec<DeadLetter>) {
        let mut records = Vec::new();
        let mut dead = Vec::new();
        let mut position: Option<String> = None;
        // Bounded: each page moves the position on; a feed of this size ends long before.
        for _ in 0..10_000 {
            let page = self
                .store
                .read(tollgate_store::embedded::UNIT, position.as_deref(), 100)
                .await
                .expect("feed page");
            if page.records.is_empty() && page.dead_letters.is_empty() {
                return (records, dead);
            }
            records.extend(page.records);
            dead.extend(page.dead_letters);
            assert!(page.position.is_some(), "a non-empty page has a position");
            position = page.position;
        }
        panic!("the change feed did not end");
    }

    /// A raw request on a fresh connection; the whole response.
    pub(crate) async fn raw(&self, request: &[u8]) -> RawResponse {
        let mut stream = self.connect().await;
        stream.write_all(request).await.expect("write request");
        within("a raw response", read_response(&mut stream))
            .await
            .expect("read response")
    }

    pub(crate) async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    /// A connection with a small receive buffer, so a client that reads slowly (or not at
    /// all) holds the proxy's writes back after a few kilobytes.
    pub(crate) async fn connect_small_window(&self) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        socket.connect(self.addr).await.expect("connect")
    }
}

/// An HTTP/1.1 request as bytes, sent as written (no normalisation of the target).
pub(crate) fn raw_request(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nhost: tollgate.test\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    /// Lower-cased names.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn request_id(&self) -> String {
        self.header(REQUEST_ID_HEADER)
            .unwrap_or_else(|| panic!("no {REQUEST_ID_HEADER} on {self:?}"))
            .to_owned()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The AOAI error `code` of the body.
    pub(crate) fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no error code in {self:?}"))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response: the head, then a body sized by `content-length`, chunked, or up to EOF.
pub(crate) async fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("content-length");
        while rest.len() < len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&rest, b"\r\n") {
                    break i;
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(RawResponse {
                        status,
                        headers,
                        body,
                    });
                }
                rest.extend_from_slice(&chunk[..n]);
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            rest.drain(..line_end + 2);
            if size == 0 {
                break;
            }
            while rest.len() < size + 2 {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            let take = size.min(rest.len());
            body.extend_from_slice(&rest[..take]);
            rest.drain(..(take + 2).min(rest.len()));
        }
        body
    } else {
        stream.read_to_end(&mut rest).await?;
        rest
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Reads until the peer closes the connection: `Ok` with what arrived before EOF, or the error
/// that ended it (a reset also means closed).
pub(crate) async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The one `request` record among a request's records.
pub(crate) fn request_of(records: &[RawRecord]) -> &RequestRecord {
    let requests: Vec<&RequestRecord> = records
        .iter()
        .filter_map(|r| match r {
            RawRecord::Request(q) => Some(q),
            _ => None,
        })
        .collect();
    assert_eq!(requests.len(), 1, "one request record: {records:#?}");
    requests[0]
}

/// The one `end` record among a request's records.
pub(crate) fn end_of(records: &[RawRecord]) -> &EndRecord {
    let ends: Vec<&EndRecord> = records
        .iter()
        .filter_map(|r| match r {
            RawRecord::End(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 1, "exactly one end record: {records:#?}");
    ends[0]
}

/// Every request in `records` that has a `request` record has exactly one `end`, and every
/// `end` belongs to a recorded request.
pub(crate) fn assert_one_end_each(records: &[RawRecord]) {
    let mut by_id: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in records {
        let e = by_id.entry(r.request_id()).or_default();
        match r {
            RawRecord::Request(_) => e.0 += 1,
            RawRecord::End(_) => e.1 += 1,
            _ => {}
        }
    }
    for (id, (requests, ends)) in by_id {
        assert_eq!(
            (requests, ends),
            (1, 1),
            "request {id}: (request records, end records)"
        );
    }
}

/// The stream's SSE payloads joined from its `chunks` records, in seq order.
pub(crate) fn segments_text(records: &[RawRecord]) -> String {
    let mut chunks: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            RawRecord::Chunks(c) => Some(c),
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|c| c.seq);
    let bytes: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.data.to_bytes().expect("segment bytes"))
        .collect();
    String::from_utf8(bytes).expect("SSE is UTF-8")
}
