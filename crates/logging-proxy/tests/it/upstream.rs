//! What a backend answers reaches the client as it was answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::support::*;

/// Review finding: the proxy's HTTP client followed redirects (reqwest's default, up to ten),
/// so a backend's 307 was replayed — body and backend key included — to wherever it pointed,
/// and the client got the final answer as if the backend had given it. A gateway passes a
/// redirect through; the client decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_redirect_is_passed_to_the_client_not_followed() {
    let followed = Arc::new(AtomicU64::new(0));
    let counter = followed.clone();
    let backend = Router::new()
        .route(
            "/openai/deployments/gpt-4o/chat/completions",
            post(|| async {
                let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
                r.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_static("/elsewhere"));
                r
            }),
        )
        .route(
            "/elsewhere",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "followed" }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tasks = TaskTracker::new();
    tasks.spawn(async move { axum::serve(listener, backend).await });

    let stack = Stack::start(|c| c.backends[0].endpoint = format!("http://{addr}")).await;
    // A client that does not follow redirects either, so what it sees is what the proxy sent.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = client
        .post(stack.chat_url("gpt-4o"))
        .header("api-key", KEY)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 307);
    assert_eq!(
        resp.headers()
            .get(header::LOCATION)
            .map(HeaderValue::as_bytes),
        Some(&b"/elsewhere"[..])
    );
    stack.flush().await;
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
    let id = resp
        .headers()
        .get(tollgate_logging_proxy::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .expect("request id")
        .to_owned();
    let records = stack.records(&id).await;
    assert_eq!(end_of(&records).status, 307, "recorded as answered");
}
