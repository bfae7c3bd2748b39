//! Every analyst query in `queries/cosmos/` run against seeded consolidated records on the
//! Cosmos test server, its answer asserted. A query file without a check here fails the test.
//!
//! The test server's query engine has no `GROUP BY`. A grouped query is run once per group
//! the test expects: its `GROUP BY` clause is cut and each grouping expression is fixed to the
//! group's value in the `WHERE` clause, which runs the file's own select list, aggregates and
//! window on exactly that group's records. What this cannot check is the `GROUP BY` clause
//! itself; it lists the same expressions the test fixes, and Cosmos DB rejects a select list
//! whose plain fields are not grouped.

#![expect(clippy::expect_used, reason = "test helpers fail loudly")]

use serde_json::{Value, json};
use tollgate_records::{Latency, UsageQuality, UsageQualityInfo};
use tollgate_store::StoreConfig;
use tollgate_store::conformance::{cosmos_test_config, sample_consolidated, sample_cost};

/// 2026-11-01T00:00:00Z and 2026-11-03T00:00:00Z: the window holding days 1 and 2.
const FROM: i64 = 1_793_491_200_000;
const TO: i64 = 1_793_664_000_000;

/// Where queries go: the `requests` container's REST endpoint, as the portal's Data Explorer
/// sends a query (cross-partition, with parameters). The Rust SDK 1.0 plans cross-partition
/// queries itself and does not run aggregates across partitions; analysts run these files in
/// the portal or the CLI. The test server checks no signature.
struct Target {
    http: reqwest::Client,
    docs: String,
}

fn query_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../queries/cosmos")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The file's query for one group: `GROUP BY a, b` cut, `AND a = @g0 AND b = @g1` added, in
/// the order of the `GROUP BY` list.
fn one_group(sql: &str, group: &[Value]) -> (String, Vec<(String, Value)>) {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .map(|l| l.split(" -- ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let Some((head, keys)) = text.split_once("GROUP BY") else {
        return (text, Vec::new());
    };
    let keys: Vec<&str> = keys.split(',').map(str::trim).collect();
    assert_eq!(keys.len(), group.len(), "one value per grouping expression");
    // A grouped field in the select list becomes the group's value (the engine evaluates no
    // plain field next to aggregates without a GROUP BY).
    let (select, rest) = head.split_once("FROM").expect("a query has a FROM clause");
    let select = select.trim().strip_prefix("SELECT").expect("SELECT first");
    let mut items = Vec::new();
    let (mut depth, mut current) = (0i32, String::new());
    for ch in select.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(ch);
    }
    items.push(current);
    let items: Vec<String> = items
        .iter()
        .map(|item| {
            let item = item.trim();
            for (i, k) in keys.iter().enumerate() {
                if item == *k {
                    let field = k.rsplit('.').next().unwrap_or(k);
                    return format!("@g{i} AS {field}");
                }
                if let Some(alias) = item.strip_prefix(&format!("{k} AS ")) {
                    return format!("@g{i} AS {alias}");
                }
            }
            item.to_owned()
        })
        .collect();
    let mut query = format!("SELECT {} FROM{}", items.join(", "), rest.trim_end());
    let mut params = Vec::new();
    for (i, (k, v)) in keys.iter().zip(group).enumerate() {
        query.push_str(&format!(" AND {k} = @g{i}"));
        params.push((format!("@g{i}"), v.clone()));
    }
    (query, params)
}

async fn run_group(
    container: &Target,
    name: &str,
    params: &[(&str, Value)],
    group: &[Value],
) -> Value {
    let (sql, extra) = one_group(&query_file(name), group);
    let mut all: Vec<(&str, Value)> = params.to_vec();
    all.extend(extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let rows = execute(container, name, sql, &all).await;
    assert_eq!(
        rows.len(),
        1,
        "{name} {group:?}: one row per group: {rows:#?}"
    );
    rows.into_iter().next().unwrap_or_default()
}

async fn run(container: &Target, name: &str, params: &[(&str, Value)]) -> Vec<Value> {
    execute(container, name, query_file(name), params).await
}

async fn execute(target: &Target, name: &str, sql: String, params: &[(&str, Value)]) -> Vec<Value> {
    let parameters: Vec<Value> = params
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    let resp = target
        .http
        .post(&target.docs)
        .header("content-type", "application/query+json")
        .header("x-ms-documentdb-isquery", "True")
        .header("x-ms-documentdb-query-enablecrosspartition", "True")
        .header("x-ms-version", "2018-12-31")
        .json(&json!({"query": sql, "parameters": parameters}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(status.is_success(), "{name}: {status} {body}");
    body["Documents"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cosmos_query_answers_its_question_on_seeded_records() {
    let config = cosmos_test_config(&format!("queries-{}", std::process::id()));
    let store = tollgate_store::open(&StoreConfig::Cosmos(config.clone()))
        .await
        .expect("open cosmos store");

    let quality = |q| {
        Some(UsageQualityInfo {
            quality: q,
            reason: None,
        })
    };
    let latency = |ttfb, total| {
        Some(Latency {
            ttfb_ms: Some(ttfb),
            total_ms: total,
        })
    };
    // alice: two gpt-4o requests on day 1, one of them a throttled stream.
    let mut a1 = sample_consolidated("a1", "alice", 1, 100);
    a1.cost = Some(sample_cost(100_000_000));
    a1.usage_quality = quality(UsageQuality::Reported);
    a1.latency = latency(10.0, 100.0);
    let mut a2 = sample_consolidated("a2", "alice", 1, 50);
    a2.cost = Some(sample_cost(200_000_000));
    a2.status = Some(429);
    a2.stream = true;
    a2.usage_quality = quality(UsageQuality::ReportedAfterInjection);
    a2.latency = latency(30.0, 300.0);
    // bob: on day 2 an unpriced model, and a failed request on another deployment.
    let mut b1 = sample_consolidated("b1", "bob", 2, 7);
    b1.model = Some("mystery-model".into());
    b1.unpriced = true;
    b1.stream = true;
    b1.usage_quality = quality(UsageQuality::Estimated);
    b1.latency = latency(20.0, 200.0);
    let mut b2 = sample_consolidated("b2", "bob", 2, 1000);
    b2.deployment = Some("e".into());
    b2.status = Some(500);
    b2.cost = Some(sample_cost(5));
    b2.usage_quality = quality(UsageQuality::LowerBound);
    b2.client_disconnected = true;
    // The pool behind `d`: alice's first and bob's first on the PTU backend; alice's
    // throttled stream tried the PTU first, then pay-as-you-go; bob's failure on `e` too.
    let attempt = |backend: &str, status| tollgate_records::Attempt {
        backend: backend.into(),
        status: Some(status),
        duration_ms: 1.0,
        retry_after_ms: None,
        error: None,
    };
    for (r, backend, attempts) in [
        (&mut a1, "ptu", vec![attempt("ptu", 200)]),
        (
            &mut a2,
            "paygo",
            vec![attempt("ptu", 429), attempt("paygo", 429)],
        ),
        (&mut b1, "ptu", vec![attempt("ptu", 200)]),
        (&mut b2, "paygo", vec![attempt("paygo", 500)]),
    ] {
        r.backend = Some(backend.into());
        r.attempts = attempts;
    }
    // Outside the window: counted by none of the windowed queries.
    let late = sample_consolidated("late", "alice", 5, 1);
    store
        .upsert(&[a1, a2, b1, b2, late])
        .await
        .expect("seed records");

    let requests = Target {
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        docs: format!(
            "{}dbs/{}/colls/{}/docs",
            config.endpoint, config.database, config.containers.requests
        ),
    };
    let window = [("@from", json!(FROM)), ("@to", json!(TO))];
    let mut checked = Vec::new();

    checked.push("usage_by_consumer_day.sql");
    let q = "usage_by_consumer_day.sql";
    let alice = run_group(
        &requests,
        q,
        &window,
        &[
            json!("alice"),
            json!("d"),
            json!("gpt-4o"),
            json!("2026-11-01"),
        ],
    )
    .await;
    assert_eq!(alice["consumer"], "alice");
    assert_eq!(alice["day"], "2026-11-01");
    assert_eq!(alice["requests"], 2);
    assert_eq!(alice["inputTokens"], 150);
    assert_eq!(alice["outputTokens"], 20);
    assert_eq!(alice["costNanos"], 300_000_000);
    assert_eq!(alice["unpricedRequests"], 0);
    let mystery = run_group(
        &requests,
        q,
        &window,
        &[
            json!("bob"),
            json!("d"),
            json!("mystery-model"),
            json!("2026-11-02"),
        ],
    )
    .await;
    assert_eq!(mystery["requests"], 1);
    assert_eq!(mystery["unpricedRequests"], 1);
    assert_eq!(mystery["costNanos"], 0);

    checked.push("usage_by_model.sql");
    let gpt = run_group(&requests, "usage_by_model.sql", &window, &[json!("gpt-4o")]).await;
    assert_eq!(
        gpt["requests"], 3,
        "the request outside the window is not counted"
    );
    assert_eq!(gpt["totalTokens"], 1180);
    assert_eq!(gpt["costNanos"], 300_000_005);

    checked.push("usage_by_backend.sql");
    let q = "usage_by_backend.sql";
    let ptu = run_group(&requests, q, &window, &[json!("d"), json!("ptu")]).await;
    assert_eq!(
        [&ptu["requests"], &ptu["attempts"], &ptu["errors"]],
        [&json!(2), &json!(2), &json!(0)]
    );
    assert_eq!(
        ptu["costNanos"], 100_000_000,
        "bob's unpriced request adds none"
    );
    let paygo = run_group(&requests, q, &window, &[json!("d"), json!("paygo")]).await;
    assert_eq!(
        [&paygo["requests"], &paygo["attempts"], &paygo["errors"]],
        [&json!(1), &json!(2), &json!(1)]
    );
    assert_eq!(paygo["costNanos"], 200_000_000);

    checked.push("errors_by_status.sql");
    let q = "errors_by_status.sql";
    assert_eq!(
        run_group(&requests, q, &window, &[json!("d"), json!(429)]).await["requests"],
        1
    );
    assert_eq!(
        run_group(&requests, q, &window, &[json!("e"), json!(500)]).await["requests"],
        1
    );
    assert_eq!(
        run_group(&requests, q, &window, &[json!("d"), json!(200)]).await["requests"],
        2
    );

    checked.push("top_requests_by_tokens.sql");
    let mut params = window.to_vec();
    params.push(("@n", json!(2)));
    let rows = run(&requests, "top_requests_by_tokens.sql", &params).await;
    let ids: Vec<&Value> = rows.iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!("b2"), &json!("a1")], "most tokens first");

    checked.push("streaming_vs_not.sql");
    let q = "streaming_vs_not.sql";
    let streams = run_group(&requests, q, &window, &[json!("d"), json!(true)]).await;
    assert_eq!(streams["requests"], 2);
    assert_eq!(streams["meanTotalMs"], 250.0);
    let plain = run_group(&requests, q, &window, &[json!("d"), json!(false)]).await;
    assert_eq!(plain["meanTtfbMs"], 10.0);

    checked.push("usage_quality.sql");
    let q = "usage_quality.sql";
    let d = run_group(&requests, q, &window, &[json!("d")]).await;
    assert_eq!(
        [
            &d["requests"],
            &d["reported"],
            &d["askedByTollgate"],
            &d["estimated"]
        ],
        [&json!(3), &json!(2), &json!(1), &json!(1)]
    );
    let e = run_group(&requests, q, &window, &[json!("e")]).await;
    assert_eq!(
        [&e["lowerBound"], &e["disconnected"]],
        [&json!(1), &json!(1)]
    );

    checked.push("request_by_id.sql");
    let rows = run(
        &requests,
        "request_by_id.sql",
        &[("@requestId", json!("b1"))],
    )
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["consumer"]["id"], "bob");

    let mut files: Vec<String> = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../queries/cosmos"),
    )
    .expect("queries/cosmos")
    .filter_map(|e| e.ok()?.file_name().into_string().ok())
    .filter(|n| n.ends_with(".sql"))
    .collect();
    files.sort();
    checked.sort();
    assert_eq!(files, checked, "every query file is checked here");
}
