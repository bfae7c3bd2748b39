//! Request handling: routing, auth, validation, limits, faults, and the response bodies and SSE
//! frames of each operation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tollgate_tokens::{CompletionParts, Encoding};

use crate::Simulator;
use crate::config::SimDeployment;
use crate::error::AoaiError;
use crate::fault::Fault;
use crate::generate;

mod auth;
mod routing;
pub(crate) mod windows;

use routing::Operation;

pub(crate) async fn handle(sim: &Simulator, request: Request<Body>) -> Result<Response, AoaiError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query();
    let route = routing::route(&path).ok_or_else(AoaiError::resource_not_found)?;
    let op = route.op;
    if parts.method != Method::POST {
        return Err(AoaiError::resource_not_found());
    }
    if !auth::authorized(sim.inner.config.api_key.as_deref(), &parts.headers) {
        return Err(AoaiError::unauthorized());
    }
    let api_version = routing::api_version(query, route.v1)?;
    let limit = sim.inner.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| AoaiError::payload_too_large(limit))?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|_| {
        AoaiError::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.",
            None,
        )
    })?;
    if !body.is_object() {
        return Err(AoaiError::invalid_request(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let deployment_name = routing::deployment_name(&route, &body)?;
    let deployment = sim
        .inner
        .deployments
        .get(&deployment_name)
        .ok_or_else(AoaiError::deployment_not_found)?;
    if let Some(c) = sim.inner.requests.get(&deployment_name) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    if deployment.kind != op.served_by() {
        return Err(AoaiError::operation_not_supported(
            op.short(),
            &deployment.model,
        ));
    }

    let fault = match parts
        .headers
        .get("x-sim-fault")
        .and_then(|v| v.to_str().ok())
    {
        Some(spec) => Fault::parse(spec)
            .map_err(|e| AoaiError::invalid_request(format!("x-sim-fault: {e}"), None))?,
        None => sim.inner.default_fault.clone().unwrap_or_default(),
    };
    if let Some(delay) = fault.slow_first_byte {
        tokio::time::sleep(delay).await;
    }
    if fault.content_filter {
        return Err(AoaiError::prompt_filtered());
    }
    if let Some(status) = fault.status {
        return Err(AoaiError::for_status(
            status,
            op.name(),
            &api_version,
            fault.retry_after_ms.unwrap_or(1000),
        ));
    }

    let latency = Latency::from(sim, &parts.headers);
    // The seed ignores how the answer is delivered, so the same request streamed or not
    // yields the same content and the same usage.
    let mut seed_body = body.clone();
    if let Some(map) = seed_body.as_object_mut() {
        map.remove("stream");
        map.remove("stream_options");
    }
    let seed =
        generate::stable_hash(&[deployment.name.as_bytes(), seed_body.to_string().as_bytes()]);
    let plan = match op {
        Operation::Chat => chat(sim, deployment, &body, seed)?,
        Operation::Completions => completions(sim, deployment, &body, seed)?,
        Operation::Embeddings => embeddings(deployment, &body, seed)?,
    };
    let remaining = sim
        .inner
        .windows
        .admit(deployment, &body, plan.prompt_tokens)
        .map_err(|t| AoaiError::rate_limited(op.name(), &api_version, t.retry_after_ms))?;

    if latency.ttft > Duration::ZERO {
        tokio::time::sleep(latency.ttft).await;
    }
    let mut response = match plan.body {
        Planned::Json(value) => {
            if latency.inter_token > Duration::ZERO && plan.completion_tokens > 0 {
                tokio::time::sleep(latency.inter_token * plan.completion_tokens as u32).await;
            }
            let bytes = Bytes::from(value.to_string());
            let mut resp = match fault.reset_after_chunks {
                Some(n) => Response::new(cut_body(bytes, n)),
                None => Response::new(Body::from(bytes)),
            };
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Planned::Stream(frames) => {
            let mut resp = Response::new(stream_body(
                frames,
                latency.inter_token,
                fault.reset_after_chunks,
            ));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
    };
    *response.status_mut() = StatusCode::OK;
    add_headers(
        response.headers_mut(),
        &parts.headers,
        deployment,
        remaining,
        op,
        seed,
    );
    Ok(response)
}

struct Latency {
    ttft: Duration,
    inter_token: Duration,
}

impl Latency {
    /// Configured latency, overridable per request with `x-sim-ttft-ms` and
    /// `x-sim-inter-token-ms`.
    fn from(sim: &Simulator, headers: &HeaderMap) -> Self {
        let ms = |name: &str, default: u64| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_millis(default), Duration::from_millis)
        };
        Latency {
            ttft: ms("x-sim-ttft-ms", sim.inner.config.time_to_first_token_ms),
            inter_token: ms("x-sim-inter-token-ms", sim.inner.config.inter_token_ms),
        }
    }
}

enum Planned {
    Json(Value),
    /// Each element is one SSE event, already framed (`data: …\n\n`); `true` marks the frames
    /// that carry generated content, which are the ones paced by the inter-token delay.
    Stream(Vec<(Bytes, bool)>),
}

struct Plan {
    body: Planned,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn add_headers(
    h: &mut HeaderMap,
    request: &HeaderMap,
    deployment: &SimDeployment,
    remaining: Option<windows::Remaining>,
    op: Operation,
    seed: u64,
) {
    let id = uuid::Uuid::now_v7().to_string();
    let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    };
    set(h, "apim-request-id", &id);
    set(h, "x-request-id", &id);
    set(h, "x-ms-region", "Sim Central");
    set(h, "x-ms-rai-invoked", "true");
    set(h, "x-content-type-options", "nosniff");
    set(
        h,
        "azureml-model-session",
        &format!("sim-{}-{:04x}", op.short(), seed & 0xffff),
    );
    set(h, "x-ms-deployment-name", &deployment.name);
    if let Some(client_id) = request
        .get("x-ms-client-request-id")
        .and_then(|v| v.to_str().ok())
    {
        set(h, "x-ms-client-request-id", client_id);
    }
    if let Some(remaining) = remaining {
        remaining.write_headers(h);
    }
}

fn filter_results(prompt: bool) -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    if prompt {
        json!({"hate": safe, "jailbreak": {"filtered": false, "detected": false},
               "self_harm": safe, "sexual": safe, "violence": safe})
    } else {
        json!({"hate": safe, "protected_material_code": {"filtered": false, "detected": false},
               "protected_material_text": {"filtered": false, "detected": false},
               "self_harm": safe, "sexual": safe, "violence": safe})
    }
}

fn prompt_filter_results(prompts: usize) -> Value {
    Value::Array(
        (0..prompts)
            .map(|i| json!({"prompt_index": i, "content_filter_results": filter_results(true)}))
            .collect(),
    )
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "completion_tokens": completion,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                      "reasoning_tokens": 0, "rejected_prediction_tokens": 0},
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": prompt + completion,
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

fn stream_options(body: &Value, stream: bool) -> Result<bool, AoaiError> {
    match body.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(_) if !stream => Err(AoaiError::invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        )),
        Some(opts) => Ok(opts
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false)),
    }
}

fn n_choices(body: &Value) -> Result<usize, AoaiError> {
    match body.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=128) => Ok(n as usize),
            _ => Err(AoaiError::invalid_request(
                format!("{v} is not valid for 'n': it must be an integer from 1 to 128."),
                Some("n"),
            )),
        },
    }
}

fn max_tokens(body: &Value) -> Result<Option<usize>, AoaiError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => return Ok(Some(n as usize)),
                _ => {
                    return Err(AoaiError::invalid_request(
                        format!(
                            "Invalid '{key}': integer below minimum value. Expected a value >= 1, but got {v} instead."
                        ),
                        Some(key),
                    ));
                }
            },
        }
    }
    Ok(None)
}

fn target_len(sim: &Simulator, rng: &mut StdRng) -> usize {
    use rand::Rng;
    let c = &sim.inner.config;
    rng.random_range(c.min_completion_tokens..=c.max_completion_tokens)
}

/// What one chat choice produced.
struct ChatChoice {
    text: Option<String>,
    finish_reason: &'static str,
    /// (id, name, arguments)
    calls: Vec<(String, String, String)>,
    legacy_function: bool,
}

/// The tools the request asks the model to call, if it asks: `tool_choice` "required" calls
/// every tool (up to three, one when `parallel_tool_calls` is false); a named choice calls that
/// function; `auto`/`none` answer with text. Legacy `functions` with a named `function_call`
/// produce a `function_call`.
fn tools_to_call(body: &Value) -> (Vec<Value>, bool) {
    let tools: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.get("function").cloned())
                .collect()
        })
        .unwrap_or_default();
    let by_name = |list: &[Value], name: &str| {
        list.iter()
            .filter(|f| f.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
            .collect()
    };
    if !tools.is_empty() {
        let parallel = body
            .get("parallel_tool_calls")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        return match body.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => {
                let n = if parallel { tools.len().min(3) } else { 1 };
                (tools.into_iter().take(n).collect(), false)
            }
            Some(Value::Object(choice)) => {
                let name = choice
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                (name.map(|n| by_name(&tools, n)).unwrap_or_default(), false)
            }
            _ => (Vec::new(), false),
        };
    }
    let functions: Vec<Value> = body
        .get("functions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match body.get("function_call") {
        Some(Value::Object(fc)) => match fc.get("name").and_then(Value::as_str) {
            Some(name) => (
                by_name(&functions, name).into_iter().take(1).collect(),
                true,
            ),
            None => (Vec::new(), true),
        },
        _ => (Vec::new(), true),
    }
}

fn chat(sim: &Simulator, d: &SimDeployment, body: &Value, seed: u64) -> Result<Plan, AoaiError> {
    let messages = body.get("messages").ok_or_else(|| {
        AoaiError::invalid_request("'messages' is a required property", Some("messages"))
    })?;
    if messages.as_array().is_none_or(|m| m.is_empty()) {
        return Err(AoaiError::invalid_request(
            "[] is too short - 'messages'",
            Some("messages"),
        ));
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = stream_options(body, stream)?;
    let n = n_choices(body)?;
    let cap = max_tokens(body)?;
    let enc = Encoding::for_model(&d.model);
    let prompt_tokens = tollgate_tokens::count_chat_prompt(&d.model, body);
    let (functions, legacy) = tools_to_call(body);

    let mut rng = generate::rng(seed);
    let id = format!("chatcmpl-{}", generate::alnum_id(&mut rng, 29));
    let fingerprint = format!(
        "fp_{:010x}",
        generate::stable_hash(&[d.model.as_bytes()]) >> 24
    );
    let choices: Vec<ChatChoice> = (0..n)
        .map(|_| {
            if functions.is_empty() {
                let target = target_len(sim, &mut rng);
                let t = generate::text(enc, &mut rng, target, cap);
                ChatChoice {
                    text: Some(t.text),
                    finish_reason: t.finish_reason,
                    calls: vec![],
                    legacy_function: false,
                }
            } else {
                let calls = functions
                    .iter()
                    .map(|f| {
                        let name = f
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("function")
                            .to_owned();
                        let args = generate::arguments(&mut rng, f.get("parameters"));
                        (
                            format!("call_{}", generate::alnum_id(&mut rng, 24)),
                            name,
                            args,
                        )
                    })
                    .collect();
                ChatChoice {
                    text: None,
                    finish_reason: if legacy {
                        "function_call"
                    } else {
                        "tool_calls"
                    },
                    calls,
                    legacy_function: legacy,
                }
            }
        })
        .collect();
    let call_refs: Vec<Vec<(&str, &str)>> = choices
        .iter()
        .map(|c| {
            c.calls
                .iter()
                .map(|(_, n, a)| (n.as_str(), a.as_str()))
                .collect()
        })
        .collect();
    let parts: Vec<CompletionParts<'_>> = choices
        .iter()
        .zip(&call_refs)
        .map(|(c, calls)| CompletionParts {
            content: c.text.as_deref(),
            refusal: None,
            calls,
        })
        .collect();
    let completion_tokens = tollgate_tokens::count_completion(&d.model, &parts);
    let created = chrono_now();

    if !stream {
        let choices_json: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message = json!({"annotations": [], "content": c.text, "refusal": null, "role": "assistant"});
                if c.legacy_function {
                    if let Some((_, name, args)) = c.calls.first() {
                        message["function_call"] = json!({"name": name, "arguments": args});
                    }
                } else if !c.calls.is_empty() {
                    message["tool_calls"] = Value::Array(
                        c.calls
                            .iter()
                            .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                            .collect(),
                    );
                }
                json!({"content_filter_results": filter_results(false), "finish_reason": c.finish_reason,
                       "index": i, "logprobs": null, "message": message})
            })
            .collect();
        let value = json!({
            "choices": choices_json, "created": created, "id": id, "model": d.model,
            "object": "chat.completion", "prompt_filter_results": prompt_filter_results(1),
            "system_fingerprint": fingerprint, "usage": usage_json(prompt_tokens, completion_tokens),
        });
        return Ok(Plan {
            body: Planned::Json(value),
            prompt_tokens,
            completion_tokens,
        });
    }

    let chunk = |choices: Value| {
        let mut v = json!({"choices": choices, "created": created, "id": id, "model": d.model,
                           "object": "chat.completion.chunk", "system_fingerprint": fingerprint});
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let choice = |i: usize, delta: Value, finish: Option<&str>, filters: Value| json!({"content_filter_results": filters, "delta": delta, "finish_reason": finish, "index": i, "logprobs": null});
    let mut frames = vec![(
        sse(
            &json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": prompt_filter_results(1)}),
        ),
        false,
    )];
    // Per choice, the sequence of deltas after the role frame; interleaved by index below, as
    // AOAI interleaves `n > 1` choices.
    let per_choice: Vec<Vec<Value>> = choices
        .iter()
        .map(|c| {
            let mut deltas = Vec::new();
            if let Some(text) = &c.text {
                for piece in generate::deltas(enc, text, sim.inner.config.tokens_per_delta) {
                    deltas.push(json!({"content": piece}));
                }
            }
            for (ci, (call_id, name, args)) in c.calls.iter().enumerate() {
                let pieces = generate::deltas(enc, args, sim.inner.config.tokens_per_delta.max(2));
                if c.legacy_function {
                    deltas.push(json!({"function_call": {"name": name, "arguments": ""}}));
                    for p in pieces {
                        deltas.push(json!({"function_call": {"arguments": p}}));
                    }
                } else {
                    deltas.push(json!({"tool_calls": [{"index": ci, "id": call_id, "type": "function",
                                                      "function": {"name": name, "arguments": ""}}]}));
                    for p in pieces {
                        deltas.push(json!({"tool_calls": [{"index": ci, "function": {"arguments": p}}]}));
                    }
                }
            }
            deltas
        })
        .collect();
    for (i, c) in choices.iter().enumerate() {
        let content = if c.text.is_some() {
            json!("")
        } else {
            Value::Null
        };
        let delta = json!({"content": content, "refusal": null, "role": "assistant"});
        frames.push((
            sse(&chunk(json!([choice(i, delta, None, json!({}))]))),
            false,
        ));
    }
    let longest = per_choice.iter().map(Vec::len).max().unwrap_or(0);
    for step in 0..longest {
        for (i, deltas) in per_choice.iter().enumerate() {
            if let Some(delta) = deltas.get(step) {
                let filters = if delta.get("content").is_some() {
                    filter_results(false)
                } else {
                    json!({})
                };
                frames.push((
                    sse(&chunk(json!([choice(i, delta.clone(), None, filters)]))),
                    true,
                ));
            }
        }
    }
    for (i, c) in choices.iter().enumerate() {
        frames.push((
            sse(&chunk(json!([choice(
                i,
                json!({}),
                Some(c.finish_reason),
                json!({})
            )]))),
            false,
        ));
    }
    let usage_frame = include_usage.then(|| chunk(json!([])));
    Ok(finish_stream(
        frames,
        usage_frame,
        prompt_tokens,
        completion_tokens,
    ))
}

fn completions(
    sim: &Simulator,
    d: &SimDeployment,
    body: &Value,
    seed: u64,
) -> Result<Plan, AoaiError> {
    let prompt = body.get("prompt").ok_or_else(|| {
        AoaiError::invalid_request("'prompt' is a required property", Some("prompt"))
    })?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = stream_options(body, stream)?;
    let n = n_choices(body)?;
    let cap = max_tokens(body)?.or(Some(16));
    let enc = Encoding::for_model(&d.model);
    let prompts = tollgate_tokens::split_inputs(prompt).len().max(1);
    let prompt_tokens = tollgate_tokens::count_completions_prompt(&d.model, prompt);
    let mut rng = generate::rng(seed);
    let id = format!("cmpl-{}", generate::alnum_id(&mut rng, 29));
    let texts: Vec<generate::Text> = (0..n * prompts)
        .map(|_| {
            let target = target_len(sim, &mut rng);
            generate::text(enc, &mut rng, target, cap)
        })
        .collect();
    let parts: Vec<CompletionParts<'_>> = texts
        .iter()
        .map(|t| CompletionParts {
            content: Some(&t.text),
            ..Default::default()
        })
        .collect();
    let completion_tokens = tollgate_tokens::count_completion(&d.model, &parts);
    let created = chrono_now();
    if !stream {
        let choices: Vec<Value> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"text": t.text, "index": i, "finish_reason": t.finish_reason,
                                 "logprobs": null, "content_filter_results": filter_results(false)})
            })
            .collect();
        let value = json!({"id": id, "object": "text_completion", "created": created, "model": d.model,
                           "choices": choices, "prompt_filter_results": prompt_filter_results(prompts),
                           "usage": usage_json(prompt_tokens, completion_tokens)});
        return Ok(Plan {
            body: Planned::Json(value),
            prompt_tokens,
            completion_tokens,
        });
    }
    let chunk = |choices: Value| {
        let mut v = json!({"id": id, "object": "text_completion", "created": created,
                           "model": d.model, "choices": choices});
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut frames = vec![(
        sse(
            &json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": prompt_filter_results(prompts)}),
        ),
        false,
    )];
    let per_choice: Vec<Vec<String>> = texts
        .iter()
        .map(|t| generate::deltas(enc, &t.text, sim.inner.config.tokens_per_delta))
        .collect();
    let longest = per_choice.iter().map(Vec::len).max().unwrap_or(0);
    for step in 0..longest {
        for (i, pieces) in per_choice.iter().enumerate() {
            if let Some(p) = pieces.get(step) {
                let c = json!([{"text": p, "index": i, "finish_reason": null, "logprobs": null,
                                "content_filter_results": filter_results(false)}]);
                frames.push((sse(&chunk(c)), true));
            }
        }
    }
    for (i, t) in texts.iter().enumerate() {
        let c = json!([{"text": "", "index": i, "finish_reason": t.finish_reason, "logprobs": null,
                        "content_filter_results": {}}]);
        frames.push((sse(&chunk(c)), false));
    }
    let usage_frame = include_usage.then(|| chunk(json!([])));
    Ok(finish_stream(
        frames,
        usage_frame,
        prompt_tokens,
        completion_tokens,
    ))
}

fn embeddings(d: &SimDeployment, body: &Value, seed: u64) -> Result<Plan, AoaiError> {
    use base64::Engine as _;
    let input = body.get("input").ok_or_else(|| {
        AoaiError::invalid_request("'input' is a required property", Some("input"))
    })?;
    let inputs = tollgate_tokens::split_inputs(input);
    if inputs.is_empty() || inputs.iter().any(|i| i.as_str() == Some("")) {
        return Err(AoaiError::invalid_request(
            "'input' must not be empty.",
            Some("input"),
        ));
    }
    let dims = match body.get("dimensions").and_then(Value::as_u64) {
        Some(n) if n >= 1 && n as usize <= d.dimensions => n as usize,
        Some(_) => {
            return Err(AoaiError::invalid_request(
                format!("'dimensions' must be between 1 and {}.", d.dimensions),
                Some("dimensions"),
            ));
        }
        None => d.dimensions,
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let prompt_tokens = tollgate_tokens::count_embeddings_input(&d.model, input);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut rng =
                generate::rng(seed ^ generate::stable_hash(&[item.to_string().as_bytes()]));
            let v = generate::embedding(&mut rng, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let value = json!({"object": "list", "data": data, "model": d.model,
                       "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
    Ok(Plan {
        body: Planned::Json(value),
        prompt_tokens,
        completion_tokens: 0,
    })
}

/// Ends a stream as AOAI does: the usage frame (only when asked; `usage_frame` is an empty-choices
/// chunk to carry it), then `data: [DONE]`.
fn finish_stream(
    mut frames: Vec<(Bytes, bool)>,
    usage_frame: Option<Value>,
    prompt_tokens: u64,
    completion_tokens: u64,
) -> Plan {
    if let Some(mut last) = usage_frame {
        last["usage"] = usage_json(prompt_tokens, completion_tokens);
        frames.push((sse(&last), false));
    }
    frames.push((Bytes::from_static(DONE), false));
    Plan {
        body: Planned::Stream(frames),
        prompt_tokens,
        completion_tokens,
    }
}

fn chrono_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn reset_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected fault: connection reset",
    )
}

/// Sends the frames, pacing content frames by `inter_token`, and aborts the connection after
/// `reset_after` frames when asked.
fn stream_body(
    frames: Vec<(Bytes, bool)>,
    inter_token: Duration,
    reset_after: Option<usize>,
) -> Body {
    if inter_token.is_zero() && reset_after.is_none() {
        return Body::from_stream(futures_util::stream::iter(
            frames.into_iter().map(|(b, _)| Ok::<_, std::io::Error>(b)),
        ));
    }
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), 0usize, false),
        move |(mut frames, sent, done)| async move {
            if done {
                return None;
            }
            if reset_after == Some(sent) {
                // Return Pending once so hyper flushes the frames already sent before the
                // reset, as a real mid-stream cut delivers them.
                tokio::task::yield_now().await;
                return Some((Err(reset_error()), (frames, sent, true)));
            }
            let (bytes, paced) = frames.next()?;
            if paced && !inter_token.is_zero() {
                tokio::time::sleep(inter_token).await;
            }
            Some((Ok(bytes), (frames, sent + 1, false)))
        },
    );
    Body::from_stream(stream.boxed())
}

/// A non-stream body cut after `chunks` pieces of 64 bytes, then reset.
fn cut_body(bytes: Bytes, chunks: usize) -> Body {
    let pieces: Vec<Bytes> = bytes
        .chunks(64)
        .take(chunks)
        .map(Bytes::copy_from_slice)
        .collect();
    let stream = futures_util::stream::iter(pieces.into_iter().map(Ok)).chain(
        futures_util::stream::once(async {
            tokio::task::yield_now().await;
            Err(reset_error())
        }),
    );
    Body::from_stream(stream)
}
