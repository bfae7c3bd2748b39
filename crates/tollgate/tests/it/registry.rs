//! The consumer registry across replicas: two `tollgate up` processes share a Cosmos DB store
//! (the Cosmos test server); consumers and keys are made on one replica's admin API (and by
//! the `tollgate consumers` command) and must work, or stop working, on the other within the
//! propagation bound (`proxy.registry.poll_ms` plus a read).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::up::{Up, UpConfig};

const ADMIN: &str = "tg-registry-admin-key";
const POLL_MS: u64 = 300;
/// Far past one poll: the bound asserted is the time each change took, printed; the wait
/// only stops a broken build from hanging.
const PATIENCE: Duration = Duration::from_secs(30);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

fn start(dir: &Path, name: &str, store: &str) -> Up {
    let local = dir.join(name);
    let sections = format!(
        "[proxy.admin]\nlisten = \"127.0.0.1:0\"\n[proxy.registry]\npoll_ms = {POLL_MS}\n{store}"
    );
    let sub = dir.join(format!("{name}-conf"));
    std::fs::create_dir_all(&sub).expect("config dir");
    Up::start(
        &sub,
        &local,
        name,
        &UpConfig {
            consumer: "file-team",
            key: "tg-file-team-key",
            admin_key: ADMIN,
            sections: &sections,
            env: &[],
        },
    )
}

/// The status of a chat request with `key` on `up`.
async fn chat(up: &Up, key: &str) -> u16 {
    client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            up.base()
        ))
        .header("api-key", key)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
        .send()
        .await
        .expect("chat")
        .status()
        .as_u16()
}

/// How long until a request with `key` on `up` answers `status`.
async fn until(up: &Up, key: &str, status: u16) -> Duration {
    let start = Instant::now();
    // Asked every 50 ms: each ask is a recorded request, and the store is shared.
    let mut every = tokio::time::interval(Duration::from_millis(50));
    loop {
        every.tick().await;
        let got = chat(up, key).await;
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "still {got}, not {status}, after {PATIENCE:?}"
        );
    }
}

async fn admin(up: &Up, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let addr = up.admin.expect("the admin listener");
    let mut req = client()
        .request(method, format!("http://{addr}{path}"))
        .header("api-key", ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin call");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn text(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lives_and_dies_on_every_replica() {
    let dir = tempfile::tempdir().expect("dir");
    let cosmos = tollgate_store::conformance::cosmos_test_config(&format!(
        "registry-{}",
        std::process::id()
    ));
    let store = tollgate_store::conformance::cosmos_toml(&cosmos);
    let a = start(dir.path(), "a", &store);
    let b = start(dir.path(), "b", &store);
    let admin_a = a.admin.expect("admin listener on a");
    let post = reqwest::Method::POST;

    // Without admin credentials the API refuses: no key, a consumer's key, a wrong key; and
    // the proxy's own listener does not serve it at all.
    let url = format!("http://{admin_a}/tollgate/admin/consumers");
    let body = json!({"id": "team-x"});
    for key in [None, Some("tg-file-team-key"), Some("tg-not-the-admin")] {
        let mut req = client().post(&url).json(&body);
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        let status = req.send().await.expect("post").status().as_u16();
        assert_eq!(status, 401, "{key:?}");
    }
    // Credentials are checked before the body is read: a caller without them learns nothing.
    let garbled = client()
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(garbled.status().as_u16(), 401);
    let public = client()
        .post(format!("{}/tollgate/admin/consumers", a.base()))
        .header("api-key", ADMIN)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(
        public.status().as_u16(),
        404,
        "the public listener has no consumer API"
    );
    // A file-declared consumer belongs to the file.
    let (status, _) = admin(
        &a,
        post.clone(),
        "/tollgate/admin/consumers",
        Some(json!({"id": "file-team"})),
    )
    .await;
    assert_eq!(status, 409);

    // A key that would be born expired is refused, as is a consumer id no store can hold.
    let (status, _) = admin(
        &a,
        post.clone(),
        "/tollgate/admin/consumers",
        Some(json!({"id": "team-x", "key_expires": "2020-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = admin(
        &a,
        reqwest::Method::GET,
        "/tollgate/admin/consumers/a%20b",
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Create on a: works there at once, on b within the bound.
    let (status, created) = admin(
        &a,
        post.clone(),
        "/tollgate/admin/consumers",
        Some(json!({"id": "team-x", "display_name": "Team X", "owner": "x@example.com"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let first = text(&created, "key");
    let first_id = text(&created, "key_id");
    assert!(first.starts_with("tg-") && first.len() == 67, "{first}");
    assert_eq!(chat(&a, &first).await, 200);
    let created_on_b = until(&b, &first, 200).await;

    // Rotate: the new key and the old one both work during the grace, on both replicas.
    let (status, rotated) = admin(
        &a,
        post.clone(),
        "/tollgate/admin/consumers/team-x/keys/rotate",
        Some(json!({"grace_s": 3600})),
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    let second = text(&rotated, "key");
    until(&b, &second, 200).await;
    assert_eq!(
        chat(&b, &first).await,
        200,
        "the old key works during the grace"
    );
    assert_eq!(chat(&a, &first).await, 200);
    assert_eq!(chat(&a, &second).await, 200);

    // Revoke the old key on a: 401 on b within the bound; the new key goes on working.
    let (status, _) = admin(
        &a,
        reqwest::Method::DELETE,
        &format!("/tollgate/admin/consumers/team-x/keys/{first_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(chat(&a, &first).await, 401);
    let revoked_on_b = until(&b, &first, 401).await;
    assert_eq!(chat(&b, &second).await, 200);

    // A key that expires: works, then 401 once its time is past, with no change made.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(5);
    let (status, extra) = admin(
        &a,
        post.clone(),
        "/tollgate/admin/consumers/team-x/keys",
        Some(json!({"name": "ci", "expires": expires})),
    )
    .await;
    assert_eq!(status, 201, "{extra}");
    let short = text(&extra, "key");
    until(&b, &short, 200).await;
    until(&b, &short, 401).await;
    assert!(
        chrono::Utc::now() >= expires,
        "refused only after its expiry"
    );

    // The CLI writes to the same store: a consumer it makes works on both replicas.
    let config = dir.path().join("cli.toml");
    std::fs::write(&config, &store).expect("cli config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "consumers",
            "create",
            "team-y",
            "--owner",
            "y@example.com",
            "--config",
        ])
        .arg(&config)
        .env("USER", "ci-operator")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("tollgate consumers create");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("the key printed")
        .to_owned();
    until(&a, &cli_key, 200).await;
    until(&b, &cli_key, 200).await;

    // Delete: every key of the consumer stops working on b.
    let (status, _) = admin(
        &a,
        reqwest::Method::DELETE,
        "/tollgate/admin/consumers/team-x",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let deleted_on_b = until(&b, &second, 401).await;

    // Every change is recorded with who made it.
    let (status, audit) = admin(&b, reqwest::Method::GET, "/tollgate/admin/audit", None).await;
    assert_eq!(status, 200);
    let entries = audit["data"].as_array().expect("audit entries");
    let seen: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| (text(e, "consumer"), text(e, "action"), text(e, "actor")))
        .collect();
    let admin_actor = format!("admin-key:{}", &crate::harness::sha(ADMIN)[..8]);
    for (consumer, action) in [
        ("team-x", "consumer.create"),
        ("team-x", "key.rotate"),
        ("team-x", "key.revoke"),
        ("team-x", "key.create"),
        ("team-x", "consumer.delete"),
    ] {
        assert!(
            seen.contains(&(consumer.into(), action.into(), admin_actor.clone())),
            "{consumer} {action} by {admin_actor}: {seen:?}"
        );
    }
    assert!(
        seen.iter().any(|(c, a, who)| c == "team-y"
            && a == "consumer.create"
            && who.starts_with("cli:ci-operator@")),
        "{seen:?}"
    );
    // Newest first.
    assert_eq!(seen[0].1, "consumer.delete", "{seen:?}");
    let audit_text = audit.to_string();
    for secret in [&first, &second, &short, &cli_key] {
        assert!(
            !audit_text.contains(secret.as_str()),
            "a key reached the audit trail"
        );
    }

    eprintln!(
        "propagation to the second replica (poll_ms {POLL_MS}): create {created_on_b:?}, revoke {revoked_on_b:?}, delete {deleted_on_b:?}"
    );
    let bound = Duration::from_millis(POLL_MS * 10);
    for (what, took) in [("revoke", revoked_on_b), ("delete", deleted_on_b)] {
        assert!(
            took < bound,
            "{what} took {took:?} to reach the second replica (bound {bound:?})"
        );
    }
}
