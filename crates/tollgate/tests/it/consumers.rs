//! Consumers declared in the configuration: keys with expiry and a rotation overlap (at most two
//! unexpired), the deployments a consumer may call, and a rotation applied by a reload without a
//! restart.

use serde_json::json;
use tollgate_logging_proxy::config::{ConsumerConfig, KeyConfig};

use crate::harness::{self, Stack, request_id};

const OLD: &str = "tg-old-key";
const NEW: &str = "tg-new-key";

fn key(k: &str, expires: Option<chrono::DateTime<chrono::Utc>>, name: &str) -> KeyConfig {
    KeyConfig {
        sha256: harness::sha(k),
        expires,
        name: Some(name.into()),
        ..KeyConfig::default()
    }
}

fn consumer(keys: Vec<KeyConfig>, deployments: &[&str]) -> ConsumerConfig {
    ConsumerConfig {
        id: "team-a".into(),
        display_name: Some("Team A".into()),
        owner: Some("a@example.com".into()),
        deployments: deployments.iter().map(|d| (*d).to_owned()).collect(),
        keys,
        ..Default::default()
    }
}

async fn call(s: &Stack, key: &str, deployment: &str) -> reqwest::Response {
    s.http
        .post(s.chat_url(deployment))
        .header("api-key", key)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap()
}

/// Rotation: both keys work during the overlap; once the old one expires (a reload of the
/// file with its expiry passed) it gets 401, the new one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_overlaps_then_the_old_key_expires() {
    let later = chrono::Utc::now() + chrono::Duration::days(7);
    let both = vec![
        key(OLD, Some(later), "primary"),
        key(NEW, None, "secondary"),
    ];
    let s = harness::start(|c| c.consumers.push(consumer(both, &[]))).await;
    for k in [OLD, NEW] {
        let resp = call(&s, k, "gpt-4o").await;
        assert_eq!(resp.status(), 200, "{k} during the overlap");
        resp.text().await.unwrap();
    }
    // The old key's expiry has passed: applied by a reload, no restart.
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut config = s.config.clone();
    config.consumers[1] = consumer(
        vec![key(OLD, Some(past), "primary"), key(NEW, None, "secondary")],
        &[],
    );
    s.proxy.reload(&config).expect("reloaded");
    let expired = call(&s, OLD, "gpt-4o").await;
    assert_eq!(expired.status(), 401);
    let id = request_id(&expired);
    let body: serde_json::Value = expired.json().await.unwrap();
    assert_eq!(body["error"]["code"], "401");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    let fresh = call(&s, NEW, "gpt-4o").await;
    assert_eq!(fresh.status(), 200);
    fresh.text().await.unwrap();
    s.settle().await;
    assert_eq!(
        s.record(&id).await.status,
        Some(401),
        "the refusal is recorded"
    );
}

/// A consumer limited to some deployments gets 403 for the others, recorded; three unexpired
/// keys are refused at validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_calls_only_its_deployments_and_holds_at_most_two_keys() {
    let s = harness::start(|c| {
        c.consumers
            .push(consumer(vec![key(NEW, None, "primary")], &["gpt-4o-mini"]));
    })
    .await;
    let allowed = call(&s, NEW, "gpt-4o-mini").await;
    assert_eq!(allowed.status(), 200);
    allowed.text().await.unwrap();
    let denied = call(&s, NEW, "gpt-4o").await;
    assert_eq!(denied.status(), 403);
    let id = request_id(&denied);
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["error"]["code"], "PermissionDenied");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!((r.status, r.backend.as_deref()), (Some(403), None));

    let three = tollgate_logging_proxy::ProxyConfig {
        consumers: vec![consumer(
            vec![
                key("k1", None, "a"),
                key("k2", None, "b"),
                key("k3", None, "c"),
            ],
            &[],
        )],
        ..Default::default()
    };
    let problems = three.check().unwrap_err().to_string();
    assert!(problems.contains("at most 2"), "{problems}");
}
