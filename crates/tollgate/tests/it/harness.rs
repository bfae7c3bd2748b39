//! Starts a whole pipeline in-process and synchronises on its flush/catch-up, never on time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use axum::serve::ListenerExt;
use sha2::{Digest, Sha256};
use tollgate_aoai_sim::{SimConfig, Simulator};
use tollgate_log_parser::{Parser, ParserConfig, RecordSink, StoreSink};
use tollgate_logging_proxy::config::{BackendConfig, ConsumerConfig};
use tollgate_logging_proxy::{Proxy, ProxyConfig, ProxyDeps};
use tollgate_records::{ConsolidatedRecord, RawRecord};
use tollgate_store::{ChangeFeed, RawWriter, RequestStore, Store, StoreError};

pub(crate) const KEY: &str = "test-consumer-key";
pub(crate) const SIM_KEY: &str = "test-sim-key";
pub(crate) const API: &str = "api-version=2024-10-21";

/// A raw writer that fails on demand, to exercise the spool.
pub(crate) struct Flaky {
    inner: Arc<dyn Store>,
    pub(crate) failing: AtomicBool,
    /// While a test holds this lock, appends wait: the store is stalled.
    pub(crate) stall: tokio::sync::Mutex<()>,
}

#[async_trait]
impl RawWriter for Flaky {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        let _stalled = self.stall.lock().await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.append(batch).await
    }

    // Forwarded, so the proxy's records reach the store with their JSON as in production.
    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<Arc<str>>],
    ) -> Result<(), StoreError> {
        let _stalled = self.stall.lock().await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.append_encoded(batch, json).await
    }
}

pub(crate) struct Stack {
    pub(crate) proxy: Proxy,
    /// The configuration the proxy was built with (to reload a changed copy).
    pub(crate) config: ProxyConfig,
    pub(crate) parser: Arc<Parser>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) flaky: Arc<Flaky>,
    pub(crate) sim: Simulator,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub(crate) fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(crate) async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    addr
}

pub(crate) async fn start(tweak: impl FnOnce(&mut ProxyConfig)) -> Stack {
    start_with_sinks(tweak, Vec::new()).await
}

pub(crate) async fn start_with_sinks(
    tweak: impl FnOnce(&mut ProxyConfig),
    extra_sinks: Vec<Arc<dyn RecordSink>>,
) -> Stack {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
        .await
        .expect("store");
    start_on(dir, store, tweak, extra_sinks).await
}

/// The stack on `store`, its proxy's local state (spool, journal) in `dir`.
pub(crate) async fn start_on(
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    tweak: impl FnOnce(&mut ProxyConfig),
    extra_sinks: Vec<Arc<dyn RecordSink>>,
) -> Stack {
    let sim = Simulator::new(SimConfig {
        api_key: Some(SIM_KEY.into()),
        ..SimConfig::default()
    })
    .expect("sim");
    let sim_addr = serve(sim.router()).await;
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
        stall: tokio::sync::Mutex::new(()),
    });
    let proxy = Proxy::build(
        &config,
        ProxyDeps {
            store: flaky.clone(),
            registry: Some(store.clone() as Arc<dyn tollgate_store::Store>),
            data_dir: dir.path().to_path_buf(),
            after_flush: None,
            reload: None,
        },
    )
    .expect("proxy");
    let proxy_addr = serve(proxy.router()).await;
    let mut sinks: Vec<Arc<dyn RecordSink>> = vec![Arc::new(StoreSink::new(
        store.clone() as Arc<dyn RequestStore>
    ))];
    sinks.extend(extra_sinks);
    let parser_config = ParserConfig {
        deployment_models: sim
            .config()
            .deployments
            .iter()
            .map(|d| (d.name.clone(), d.model.clone()))
            .collect(),
        ..ParserConfig::default()
    };
    let parser = Arc::new(
        Parser::new(parser_config, store.clone() as Arc<dyn ChangeFeed>, sinks).expect("parser"),
    );
    Stack {
        proxy,
        config,
        parser,
        store,
        flaky,
        sim,
        base: format!("http://{proxy_addr}"),
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        _dir: dir,
    }
}

impl Stack {
    pub(crate) fn chat_url(&self, deployment: &str) -> String {
        format!(
            "{}/openai/deployments/{deployment}/chat/completions?{API}",
            self.base
        )
    }

    pub(crate) fn post(&self, url: &str, body: &serde_json::Value) -> reqwest::RequestBuilder {
        self.http.post(url).header("api-key", KEY).json(body)
    }

    /// Posts `body` with a simulator fault (`x-sim-fault`) and returns the response.
    pub(crate) async fn post_with_fault(
        &self,
        url: &str,
        body: &serde_json::Value,
        fault: &str,
    ) -> reqwest::Response {
        self.post(url, body)
            .header("x-sim-fault", fault)
            .send()
            .await
            .expect("request sent")
    }

    /// The same request answered without streaming: the simulator's content does not depend
    /// on `stream`, so its `usage` is the exact count of what a streamed answer carried.
    pub(crate) async fn unstreamed(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> serde_json::Value {
        let mut plain = body.clone();
        if let Some(map) = plain.as_object_mut() {
            map.remove("stream");
            map.remove("stream_options");
        }
        let resp = self.post(url, &plain).send().await.expect("send");
        resp.json().await.expect("json body")
    }

    /// The admin metrics (Prometheus text), read with the admin key `admin_key`.
    pub(crate) async fn metrics(&self, admin_key: &str) -> String {
        self.http
            .get(format!("{}/tollgate/admin/metrics", self.base))
            .header("api-key", admin_key)
            .send()
            .await
            .expect("GET metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Everything recorded so far is written and consolidated.
    pub(crate) async fn settle(&self) {
        self.proxy.flush().await;
        self.parser.catch_up().await.expect("parser catches up");
    }

    pub(crate) async fn record(&self, id: &str) -> ConsolidatedRecord {
        self.store
            .get(id)
            .await
            .expect("store read")
            .expect("consolidated record exists")
    }

    pub(crate) async fn raw(&self, id: &str) -> Vec<RawRecord> {
        self.store.read_request(id).await.expect("raw records")
    }
}

/// GET `url` with `key` as the `api-key`; the JSON answer (admin views).
pub(crate) async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> serde_json::Value {
    http.get(url)
        .header("api-key", key)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("a JSON answer")
}

pub(crate) fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()[tollgate_logging_proxy::REQUEST_ID_HEADER]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// SSE `data:` payloads of a stream body, `[DONE]` excluded.
pub(crate) fn frames(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("json frame"))
        .collect()
}
