//! The simulator over real HTTP: AOAI's shapes, headers, SSE framing and exact usage.
#![expect(
    clippy::disallowed_methods,
    reason = "tests spawn the server task directly"
)]
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers fail loudly"
)]

use serde_json::{Value, json};
use tollgate_aoai_sim::{SimConfig, Simulator};
use tollgate_tokens::Encoding;

struct Sim {
    base: String,
    sim: Simulator,
    http: reqwest::Client,
}

async fn start(config: SimConfig) -> Sim {
    let sim = Simulator::new(config).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = sim.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Sim {
        base: format!("http://{addr}"),
        sim,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Sim {
    async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("api-key", "k")
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("send")
    }
}

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

fn frames(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.strip_prefix("data: ").expect("data frame"))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("json frame"))
        .collect()
}

fn messages() -> Value {
    json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}])
}

#[tokio::test]
async fn non_stream_chat_has_aoai_shape_and_exact_usage() {
    let s = start(SimConfig::default()).await;
    let body = json!({"messages": messages()});
    let resp = s.post(CHAT, body.clone(), &[]).await;
    assert_eq!(resp.status(), 200);
    for h in [
        "apim-request-id",
        "x-request-id",
        "x-ms-region",
        "azureml-model-session",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-2024-08-06");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["system_fingerprint"].is_string());
    assert!(v["prompt_filter_results"][0]["content_filter_results"]["hate"].is_object());
    assert!(v["choices"][0]["content_filter_results"]["violence"].is_object());
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let usage = &v["usage"];
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        Encoding::O200kBase.count(content)
    );
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap(),
        tollgate_tokens::count_chat_prompt("gpt-4o-2024-08-06", &body)
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // Same request, same answer.
    let again: Value = s.post(CHAT, body, &[]).await.json().await.unwrap();
    assert_eq!(again["choices"], v["choices"]);
    assert_eq!(s.sim.requests_to("gpt-4o"), 2);
}

#[tokio::test]
async fn stream_frames_follow_aoai_and_usage_only_when_asked() {
    let s = start(SimConfig::default()).await;
    let with = s
        .post(CHAT, json!({"messages": messages(), "stream": true, "stream_options": {"include_usage": true}}), &[])
        .await;
    assert!(
        with.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let raw = with.text().await.unwrap();
    assert!(raw.ends_with("data: [DONE]\n\n"));
    let f = frames(&raw);
    assert_eq!(f[0]["choices"], json!([]));
    assert!(f[0]["prompt_filter_results"].is_array());
    assert_eq!(f[1]["choices"][0]["delta"]["role"], "assistant");
    let last = f.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let text: String = f
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        last["usage"]["completion_tokens"].as_u64().unwrap(),
        Encoding::O200kBase.count(&text)
    );
    let finish = &f[f.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert!(
        f[1..f.len() - 1]
            .iter()
            .all(|c| c.get("usage") == Some(&Value::Null))
    );

    let without = s
        .post(CHAT, json!({"messages": messages(), "stream": true}), &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(frames(&without).iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn parallel_tool_calls_stream_as_fragments_by_index() {
    let s = start(SimConfig::default()).await;
    let tool = |name: &str| {
        json!({"type": "function", "function": {"name": name, "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}})
    };
    let body = json!({"messages": messages(), "stream": true, "tool_choice": "required",
                      "tools": [tool("weather"), tool("news")]});
    let f = frames(&s.post(CHAT, body, &[]).await.text().await.unwrap());
    let mut args = [String::new(), String::new()];
    let mut names = [String::new(), String::new()];
    for c in &f {
        for call in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if let Some(n) = call["function"]["name"].as_str() {
                names[i] = n.to_owned();
            }
            args[i].push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(names, ["weather".to_owned(), "news".to_owned()]);
    for a in &args {
        let parsed: Value = serde_json::from_str(a).expect("arguments are complete JSON");
        assert!(parsed["days"].is_i64());
    }
    let fragments = f
        .iter()
        .filter(|c| c["choices"][0]["delta"]["tool_calls"].is_array())
        .count();
    assert!(fragments > 2, "arguments arrive in fragments");
    assert!(
        f.iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
}

#[tokio::test]
async fn n_choices_are_interleaved() {
    let s = start(SimConfig::default()).await;
    let f = frames(
        &s.post(
            CHAT,
            json!({"messages": messages(), "stream": true, "n": 2}),
            &[],
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    let order: Vec<u64> = f
        .iter()
        .filter_map(|c| c["choices"][0]["index"].as_u64())
        .collect();
    assert!(order.windows(2).any(|w| w[0] != w[1]));
    assert!(order.contains(&1));
}

const COMPLETIONS: &str = "/openai/deployments/gpt-35-turbo/completions?api-version=2024-10-21";

/// The generated text of a content frame, as (choice index, text), for chat deltas and
/// completion texts alike; role, finish and usage frames carry none.
fn content_of(frame: &Value) -> Option<(u64, &str)> {
    let c = frame["choices"].get(0)?;
    let text = c["delta"]["content"].as_str().or(c["text"].as_str())?;
    (!text.is_empty() && c["finish_reason"].is_null()).then(|| (c["index"].as_u64().unwrap(), text))
}

/// Chat and completions stream through one plan: with `n = 2` both interleave their choices'
/// content by index, send the finish frames after all content in index order, and end with
/// the usage frame (the unstreamed twin's usage) only when `include_usage` is set, then
/// `data: [DONE]`.
#[tokio::test]
async fn chat_and_completions_streams_share_one_framing() {
    let s = start(SimConfig::default()).await;
    let cases = [
        (CHAT, json!({"messages": messages(), "n": 2})),
        (
            COMPLETIONS,
            json!({"prompt": "Tell me a story", "n": 2, "max_tokens": 40}),
        ),
    ];
    for (path, unstreamed) in cases {
        let expected_usage = s
            .post(path, unstreamed.clone(), &[])
            .await
            .json::<Value>()
            .await
            .unwrap()["usage"]
            .clone();
        for include_usage in [true, false] {
            let mut body = unstreamed.clone();
            body["stream"] = json!(true);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let what = format!("{path} include_usage={include_usage}");
            let raw = s.post(path, body, &[]).await.text().await.unwrap();
            assert!(raw.ends_with("\n\ndata: [DONE]\n\n"), "{what}");
            assert_eq!(raw.matches("[DONE]").count(), 1, "{what}");
            let f = frames(&raw);
            assert_eq!(f[0]["choices"], json!([]), "{what}");
            assert!(f[0]["prompt_filter_results"].is_array(), "{what}");

            let content: Vec<u64> = f.iter().filter_map(content_of).map(|(i, _)| i).collect();
            let per_choice = [0, 1].map(|i| content.iter().filter(|c| **c == i).count());
            assert!(per_choice.iter().all(|n| *n > 0), "{what}: {content:?}");
            let both = 2 * per_choice[0].min(per_choice[1]);
            assert!(
                content[..both]
                    .iter()
                    .enumerate()
                    .all(|(k, i)| *i == k as u64 % 2),
                "{what}: choices alternate by index while both have content: {content:?}"
            );

            let finishes: Vec<(usize, u64)> = f
                .iter()
                .enumerate()
                .filter(|(_, c)| c["choices"][0]["finish_reason"].is_string())
                .map(|(k, c)| (k, c["choices"][0]["index"].as_u64().unwrap()))
                .collect();
            assert_eq!(
                finishes.iter().map(|(_, i)| *i).collect::<Vec<_>>(),
                [0, 1],
                "{what}"
            );
            let last_content = f.iter().rposition(|c| content_of(c).is_some()).unwrap();
            assert!(
                finishes[0].0 > last_content,
                "{what}: finish frames follow all content"
            );

            let last = f.last().unwrap();
            if include_usage {
                assert_eq!(
                    finishes[1].0,
                    f.len() - 2,
                    "{what}: usage frame right after the finishes"
                );
                assert_eq!(last["choices"], json!([]), "{what}");
                assert_eq!(last["usage"], expected_usage, "{what}");
                assert!(
                    f[1..f.len() - 1]
                        .iter()
                        .all(|c| c.get("usage") == Some(&Value::Null)),
                    "{what}: every other chunk carries usage: null"
                );
            } else {
                assert_eq!(finishes[1].0, f.len() - 1, "{what}: no usage frame");
                assert!(f.iter().all(|c| c.get("usage").is_none()), "{what}");
            }
        }
    }
}

#[tokio::test]
async fn errors_have_aoai_shapes() {
    let s = start(SimConfig {
        api_key: Some("right".into()),
        ..SimConfig::default()
    })
    .await;
    let body = json!({"messages": messages()});
    let send = |path: &'static str, key: &'static str| {
        let req = s
            .http
            .post(format!("{}{path}", s.base))
            .header("api-key", key)
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    let r = send(CHAT, "wrong").await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "401");
    let r = send("/openai/deployments/gpt-4o/chat/completions", "right").await;
    assert_eq!(r.status(), 404);
    let r = send(
        "/openai/deployments/gpt-4o/chat/completions?api-version=1999-01-01",
        "right",
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = send(
        "/openai/deployments/nope/chat/completions?api-version=2024-10-21",
        "right",
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "DeploymentNotFound"
    );
    let r = send(
        "/openai/deployments/text-embedding-3-small/chat/completions?api-version=2024-10-21",
        "right",
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "OperationNotSupported"
    );
}

#[tokio::test]
async fn faults_by_header() {
    let s = start(SimConfig::default()).await;
    let body = json!({"messages": messages(), "stream": true});
    let r = s
        .post(
            CHAT,
            body.clone(),
            &[("x-sim-fault", "429;retry-after-ms=1500")],
        )
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after-ms"], "1500");
    assert_eq!(r.headers()["retry-after"], "2");
    let r = s.post(CHAT, body.clone(), &[("x-sim-fault", "500")]).await;
    assert_eq!(r.status(), 500);
    let r = s
        .post(
            CHAT,
            body.clone(),
            &[("x-sim-fault", "reset-after-chunks=3")],
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.is_err(), "the connection is cut mid-body");
    let r = s.post(CHAT, body, &[("x-sim-fault", "bogus")]).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn rate_limits_answer_429_with_remaining_headers() {
    let mut config = SimConfig::default();
    config.deployments[0].requests_per_minute = Some(2);
    let s = start(config).await;
    let body = json!({"messages": messages()});
    let r = s.post(CHAT, body.clone(), &[]).await;
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "1");
    assert_eq!(s.post(CHAT, body.clone(), &[]).await.status(), 200);
    let r = s.post(CHAT, body, &[]).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after-ms"));
}

#[tokio::test]
async fn embeddings_floats_and_base64() {
    let s = start(SimConfig::default()).await;
    let path = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21";
    let v: Value = s
        .post(path, json!({"input": ["hello world", "bye"]}), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 1536);
    let expected = Encoding::Cl100kBase.count("hello world") + Encoding::Cl100kBase.count("bye");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), expected);
    let b: Value = s
        .post(
            path,
            json!({"input": "hello world", "encoding_format": "base64", "dimensions": 8}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(b["data"][0]["embedding"].as_str().unwrap().len() > 40);
}

#[tokio::test]
async fn v1_surface_takes_the_deployment_from_the_body() {
    let s = start(SimConfig::default()).await;
    let r = s
        .http
        .post(format!("{}/openai/v1/chat/completions", s.base))
        .bearer_auth("k")
        .json(&json!({"model": "gpt-4o-mini", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["model"],
        "gpt-4o-mini-2024-07-18"
    );
}

/// The Files API: an upload past axum's default 2 MB body cap is taken (found in review:
/// multipart reads were capped at 2 MB), and the list is newest first, filtered by purpose,
/// in cursor pages.
#[tokio::test]
async fn files_take_large_uploads_and_list_newest_first_by_purpose() {
    let s = start(SimConfig::default()).await;
    let upload = |purpose: &str, content: Vec<u8>| {
        let boundary = "sim-files";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        s.http
            .post(format!("{}/openai/files?api-version=2024-10-21", s.base))
            .header("api-key", "k")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
    };
    let big = upload("batch", vec![b'x'; 3 * 1024 * 1024]).await.unwrap();
    assert_eq!(big.status(), 200);
    let big: Value = big.json().await.unwrap();
    assert_eq!(big["bytes"], 3 * 1024 * 1024);
    let tune: Value = upload("fine-tune", b"{}".to_vec())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = |query: &str| {
        s.http
            .get(format!("{}/openai/v1/files{query}", s.base))
            .header("api-key", "k")
            .send()
    };
    let all: Value = list("").await.unwrap().json().await.unwrap();
    let ids: Vec<&Value> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["id"])
        .collect();
    assert_eq!(ids, [&tune["id"], &big["id"]], "newest first");
    let batch: Value = list("?purpose=batch").await.unwrap().json().await.unwrap();
    assert_eq!(batch["data"].as_array().unwrap().len(), 1);
    assert_eq!(batch["data"][0]["id"], big["id"]);
    let page: Value = list("?limit=1").await.unwrap().json().await.unwrap();
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().unwrap();
    let next: Value = list(&format!("?limit=1&after={after}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["data"][0]["id"], big["id"]);
    assert_eq!(next["has_more"], false);
    let gone = s
        .http
        .get(format!("{}/openai/v1/files/file-none", s.base))
        .header("api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}
