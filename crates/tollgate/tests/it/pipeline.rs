//! Proxy → store → parser, asserting on the consolidated records.

use futures_util::StreamExt;
use serde_json::{Value, json};
use tollgate_records::{RawRecord, UsageQuality, UsageSource};
use tollgate_tokens::Encoding;

use crate::harness::{self, API, KEY, frames, request_id};

/// The token figures of a consolidated record equal AOAI's (the simulator's) `usage`.
fn assert_same_usage(response: &Value, u: &tollgate_records::Usage) {
    assert_eq!(
        response["usage"]["prompt_tokens"].as_u64().unwrap(),
        u.input_tokens
    );
    assert_eq!(
        response["usage"]["completion_tokens"].as_u64().unwrap(),
        u.output_tokens
    );
}

fn messages() -> Value {
    json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe the sea"}])
}

#[tokio::test]
async fn non_stream_usage_equals_the_simulators_and_is_priced() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post(&s.chat_url("gpt-4o"), &json!({"messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let aoai_request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        resp.headers().contains_key("apim-request-id"),
        "AOAI headers pass through"
    );
    let body: Value = resp.json().await.unwrap();
    s.settle().await;

    let r = s.record(&id).await;
    assert!(
        !r.client_disconnected,
        "a client that read everything did not disconnect"
    );
    let u = r.usage.as_ref().expect("usage");
    assert_eq!(u.source, UsageSource::Reported);
    assert_eq!(
        u.input_tokens,
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.output_tokens,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.total_tokens,
        body["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(r.consumer.id, "tester");
    assert_eq!(r.status, Some(200));
    assert!(r.complete);
    assert_eq!(
        r.choices[0].content.as_deref(),
        body["choices"][0]["message"]["content"].as_str()
    );
    assert_eq!(r.response_headers["x-request-id"], aoai_request_id);
    let cost = r.cost.as_ref().expect("gpt-4o is priced");
    // gpt-4o's published $2.50 and $10.00 per 1M tokens are 2,500 and 10,000 nano-dollars a
    // token: the cost is exact, not within a float tolerance.
    let expected = u.input_tokens as i64 * 2_500 + u.output_tokens as i64 * 10_000;
    assert_eq!(cost.total.nanos(), expected);
    assert_eq!(cost.input + cost.cached_input + cost.output, cost.total);
    assert!(r.prompt_filter_results.is_some());
}

#[tokio::test]
async fn include_usage_stream_takes_the_usage_frame() {
    let s = harness::start(|_| {}).await;
    let body =
        json!({"messages": messages(), "stream": true, "stream_options": {"include_usage": true}});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    let id = request_id(&resp);
    let f = frames(&resp.text().await.unwrap());
    let usage = f.last().unwrap()["usage"].clone();
    s.settle().await;
    let r = s.record(&id).await;
    assert!(!r.client_disconnected);
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Reported);
    assert_eq!(u.input_tokens, usage["prompt_tokens"].as_u64().unwrap());
    assert_eq!(
        u.output_tokens,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(r.stream);
}

#[tokio::test]
async fn stream_without_usage_is_estimated_with_tiktoken() {
    // Usage not asked for on the client's behalf: the estimate is what is left.
    let s = harness::start(|c| c.stream_usage.inject = false).await;
    let body = json!({"messages": messages(), "stream": true});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    let id = request_id(&resp);
    let f = frames(&resp.text().await.unwrap());
    assert!(f.iter().all(|c| c.get("usage").is_none()));
    let text: String = f
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    s.settle().await;
    let r = s.record(&id).await;
    let q = r.usage_quality.clone().unwrap();
    assert_eq!(q.quality, UsageQuality::Estimated);
    assert!(q.reason.unwrap().contains("does not ask"));
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Estimated);
    assert_eq!(u.output_tokens, Encoding::O200kBase.count(&text));
    assert_eq!(
        u.input_tokens,
        tollgate_tokens::count_chat_prompt("gpt-4o-2024-08-06", &body)
    );
    assert_eq!(r.choices[0].content.as_deref(), Some(text.as_str()));

    // The same request without streaming: the simulator reports exactly what we estimated.
    let plain = s.unstreamed(&s.chat_url("gpt-4o"), &body).await;
    assert_same_usage(&plain, &u);
}

/// The request record of `id`, from the raw feed.
async fn raw_request(s: &harness::Stack, id: &str) -> tollgate_records::RequestRecord {
    let page = s
        .store
        .read(tollgate_store::embedded::UNIT, None, 10_000)
        .await
        .unwrap();
    page.records
        .into_iter()
        .find_map(|r| match r {
            RawRecord::Request(q) if q.request_id == id => Some(q),
            _ => None,
        })
        .expect("the request record")
}

/// Issue 6: a stream whose client did not ask for its usage is sent asking for it, so the bill
/// is AOAI's own figure; the client never sees the usage frame.
#[tokio::test]
async fn a_stream_that_does_not_ask_for_usage_is_billed_with_aoais_own_figure() {
    let s = harness::start(|_| {}).await;
    let body = json!({"messages": messages(), "stream": true});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let id = request_id(&resp);
    let raw = resp.text().await.unwrap();
    let f = frames(&raw);
    // AOAI's frames as it sends them when asked (`"usage": null` in each chunk), less the one
    // carrying the usage, and the stream still ends with [DONE].
    assert!(f.len() > 2);
    assert!(
        f.iter()
            .all(|c| !c.get("usage").is_some_and(Value::is_object)),
        "no usage frame reaches the client: {raw}"
    );
    assert!(f[1..].iter().all(|c| c.get("usage") == Some(&Value::Null)));
    assert!(raw.ends_with("data: [DONE]\n\n"));
    let text: String = f
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();

    s.settle().await;
    let r = s.record(&id).await;
    let u = r.usage.clone().unwrap();
    assert_eq!(
        u.source,
        UsageSource::Reported,
        "AOAI's figure, not an estimate"
    );
    assert_eq!(
        r.usage_quality.as_ref().unwrap().quality,
        UsageQuality::ReportedAfterInjection
    );
    assert_eq!(r.choices[0].content.as_deref(), Some(text.as_str()));
    // The same request without streaming: the simulator's own count.
    let plain = s.unstreamed(&s.chat_url("gpt-4o"), &body).await;
    assert_same_usage(&plain, &u);
    // The record keeps the body the client sent and says the proxy asked.
    let q = raw_request(&s, &id).await;
    assert!(q.stream_usage_injected);
    let sent = q.body.parse_json().expect("JSON body");
    assert!(sent.get("stream_options").is_none(), "{sent}");

    // A client that asks gets its usage frame as before.
    let asked = json!({"messages": messages(), "stream": true,
                       "stream_options": {"include_usage": true}});
    let resp = s.post(&s.chat_url("gpt-4o"), &asked).send().await.unwrap();
    let id = request_id(&resp);
    let f = frames(&resp.text().await.unwrap());
    let last = f.last().unwrap();
    assert!(last["usage"].is_object() && last["choices"] == json!([]));
    s.settle().await;
    assert!(!raw_request(&s, &id).await.stream_usage_injected);
}

/// An api-version before `stream_options` existed, and a deployment switched off, are sent as
/// the client sent them (the simulator, like AOAI, answers 400 to the option on old versions).
#[tokio::test]
async fn usage_is_not_asked_for_on_old_api_versions_or_switched_off_deployments() {
    let s = harness::start(|c| c.stream_usage.skip_deployments = vec!["gpt-4o-mini".into()]).await;
    let body = json!({"messages": messages(), "stream": true});
    let old = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01",
        s.base
    );
    for url in [old.clone(), s.chat_url("gpt-4o-mini")] {
        let resp = s.post(&url, &body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        let id = request_id(&resp);
        resp.text().await.unwrap();
        s.settle().await;
        assert!(!raw_request(&s, &id).await.stream_usage_injected, "{url}");
        let u = s.record(&id).await.usage.unwrap();
        assert_eq!(u.source, UsageSource::Estimated, "{url}");
    }
    // What injecting would have met on the old version.
    let asked = json!({"messages": messages(), "stream": true,
                       "stream_options": {"include_usage": true}});
    let resp = s.post(&old, &asked).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "unknown_parameter");
}

/// A backend that does not know `stream_options` answers 400; the request is sent again as the
/// client sent it, and the client gets its stream as if nothing had been added.
#[tokio::test]
async fn a_backend_that_rejects_the_usage_option_gets_the_clients_own_request() {
    let s = harness::start(|_| {}).await;
    let body = json!({"messages": messages(), "stream": true});
    let resp = s
        .post_with_fault(&s.chat_url("gpt-4o"), &body, "no-stream-options")
        .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let f = frames(&resp.text().await.unwrap());
    assert!(
        f.iter()
            .any(|c| c["choices"][0]["delta"]["content"].is_string())
    );
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.status, Some(200));
    let statuses: Vec<_> = r.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![Some(400), Some(200)], "{:?}", r.attempts);
    assert!(
        r.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("stream_options")
    );
    assert_eq!(r.usage.unwrap().source, UsageSource::Estimated);
    let q = r.usage_quality.unwrap();
    assert_eq!(q.quality, UsageQuality::Estimated);
    assert!(q.reason.unwrap().contains("rejected stream_options"));

    // Any other 400 reaches the client as the backend sent it, once.
    let resp = s
        .post_with_fault(&s.chat_url("gpt-4o"), &body, "content-filter")
        .await;
    assert_eq!(resp.status(), 400);
    let id = request_id(&resp);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "content_filter");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.error.unwrap().code, "content_filter");
}

#[tokio::test]
async fn tool_call_streams_are_stitched_into_complete_arguments() {
    // Estimated, to check the tool-call counting against the simulator's own count.
    let s = harness::start(|c| c.stream_usage.inject = false).await;
    let tool = |name: &str| {
        json!({"type": "function", "function": {"name": name, "description": "Look it up.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"}}}}})
    };
    let body = json!({"messages": messages(), "stream": true, "tool_choice": "required",
                      "tools": [tool("weather"), tool("tides")]});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    let calls = &r.choices[0].tool_calls;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].name, "weather");
    assert_eq!(calls[1].name, "tides");
    for c in calls {
        let args: Value = serde_json::from_str(&c.arguments).expect("complete JSON arguments");
        assert!(args["days"].is_i64());
        assert!(c.id.as_deref().unwrap().starts_with("call_"));
    }
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("tool_calls"));
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Estimated);
    // Same request without streaming: the simulator's own count of the same calls.
    let plain = s.unstreamed(&s.chat_url("gpt-4o"), &body).await;
    assert_same_usage(&plain, &u);
}

#[tokio::test]
async fn client_that_disconnects_after_three_chunks_still_yields_a_complete_record() {
    let s = harness::start(|_| {}).await;
    let body =
        json!({"messages": messages(), "stream": true, "stream_options": {"include_usage": true}});
    let resp = s
        .post(&s.chat_url("gpt-4o"), &body)
        // Slow enough that the client is gone long before the stream ends.
        .header("x-sim-inter-token-ms", "5")
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let mut stream = resp.bytes_stream();
    let mut seen = Vec::new();
    while seen.iter().filter(|b| **b == b'\n').count() < 6 {
        seen.extend_from_slice(&stream.next().await.expect("chunk").expect("bytes"));
    }
    drop(stream);
    s.settle().await;
    let r = s.record(&id).await;
    assert!(r.client_disconnected);
    assert!(r.complete);
    let u = r.usage.expect("usage recorded after the client left");
    assert_eq!(
        u.source,
        UsageSource::Reported,
        "the usage frame was still read from upstream"
    );
    let text = r.choices[0].content.clone().unwrap();
    assert_eq!(u.output_tokens, Encoding::O200kBase.count(&text));
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn unknown_deployment_and_bad_key_get_aoai_errors_and_are_recorded() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post(&s.chat_url("nope"), &json!({"messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let missing = request_id(&resp);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "DeploymentNotFound");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist")
    );

    let resp = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", "wrong")
        .json(&json!({"messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let denied = request_id(&resp);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["code"], "401");
    s.settle().await;

    let r = s.record(&missing).await;
    assert_eq!(
        (r.status, r.error.as_ref().unwrap().code.as_str()),
        (Some(404), "DeploymentNotFound")
    );
    assert!(r.usage.is_none());
    let r = s.record(&denied).await;
    assert_eq!(r.status, Some(401));
    assert_eq!(r.consumer.id, "anonymous");
    assert_eq!(
        s.sim.requests_to("gpt-4o"),
        0,
        "rejected requests never reach AOAI"
    );
}

#[tokio::test]
async fn upstream_throttling_is_forwarded_with_its_headers_and_recorded() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post_with_fault(
            &s.chat_url("gpt-4o"),
            &json!({"messages": messages()}),
            "429;retry-after-ms=700",
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after-ms"], "700");
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.status, Some(429));
    assert_eq!(r.attempts[0].retry_after_ms, Some(700));
    assert_eq!(r.error.as_ref().unwrap().code, "429");
    assert_eq!(r.response_headers["retry-after-ms"], "700");
}

#[tokio::test]
async fn secrets_never_reach_the_store() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post(&s.chat_url("gpt-4o"), &json!({"messages": messages()}))
        .header("cookie", "session=topsecret")
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let raw = serde_json::to_string(&s.raw(&id).await).unwrap();
    let consolidated = serde_json::to_string(&s.record(&id).await).unwrap();
    for doc in [&raw, &consolidated] {
        assert!(!doc.contains(KEY), "consumer key leaked");
        assert!(!doc.contains(harness::SIM_KEY), "backend key leaked");
        assert!(!doc.contains("topsecret"), "cookie leaked");
    }
    let RawRecord::Request(req) = &s.raw(&id).await[0] else {
        panic!("first record is the request")
    };
    assert_eq!(req.headers["api-key"], "[redacted]");
    assert_eq!(req.headers["cookie"], "[redacted]");
}

#[tokio::test]
async fn store_outage_spools_and_replays_without_loss() {
    let s = harness::start(|_| {}).await;
    s.flaky
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"messages": [{"role": "user", "content": format!("q{i}")}], "stream": i % 2 == 0});
        let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "the outage is invisible to clients");
        ids.push(request_id(&resp));
        resp.text().await.unwrap();
    }
    s.proxy.flush().await;
    assert!(
        s.proxy.recorder().spooled_bytes() > 0,
        "records wait in the spool"
    );
    assert!(
        s.store
            .read(tollgate_store::embedded::UNIT, None, 100)
            .await
            .unwrap()
            .records
            .is_empty()
    );
    s.flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    s.settle().await;
    assert_eq!(s.proxy.recorder().spooled_bytes(), 0);
    for id in &ids {
        let r = s.record(id).await;
        assert!(
            r.complete && r.usage.is_some(),
            "{id} fully recorded after replay"
        );
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let s = harness::start(|c| c.limits.max_request_body_bytes = 64).await;
    let body = json!({"messages": [{"role": "user", "content": "x".repeat(200)}]});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let id = request_id(&resp);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "RequestEntityTooLarge"
    );
    s.settle().await;
    assert_eq!(s.record(&id).await.status, Some(413));
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let s = harness::start(|c| c.limits.max_header_bytes = 512).await;
    let resp = s
        .post(&s.chat_url("gpt-4o"), &json!({"messages": messages()}))
        .header("x-padding", "p".repeat(600))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    let id = request_id(&resp);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "RequestHeadersTooLarge"
    );
    s.settle().await;
    assert_eq!(s.record(&id).await.status, Some(431));
    assert_eq!(s.sim.requests_to("gpt-4o"), 0);
}

#[tokio::test]
async fn embeddings_and_v1_surface() {
    let s = harness::start(|_| {}).await;
    let url = format!(
        "{}/openai/deployments/text-embedding-3-small/embeddings?{API}",
        s.base
    );
    let resp = s
        .post(&url, &json!({"input": ["alpha beta", "gamma"]}))
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let v: Value = resp.json().await.unwrap();
    let resp = s
        .http
        .post(format!("{}/openai/v1/chat/completions", s.base))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o-mini", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v1 = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.operation, "embeddings");
    assert_eq!(
        r.usage.unwrap().input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    let r = s.record(&v1).await;
    assert_eq!(r.deployment.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_overflows_to_the_spool_and_loses_nothing() {
    let s = harness::start(|c| {
        c.recorder.queue_capacity = 1;
        c.recorder.max_batch_records = 1;
    })
    .await;
    // With the store stalled the writer holds one batch, the queue one record, and the rest of
    // every request's records must overflow to the spool while clients are served as usual.
    let stalled = s.flaky.stall.lock().await;
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..24 {
        let req = s.post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": format!("n{i}")}], "stream": i % 2 == 1}),
        );
        requests.spawn(async move {
            let resp = req.send().await.unwrap();
            let id = request_id(&resp);
            resp.text().await.unwrap();
            id
        });
    }
    let ids = requests.join_all().await;
    s.proxy.recorder().wait_idle().await;
    let spooled = s
        .proxy
        .recorder()
        .stats()
        .spooled
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(stalled);
    s.settle().await;
    let stored = s
        .store
        .read(tollgate_store::embedded::UNIT, None, 10_000)
        .await
        .unwrap()
        .records
        .len() as u64;
    // The queue's slot is never spooled. The writer's first batch is, when a record reached
    // the spool before the writer took it (a writer never stores past a non-empty spool, to
    // keep the order); which comes first is a race, so both outcomes are allowed.
    assert!(
        (stored - 2..stored).contains(&spooled),
        "all but the writer's batch and the queue's slot were spooled: {spooled} of {stored}"
    );
    for id in &ids {
        let r = s.record(id).await;
        assert!(r.complete && r.usage.is_some(), "{id} recorded in full");
    }
    assert_eq!(
        s.proxy.recorder().spooled_bytes(),
        0,
        "the spool was replayed"
    );
}

#[tokio::test]
async fn an_upstream_cut_mid_stream_is_recorded_with_what_arrived() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post_with_fault(
            &s.chat_url("gpt-4o"),
            &json!({"messages": messages(), "stream": true}),
            "reset-after-chunks=4",
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(resp.text().await.is_err(), "the client sees the cut too");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.error.as_ref().unwrap().code, "BackendStreamBroken");
    // Frames: annotation, role, then two content deltas before the cut.
    let text = r.choices[0].content.clone().unwrap();
    assert!(!text.is_empty());
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Estimated);
    assert_eq!(u.output_tokens, Encoding::O200kBase.count(&text));
    assert_eq!(r.choices[0].finish_reason, None);
    // Counted from what arrived before the cut: the real usage is at least this.
    let q = r.usage_quality.unwrap();
    assert_eq!(q.quality, UsageQuality::LowerBound);
    assert!(q.reason.unwrap().contains("BackendStreamBroken"));
}

#[tokio::test]
async fn a_full_spool_refuses_new_requests_instead_of_losing_them() {
    let s = harness::start(|c| {
        c.recorder.spool_max_bytes = 16 * 1024;
        c.recorder.spool_file_max_bytes = 4 * 1024;
    })
    .await;
    s.flaky
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..100 {
        let body = json!({"messages": [{"role": "user", "content": format!("fill {i}")}]});
        let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
        if resp.status() == 503 {
            refused = Some(resp.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(resp.status(), 200);
        accepted.push(request_id(&resp));
        resp.text().await.unwrap();
        s.proxy.flush().await;
    }
    let refused = refused.expect("the proxy stops accepting before the spool overflows");
    assert_eq!(refused["error"]["code"], "RecorderFull");
    assert!(!accepted.is_empty());

    s.flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    s.settle().await;
    for id in &accepted {
        assert!(s.record(id).await.complete, "{id} accepted, so recorded");
    }
    let resp = s
        .post(&s.chat_url("gpt-4o"), &json!({"messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "accepting again once the spool drained");
}

#[tokio::test]
async fn n_choices_and_legacy_completions_streams_are_stitched_and_counted() {
    // Estimated, to check the counting of n choices against the simulator's own count.
    let s = harness::start(|c| c.stream_usage.inject = false).await;
    let chat = json!({"messages": messages(), "n": 3, "stream": true});
    let resp = s.post(&s.chat_url("gpt-4o"), &chat).send().await.unwrap();
    let chat_id = request_id(&resp);
    resp.text().await.unwrap();
    let url = format!(
        "{}/openai/deployments/gpt-35-turbo/completions?{API}",
        s.base
    );
    let completions = json!({"prompt": "Once upon a time", "max_tokens": 20, "stream": true});
    let resp = s.post(&url, &completions).send().await.unwrap();
    let completions_id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;

    let r = s.record(&chat_id).await;
    assert_eq!(r.choices.len(), 3);
    assert!(
        r.choices
            .iter()
            .all(|c| c.finish_reason.is_some() && c.content.is_some())
    );
    let v = s.unstreamed(&s.chat_url("gpt-4o"), &chat).await;
    for (i, c) in r.choices.iter().enumerate() {
        assert_eq!(
            c.content.as_deref(),
            v["choices"][i]["message"]["content"].as_str()
        );
    }
    assert_eq!(
        r.usage.unwrap().output_tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );

    let r = s.record(&completions_id).await;
    assert_eq!(r.operation, "completions");
    let v = s.unstreamed(&url, &completions).await;
    assert_eq!(
        r.choices[0].content.as_deref(),
        v["choices"][0]["text"].as_str()
    );
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Estimated);
    assert_eq!(
        u.input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.output_tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(r.model.as_deref(), Some("gpt-35-turbo-0125"));
}

#[tokio::test]
async fn a_silent_upstream_hits_the_idle_timeout_and_is_recorded() {
    let s = harness::start(|c| c.limits.idle_timeout_ms = 100).await;
    let resp = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": messages(), "stream": true}),
        )
        .header("x-sim-inter-token-ms", "2000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(
        resp.text().await.is_err(),
        "the stream is cut for the client"
    );
    s.settle().await;
    let r = s.record(&id).await;
    let e = r.error.expect("timeout recorded");
    assert_eq!(e.code, "BackendTimeout");
    assert!(e.message.contains("idle"), "{}", e.message);
    assert_eq!(
        r.choices[0].role.as_deref(),
        Some("assistant"),
        "frames before the silence kept"
    );
}

#[tokio::test]
async fn admin_metrics_need_the_admin_key_and_count_records() {
    let s = harness::start(|c| c.admin_key_sha256 = Some(harness::sha("admin"))).await;
    let resp = s
        .post(&s.chat_url("gpt-4o"), &json!({"messages": messages()}))
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap();
    s.proxy.flush().await;
    let url = format!("{}/tollgate/admin/metrics", s.base);
    let denied = s
        .http
        .get(&url)
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401, "a consumer key is not the admin key");
    let text = s
        .http
        .get(&url)
        .bearer_auth("admin")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
    };
    assert_eq!(
        value("tollgate_recorder_records_written_total"),
        2,
        "request + end"
    );
    assert_eq!(value("tollgate_recorder_records_enqueued_total"), 2);
    assert_eq!(value("tollgate_recorder_spool_bytes"), 0);
    assert_eq!(value("tollgate_proxy_requests_in_flight"), 0);
}

/// AOAI bills the prompt of a request over the model's context length (it tokenised it to
/// find out) and of a request it timed out on (408); both are charged their prompt.
#[tokio::test]
async fn a_prompt_over_the_context_length_and_a_backend_timeout_are_charged_their_prompt() {
    let s = harness::start(|_| {}).await;
    // gpt-35-turbo's window is 16,385 tokens.
    let long = json!({"messages": [{"role": "user", "content": "word ".repeat(17_000)}]});
    let resp = s
        .post(&s.chat_url("gpt-35-turbo"), &long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let over_id = request_id(&resp);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded");

    let body = json!({"messages": messages()});
    let resp = s.post_with_fault(&s.chat_url("gpt-4o"), &body, "408").await;
    assert_eq!(resp.status(), 408);
    let timeout_id = request_id(&resp);
    resp.text().await.unwrap();

    s.settle().await;
    for (id, min_tokens) in [(&over_id, 16_385), (&timeout_id, 1)] {
        let r = s.record(id).await;
        let u = r.usage.expect("charged");
        assert_eq!((u.source, u.output_tokens), (UsageSource::Estimated, 0));
        assert!(u.input_tokens >= min_tokens, "{id}: {}", u.input_tokens);
        let q = r.usage_quality.unwrap();
        assert_eq!(q.quality, UsageQuality::Estimated);
        assert!(q.reason.unwrap().contains("refusal"));
    }
}

/// A repeated long prompt is billed partly at the cached rate, and a reasoning model's
/// reasoning (billed as output, never sent) is in its record, AOAI's figures both.
#[tokio::test]
async fn cached_input_is_priced_at_the_cached_rate_and_reasoning_is_billed_as_output() {
    let s = harness::start(|_| {}).await;
    let long = json!({"messages": [{"role": "user", "content": "word ".repeat(1500)}]});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = s.post(&s.chat_url("gpt-4o"), &long).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
        resp.text().await.unwrap();
    }
    let body = json!({"messages": messages(), "stream": true});
    let resp = s.post(&s.chat_url("o4-mini"), &body).send().await.unwrap();
    let reasoning_id = request_id(&resp);
    let f = frames(&resp.text().await.unwrap());
    let sent: String = f
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    s.settle().await;

    let first = s.record(&ids[0]).await.usage.unwrap();
    assert_eq!(first.cached_input_tokens, 0);
    let second = s.record(&ids[1]).await;
    let u = second.usage.unwrap();
    assert!(u.cached_input_tokens >= 1024, "{u:?}");
    // gpt-4o: $2.50 and $1.25 per 1M input tokens, uncached and cached: 2,500 and 1,250
    // nano-dollars a token.
    let c = second.cost.unwrap();
    assert_eq!(
        c.input.nanos(),
        (u.input_tokens - u.cached_input_tokens) as i64 * 2_500
    );
    assert_eq!(c.cached_input.nanos(), u.cached_input_tokens as i64 * 1_250);

    let r = s.record(&reasoning_id).await;
    let u = r.usage.unwrap();
    assert!(u.reasoning_tokens > 0, "{u:?}");
    assert_eq!(
        u.output_tokens,
        Encoding::O200kBase.count(&sent) + u.reasoning_tokens,
        "the output billed is what was sent plus the reasoning"
    );
}

/// The Responses API, streamed and not: billed with the usage AOAI puts in its final
/// `response.completed` event (or body), with the text the client received.
#[tokio::test]
async fn responses_api_calls_are_billed_with_aoais_usage() {
    let s = harness::start(|_| {}).await;
    let url = format!("{}/openai/v1/responses", s.base);
    let body = json!({"model": "gpt-4o", "instructions": "Be brief.",
                      "input": "What does a gateway do?", "stream": true});
    let resp = s.post(&url, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let stream_id = request_id(&resp);
    let raw = resp.text().await.unwrap();
    let events: Vec<Value> = raw
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    let completed = events
        .iter()
        .find(|e| e["type"] == "response.completed")
        .expect("the final event");
    let reported = completed["response"]["usage"].clone();

    let plain = json!({"model": "gpt-4o", "input": "What does a gateway do?"});
    let resp = s.post(&url, &plain).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let plain_id = request_id(&resp);
    let answer: Value = resp.json().await.unwrap();
    s.settle().await;

    let r = s.record(&stream_id).await;
    assert_eq!(r.operation, "responses");
    let u = r.usage.unwrap();
    assert_eq!(u.source, UsageSource::Reported);
    assert_eq!(u.input_tokens, reported["input_tokens"].as_u64().unwrap());
    assert_eq!(u.output_tokens, reported["output_tokens"].as_u64().unwrap());
    assert_eq!(r.choices[0].content.as_deref(), Some(text.as_str()));
    assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert!(r.cost.is_some());

    let r = s.record(&plain_id).await;
    let u = r.usage.unwrap();
    assert_eq!(
        u.output_tokens,
        answer["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        r.choices[0].content.as_deref(),
        answer["output"][0]["content"][0]["text"].as_str()
    );

    // Function calls, streamed: names and whole arguments stitched from the argument deltas.
    let tool = |name: &str| {
        json!({"type": "function", "name": name, "description": "Look it up.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}})
    };
    let calls = json!({"model": "gpt-4o", "input": "Weather and tides?", "stream": true,
                       "tool_choice": "required", "tools": [tool("weather"), tool("tides")]});
    let resp = s.post(&url, &calls).send().await.unwrap();
    let calls_id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&calls_id).await;
    let c = &r.choices[0];
    let names: Vec<&str> = c.tool_calls.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["weather", "tides"]);
    for t in &c.tool_calls {
        let args: Value = serde_json::from_str(&t.arguments).expect("whole JSON arguments");
        assert!(args.is_object());
    }
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(r.usage.unwrap().source, UsageSource::Reported);
}

/// The completion's content filter stops an answer part-way: AOAI answers 200 with
/// `finish_reason: content_filter` and bills what it generated; the record says so and keeps
/// AOAI's filter results.
#[tokio::test]
async fn an_answer_stopped_by_the_completion_filter_is_recorded_as_such_and_billed() {
    let s = harness::start(|_| {}).await;
    let mut ids = Vec::new();
    for stream in [false, true] {
        let body = json!({"messages": messages(), "stream": stream});
        let resp = s
            .post_with_fault(&s.chat_url("gpt-4o"), &body, "completion-filter")
            .await;
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
        resp.text().await.unwrap();
    }
    s.settle().await;
    for id in &ids {
        let r = s.record(id).await;
        assert!(r.complete && r.error.is_none(), "{id}");
        let c = &r.choices[0];
        assert_eq!(c.finish_reason.as_deref(), Some("content_filter"));
        assert_eq!(
            c.content_filter_results.as_ref().unwrap()["violence"]["filtered"],
            true
        );
        let u = r.usage.unwrap();
        assert_eq!(u.source, UsageSource::Reported);
        assert_eq!(
            u.output_tokens,
            Encoding::O200kBase.count(c.content.as_deref().unwrap_or(""))
        );
    }
}

/// A reasoning model whose cap its reasoning uses up answers nothing (`finish_reason:
/// length`) and bills the cap: the empty answer is recorded and billed, streamed and not.
#[tokio::test]
async fn an_empty_answer_is_recorded_and_billed_for_its_reasoning() {
    let s = harness::start(|_| {}).await;
    let mut ids = Vec::new();
    for stream in [false, true] {
        let body = json!({"messages": messages(), "max_completion_tokens": 10, "stream": stream});
        let resp = s.post(&s.chat_url("o4-mini"), &body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
        resp.text().await.unwrap();
    }
    s.settle().await;
    for id in &ids {
        let r = s.record(id).await;
        let c = &r.choices[0];
        assert_eq!(c.finish_reason.as_deref(), Some("length"), "{id}");
        assert!(c.content.as_deref().unwrap_or("").is_empty(), "{id}");
        let u = r.usage.unwrap();
        assert_eq!(u.source, UsageSource::Reported);
        assert_eq!((u.output_tokens, u.reasoning_tokens), (10, 10), "{id}");
        assert!(
            r.cost.unwrap().output.nanos() > 0,
            "the reasoning is billed"
        );
    }
}

/// Defect: a non-stream answer the backend cut mid-body was recorded with 0 output tokens and
/// nothing saying the figure was short. AOAI's usage was in the part that never arrived.
#[tokio::test]
async fn a_cut_non_stream_answer_is_recorded_as_a_lower_bound() {
    let s = harness::start(|_| {}).await;
    let resp = s
        .post_with_fault(
            &s.chat_url("gpt-4o"),
            &json!({"messages": messages()}),
            "reset-after-chunks=1",
        )
        .await;
    let id = request_id(&resp);
    assert!(resp.text().await.is_err(), "the client sees the cut");
    s.settle().await;
    let r = s.record(&id).await;
    let q = r.usage_quality.expect("the prompt was served");
    assert_eq!(q.quality, UsageQuality::LowerBound, "{q:?}");
    let reason = q.reason.unwrap();
    assert!(reason.contains("BackendStreamBroken"), "{reason}");
}

#[tokio::test]
async fn a_prompt_blocked_by_the_content_filter_is_charged_for_its_prompt() {
    let s = harness::start(|_| {}).await;
    let body = json!({"messages": messages()});
    let resp = s
        .post_with_fault(&s.chat_url("gpt-4o"), &body, "content-filter")
        .await;
    assert_eq!(resp.status(), 400);
    let id = request_id(&resp);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "content_filter");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.status, Some(400));
    assert_eq!(r.error.unwrap().code, "content_filter");
    let u = r.usage.expect("charged");
    assert_eq!(u.source, UsageSource::Estimated);
    assert_eq!(
        u.input_tokens,
        tollgate_tokens::count_chat_prompt("gpt-4o-2024-08-06", &body)
    );
    assert_eq!(u.output_tokens, 0);
}

/// Defect: nothing split a record too large for one store document (Cosmos DB: 2 MB), so a
/// large prompt made a `request` record no store could take. Now the body goes into `part`
/// records of `max_body_part_bytes`, every raw document stays under a bound, and the parser
/// joins them: the request is billed as if it had been recorded whole.
#[tokio::test]
async fn a_large_body_is_recorded_in_parts_and_billed_whole() {
    const PART: usize = 16 * 1024;
    let s = harness::start(|c| c.recorder.max_body_part_bytes = PART).await;
    let text = "The sea is wide and deep. ".repeat(3_000);
    let body = json!({"messages": [{"role": "user", "content": text}]});
    let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let answer_bytes = resp.bytes().await.unwrap();
    let answer: Value = serde_json::from_slice(&answer_bytes).unwrap();
    s.settle().await;

    let raw = s.raw(&id).await;
    let parts = raw
        .iter()
        .filter(|r| matches!(r, RawRecord::Part(_)))
        .count();
    let sent = serde_json::to_vec(&body).unwrap().len();
    assert_eq!(
        parts,
        sent.div_ceil(PART),
        "{sent} bytes in {PART}-byte parts"
    );
    for r in &raw {
        let doc = serde_json::to_string(r).unwrap();
        // A part is base64 (4/3) plus a few hundred bytes of fields.
        assert!(
            doc.len() < PART * 4 / 3 + 1024,
            "{} is {} bytes",
            r.id(),
            doc.len()
        );
    }
    let record = s.record(&id).await;
    assert!(record.complete);
    assert_eq!(record.response_bytes, answer_bytes.len() as u64);
    assert_same_usage(&answer, record.usage.as_ref().unwrap());
    assert_eq!(
        record.prompt.unwrap()[0]["content"].as_str().map(str::len),
        Some(text.len())
    );
}

/// Found measuring the Cosmos store: at shutdown the writer drained its queue into the store
/// however long the store took, so a stalled or slow store held the stop for minutes past its
/// grace (and an orchestrator's SIGKILL after it). Past the grace, what is left now goes to the
/// spool, on disk, replayed at the next start; a write stuck in the store is cut too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_does_not_hold_shutdown_past_its_grace() {
    let s = harness::start(|_| {}).await;
    let stalled = s.flaky.stall.lock().await;
    for i in 0..3 {
        let body = json!({"messages": [{"role": "user", "content": format!("q{i}")}]});
        let resp = s.post(&s.chat_url("gpt-4o"), &body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let grace = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
    // Bounded only so that the defect fails the test instead of hanging it.
    tokio::time::timeout(std::time::Duration::from_secs(60), s.proxy.shutdown(grace))
        .await
        .expect("shutdown returns once its grace is over, the store still stalled");
    let stats = s.proxy.recorder().stats();
    let spooled = stats.spooled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        spooled >= 6,
        "the three requests' records are in the spool: {spooled}"
    );
    assert_eq!(stats.written.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(stalled);
}
