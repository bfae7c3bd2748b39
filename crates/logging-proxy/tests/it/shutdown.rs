//! Shutdown keeps its grace period: exchanges still running when it is over are stopped and
//! recorded, instead of holding the process (defect: `shutdown_grace_ms` was not enforced and
//! the proxy waited for every exchange, up to the first-byte timeout and beyond).

use serde_json::json;
use tokio::time::Instant;
use tollgate_records::RawRecord;

use crate::support::{API, KEY, Stack, end_of, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_outliving_the_grace_period_is_stopped_and_recorded() {
    // The first-byte timeout is far beyond the test's patience: only the enforced grace can
    // end this exchange in time.
    let s = Stack::start(|c| c.limits.first_byte_timeout_ms = 600_000).await;
    let url = format!(
        "{}?{API}",
        s.url("/openai/deployments/gpt-4o/chat/completions")
    );
    let client = s.http.clone();
    let tasks = tokio_util::task::TaskTracker::new();
    let pending = tasks.spawn(async move {
        client
            .post(url)
            .header("api-key", KEY)
            .header("x-sim-fault", "slow-first-byte=600000")
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
    });
    s.sim_received(1).await;

    // The server's own grace (1 s in the support stack) passes, then it closes the connection.
    s.stop_serving().await;
    let answer = within("the client sees its connection end", pending)
        .await
        .expect("client task");
    assert!(answer.is_err(), "the client got no answer: {answer:?}");

    // The proxy's grace is over already: shutdown stops the exchange and records it.
    within("shutdown", s.proxy.shutdown(Instant::now())).await;
    let (records, dead) = s.feed().await;
    assert!(dead.is_empty());
    let ends: Vec<&RawRecord> = records
        .iter()
        .filter(|r| matches!(r, RawRecord::End(_)))
        .collect();
    assert_eq!(ends.len(), 1, "one end for the one exchange");
    let id = ends[0].request_id().to_owned();
    let mine: Vec<RawRecord> = records
        .into_iter()
        .filter(|r| r.request_id() == id)
        .collect();
    let end = end_of(&mine);
    assert_eq!(end.status, 503);
    assert_eq!(
        end.error.as_ref().map(|e| e.code.as_str()),
        Some("ShuttingDown")
    );
}
