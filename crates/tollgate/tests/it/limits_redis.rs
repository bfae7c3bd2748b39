//! Limits shared by several proxies through a real Redis (Debian's `redis-server`, started here
//! on a free port; `.ci/run` installs it): a burst spread over two proxies admits exactly the
//! consumer's limit, reservations are settled in Redis, and when Redis goes away each proxy
//! follows its `on_unavailable` policy, visible on `/readyz` and in the metrics.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_logging_proxy::quota::{ConsumerLimits, OnUnavailable};

use crate::harness::{self, Stack};

/// A `redis-server` of this test's own, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let redis = Redis {
            child: Self::spawn(port),
            port,
        };
        redis.wait_ready();
        redis
    }

    /// A `redis-server` on `port`, keeping nothing on disk.
    fn spawn(port: u16) -> Child {
        Command::new("redis-server")
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
            .expect("redis-server (Debian's redis-server package; .ci/run installs it)")
    }

    /// Ready when it answers PING; bounded.
    fn wait_ready(&self) {
        for _ in 0..200 {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (a Redis back after an outage).
    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port);
        self.wait_ready();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A proxy (with its own simulator and store) whose consumer `tester` has `limits`, counted
/// in `redis` with `policy`.
async fn proxy(redis: &Redis, limits: ConsumerLimits, policy: OnUnavailable) -> Stack {
    let url = redis.url();
    harness::start(move |c| {
        c.consumers[0].limits = limits;
        c.limits_store.redis_url = Some(url);
        c.limits_store.on_unavailable = policy;
        c.admin_key_sha256 = Some(harness::sha("admin"));
    })
    .await
}

async fn chat(s: &Stack, max_tokens: u64) -> u16 {
    let resp = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    resp.text().await.unwrap();
    status
}

/// Two proxies counting `limits` in one Redis (failing closed), with at least 15 s of the
/// current minute ahead.
async fn two_proxies(limits: ConsumerLimits) -> (Redis, Stack, Stack) {
    let redis = Redis::start();
    let a = proxy(&redis, limits.clone(), OnUnavailable::Deny).await;
    let b = proxy(&redis, limits, OnUnavailable::Deny).await;
    crate::limits::whole_minute_ahead(Duration::from_secs(15)).await;
    (redis, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_two_proxies_admits_exactly_the_shared_limit() {
    let (_redis, a, b) = two_proxies(ConsumerLimits {
        requests_per_minute: Some(20),
        ..ConsumerLimits::default()
    })
    .await;
    let statuses =
        futures_util::future::join_all((0..50).map(|i| chat(if i % 2 == 0 { &a } else { &b }, 4)))
            .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 30);
}

/// Reservations are settled in Redis: requests reserving a quarter of the shared minute's
/// tokens each, alternating between the proxies, all pass because each gives back what it did
/// not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_settled_in_the_shared_store() {
    let (_redis, a, b) = two_proxies(ConsumerLimits {
        tokens_per_minute: Some(4_000),
        ..ConsumerLimits::default()
    })
    .await;
    for i in 0..8 {
        let s = if i % 2 == 0 { &a } else { &b };
        // Without the give-back (a task after each answer) the fourth would find 4,040 of
        // 4,000 reserved; a give-back still running when the next request comes leaves room.
        assert_eq!(chat(s, 1_000).await, 200, "request {i}");
    }
}

/// Redis stopped mid-test: the proxy that fails closed refuses with 503 and says so on
/// `/readyz`; the one that fails open counts in its own memory and goes on answering. Both
/// count the failures in their metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_proxy_follows_its_policy() {
    let mut redis = Redis::start();
    let limits = ConsumerLimits {
        requests_per_minute: Some(1_000),
        ..ConsumerLimits::default()
    };
    let closed = proxy(&redis, limits.clone(), OnUnavailable::Deny).await;
    let open = proxy(&redis, limits, OnUnavailable::Local).await;
    assert_eq!(chat(&closed, 4).await, 200);
    assert_eq!(chat(&open, 4).await, 200);
    redis.stop();
    let refused = closed
        .post(
            &closed.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "LimitsUnavailable");
    let ready = closed
        .http
        .get(format!("{}/readyz", closed.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(chat(&open, 4).await, 200, "fails open on local limits");
    for s in [&closed, &open] {
        let metrics = s.metrics("admin").await;
        assert!(metrics.contains("tollgate_limits_store_up 0"), "{metrics}");
        assert!(!metrics.contains("tollgate_limits_store_errors_total 0\n"));
    }

    // Found in review: a replica out of rotation (not ready) got no request to find Redis
    // back. Readiness asks Redis itself; bounded poll for the backoff to pass.
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = closed
            .http
            .get(format!("{}/readyz", closed.base))
            .send()
            .await
            .unwrap()
            .status();
        if ready == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::task::yield_now().await;
    }
    assert_eq!(chat(&closed, 4).await, 200);
}
