//! Backends reached with a managed identity, as in Container Apps: `tollgate up` runs as a child
//! process with `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` pointing at a local token endpoint
//! that speaks the App Service / Container Apps managed-identity protocol (api-version
//! 2019-08-01, the secret in `x-identity-header`, `expires_on` in epoch seconds as a string).
//! The simulator plays a resource with local auth disabled: an `api-key` gets 403, an expired
//! token 401. The token endpoint counts its fetches; `azure_identity` (not our code) speaks
//! the protocol.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use tollgate_aoai_sim::{SimConfig, Simulator};

use crate::harness::serve;
use crate::up::{Up, UpConfig};

const KEY: &str = "entra-consumer-key";
const ADMIN_KEY: &str = "entra-admin-key";
const SECRET: &str = "identity-header-secret";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
/// The outer bound of every wait.
const PATIENCE: Duration = Duration::from_secs(60);

/// One token handed out: when, and until when it is valid.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    at: u64,
    expires_on: u64,
}

/// The token endpoint's state: lifetimes still to hand out (the last repeats), fetches made,
/// and any request that broke the protocol.
#[derive(Default)]
struct Endpoint {
    lifetimes: Vec<u64>,
    fetches: Vec<Fetch>,
    refused: Vec<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT-shaped token (the simulator reads its `exp`, as AOAI refuses an expired token).
fn jwt(n: usize, exp: u64) -> String {
    let enc = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.signature",
        enc(json!({"alg": "RS256", "typ": "JWT"})),
        enc(json!({"aud": "https://cognitiveservices.azure.com", "exp": exp, "n": n}))
    )
}

async fn token(
    State(state): State<Arc<Mutex<Endpoint>>>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut s = state.lock().unwrap();
    let problem = if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(SECRET)
    {
        Some("x-identity-header")
    } else if q.get("api-version").map(String::as_str) != Some("2019-08-01") {
        Some("api-version")
    } else if q.get("resource").map(String::as_str) != Some("https://cognitiveservices.azure.com") {
        Some("resource")
    } else if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        Some("client_id")
    } else {
        None
    };
    if let Some(p) = problem {
        s.refused.push(format!("{p}: {q:?}"));
        return (StatusCode::BAD_REQUEST, "bad request").into_response();
    }
    let life = if s.lifetimes.len() > 1 {
        s.lifetimes.remove(0)
    } else {
        s.lifetimes.first().copied().unwrap_or(3600)
    };
    let at = now();
    let expires_on = at + life;
    s.fetches.push(Fetch { at, expires_on });
    let n = s.fetches.len();
    axum::Json(json!({
        "access_token": jwt(n, expires_on),
        "expires_on": expires_on.to_string(),
        "resource": "https://cognitiveservices.azure.com",
        "token_type": "Bearer",
        "client_id": CLIENT_ID,
    }))
    .into_response()
}

/// The token endpoint, the simulator (keys refused) and `tollgate up` reaching it with the
/// managed identity.
struct Rig {
    endpoint: Arc<Mutex<Endpoint>>,
    up: Up,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn rig(lifetimes: &[u64]) -> Rig {
    let endpoint = Arc::new(Mutex::new(Endpoint {
        lifetimes: lifetimes.to_vec(),
        ..Endpoint::default()
    }));
    let tokens = serve(
        axum::Router::new()
            .route("/msi/token", axum::routing::get(token))
            .with_state(endpoint.clone()),
    )
    .await;
    let sim = Simulator::new(SimConfig {
        local_auth_disabled: true,
        ..SimConfig::default()
    })
    .expect("sim");
    let sim = serve(sim.router()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sections = format!(
        r#"[[proxy.backends]]
name = "aoai"
endpoint = "http://{sim}"
deployments = ["gpt-4o"]
entra = {{ kind = "managed_identity", client_id = "{CLIENT_ID}" }}
"#
    );
    let identity_endpoint = format!("http://{tokens}/msi/token");
    let up = Up::start(
        dir.path(),
        &data,
        "tollgate-entra",
        &UpConfig {
            env: &[
                ("IDENTITY_ENDPOINT", &identity_endpoint),
                ("IDENTITY_HEADER", SECRET),
            ],
            consumer: "entra",
            key: KEY,
            admin_key: ADMIN_KEY,
            sections: &sections,
        },
    );
    Rig {
        endpoint,
        up,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        _dir: dir,
    }
}

impl Rig {
    async fn chat(&self) -> u16 {
        let resp = self
            .http
            .post(format!("{}{CHAT}", self.up.base()))
            .header("api-key", KEY)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "{body}");
        status
    }

    fn fetches(&self) -> Vec<Fetch> {
        let s = self.endpoint.lock().unwrap();
        assert!(s.refused.is_empty(), "protocol broken: {:?}", s.refused);
        s.fetches.clone()
    }

    async fn backends(&self) -> serde_json::Value {
        let url = format!("{}/tollgate/admin/backends", self.up.base());
        crate::harness::get_json(&self.http, &url, ADMIN_KEY).await
    }
}

/// Many requests, some at once, and one token fetch: the simulator (refusing keys) answers
/// every one, so each carried the Bearer token and no `api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_fetch_serves_every_request_and_no_key_reaches_aoai() {
    let rig = rig(&[3600]).await;
    let at_once = futures_util::future::join_all((0..16).map(|_| rig.chat())).await;
    assert_eq!(at_once.len(), 16);
    for _ in 0..10 {
        rig.chat().await;
    }
    assert_eq!(rig.fetches().len(), 1, "one fetch for 26 requests");
    let b = rig.backends().await;
    assert_eq!(b["backends"][0]["auth"], "entra");
    assert_eq!(b["backends"][0]["tokenFetches"], 1);
}

/// A token whose expiry nears is replaced before it expires, by one fetch, while requests go
/// on being answered: the first token is handed out 302 s from expiry, 2 s outside the
/// 300 s refresh window, so the refresh falls due within the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_refreshed_ahead_of_its_expiry() {
    let rig = rig(&[302, 3600]).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut sent = 0;
    while rig.fetches().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh after {sent} requests"
        );
        rig.chat().await;
        sent += 1;
    }
    for _ in 0..10 {
        rig.chat().await;
    }
    let fetches = rig.fetches();
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    // Refreshed with minutes to spare, not at expiry.
    assert!(
        fetches[0].expires_on - fetches[1].at >= 240,
        "refreshed ahead of expiry: {fetches:?}"
    );
}
