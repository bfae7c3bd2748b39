//! The recorder seen from outside the proxy: records left in the spool by an earlier run are
//! replayed at start, a corrupt one and one the store rejects for good are set aside (never
//! silently), and both show at `/tollgate/admin/metrics`.
#![expect(clippy::expect_used, reason = "test helpers fail loudly")]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use http::Request;
use sha2::{Digest, Sha256};
use tollgate_logging_proxy::{Proxy, ProxyConfig, ProxyDeps};
use tollgate_records::RawRecord;
use tollgate_store::conformance::sample_request;
use tollgate_store::{RawWriter, StoreError};
use tower::ServiceExt as _;

const ADMIN_KEY: &str = "recorder-admin-key";

/// Keeps what it is given, except one record it refuses for good.
#[derive(Default)]
struct Rejecting {
    stored: Mutex<Vec<String>>,
}

#[async_trait]
impl RawWriter for Rejecting {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        if let Some(bad) = batch.iter().find(|r| r.request_id() == "refused") {
            return Err(StoreError::Rejected {
                id: bad.id(),
                detail: "document too large".into(),
            });
        }
        let mut stored = self.stored.lock().expect("store lock");
        stored.extend(batch.iter().map(RawRecord::id));
        Ok(())
    }
}

/// A spool file as an earlier run would have left it: frames of
/// `[len u32 LE][crc32 u32 LE][JSON]`, the third one damaged.
fn leave_spool(dir: &Path) {
    std::fs::create_dir_all(dir).expect("spool dir");
    let mut bytes = Vec::new();
    for (i, id) in ["first", "refused", "damaged", "last"].iter().enumerate() {
        let payload = serde_json::to_vec(&sample_request(id)).expect("record JSON");
        let mut crc = crc32fast::hash(&payload);
        if i == 2 {
            crc ^= 1;
        }
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&payload);
    }
    std::fs::write(dir.join(format!("{:016}.spool", 7)), bytes).expect("spool file");
}

async fn metrics(proxy: &Proxy) -> HashMap<String, u64> {
    let request = Request::get("/tollgate/admin/metrics")
        .header("api-key", ADMIN_KEY)
        .body(Body::empty())
        .expect("request");
    let response = proxy.router().oneshot(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    String::from_utf8(body.to_vec())
        .expect("UTF-8")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn spooled_records_that_are_corrupt_or_rejected_are_set_aside_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    leave_spool(&spool_dir);
    let mut config = ProxyConfig {
        admin_key_sha256: Some(hex::encode(Sha256::digest(ADMIN_KEY.as_bytes()))),
        ..ProxyConfig::default()
    };
    config.recorder.retry_interval_ms = 3_600_000;
    let store = Arc::new(Rejecting::default());
    let proxy = Proxy::build(
        &config,
        ProxyDeps {
            store: store.clone(),
            registry: None,
            data_dir: dir.path().to_path_buf(),
            after_flush: None,
            reload: None,
        },
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), proxy.flush())
        .await
        .expect("flush returns");

    assert_eq!(
        *store.stored.lock().unwrap(),
        vec!["first:0", "last:0"],
        "the rest replayed, in order, past both"
    );
    let dead = std::fs::read_to_string(spool_dir.join("dead-letter.jsonl")).unwrap();
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "refused:0");
    assert_eq!(dead[0]["record"]["requestId"], "refused");

    let m = metrics(&proxy).await;
    assert_eq!(m["tollgate_recorder_records_dead_lettered_total"], 1);
    assert_eq!(m["tollgate_recorder_records_corrupt_total"], 1);
    assert_eq!(m["tollgate_recorder_records_replayed_total"], 2);
    assert_eq!(m["tollgate_recorder_spool_bytes"], 0);
    assert_eq!(m["tollgate_recorder_queue_bytes"], 0);
    assert_eq!(proxy.recorder().spooled_bytes(), 0);
}
