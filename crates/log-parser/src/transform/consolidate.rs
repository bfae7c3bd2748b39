//! Turns the raw records of one request into its consolidated record: stitch the response,
//! take or estimate usage, price it, and apply the content policy.

use std::collections::BTreeMap;

use serde_json::Value;
use tollgate_records::{
    Body, ConsolidatedRecord, Consumer, Cost, EndRecord, ErrorInfo, ErrorSource, Latency, Money,
    RawRecord, RequestRecord, SCHEMA_VERSION, Usage, UsageQuality, UsageQualityInfo, UsageSource,
};
use tollgate_tokens::PriceTable;

use super::responses;
use super::sse::SseParser;
use super::stitch::{self, Stitched, StreamKind};
use super::usage;

/// What consolidation needs besides the records.
pub struct Options<'a> {
    /// Deployment → model, used when the response did not name its model.
    pub deployment_models: &'a BTreeMap<String, String>,
    pub deployment_price_multipliers: &'a BTreeMap<String, f64>,
    pub prices: &'a PriceTable,
    /// Keep prompts and completions in the record (otherwise only metadata and usage).
    pub store_content: bool,
}

/// The parts of one request found in the store.
#[derive(Default)]
pub struct Parts {
    pub request: Option<RequestRecord>,
    pub segments: BTreeMap<u32, Vec<u8>>,
    pub end: Option<EndRecord>,
    /// Pieces of a request body recorded in parts (`Body::Parts`), by seq.
    pub body_parts: BTreeMap<u32, Vec<u8>>,
    /// How many raw records were found, for the consolidation's revision.
    pub raw_records: usize,
}

impl Parts {
    pub fn from_records(records: Vec<RawRecord>) -> Self {
        let mut p = Parts {
            raw_records: records.len(),
            ..Parts::default()
        };
        for r in records {
            match r {
                RawRecord::Request(r) => p.request = Some(r),
                RawRecord::Part(part) => {
                    if let Ok(bytes) = part.data.to_bytes() {
                        p.body_parts.insert(part.seq, bytes);
                    }
                }
                RawRecord::Chunks(c) => {
                    // Undecodable base64 cannot come from our writer; treat it as missing.
                    if let Ok(bytes) = c.data.to_bytes() {
                        p.segments.insert(c.seq, bytes);
                    }
                }
                RawRecord::End(e) => p.end = Some(e),
            }
        }
        p.join_body_parts();
        p
    }

    /// Puts a body recorded in parts back together once every part is here, so the rest of
    /// consolidation sees the body as it was sent.
    fn join_body_parts(&mut self) {
        let Some(request) = self.request.as_mut() else {
            return;
        };
        let Body::Parts {
            content_type,
            parts,
            ..
        } = &request.body
        else {
            return;
        };
        if !(1..=*parts).all(|s| self.body_parts.contains_key(&s)) {
            return;
        }
        let bytes: Vec<u8> = self.body_parts.values().flatten().copied().collect();
        request.body = Body::from_bytes(Some(content_type.as_str()), &bytes);
    }

    /// Every segment the end counted is here.
    fn segments_whole(&self, end: &EndRecord) -> bool {
        let first = end.first_segment_seq;
        (first..first + end.segments).all(|s| self.segments.contains_key(&s))
    }

    /// Request and end present, the request body whole, and every segment the end counted.
    pub fn is_complete(&self) -> bool {
        match (&self.request, &self.end) {
            (Some(request), Some(end)) => {
                let body_whole = !matches!(request.body, Body::Parts { .. });
                body_whole && self.segments_whole(end)
            }
            _ => false,
        }
    }
}

fn stream_kind(operation: &str) -> StreamKind {
    if operation == "completions" {
        StreamKind::Completions
    } else {
        StreamKind::Chat
    }
}

fn stitch_response(parts: &Parts, end_json: Option<&Value>, operation: &str) -> Stitched {
    let end = parts.end.as_ref();
    let responses_api = operation == "responses";
    if let Some(json) = end_json {
        if responses_api && responses::is_response(json) {
            return responses::from_body(json);
        }
        return stitch::from_body(json);
    }
    let bytes: Vec<u8> = parts.segments.values().flatten().copied().collect();
    if bytes.is_empty() {
        return Stitched::default();
    }
    // Without an end record there is no content type; a stream request's body is SSE.
    let is_sse = match end {
        Some(e) => tollgate_records::is_event_stream(e.content_type.as_deref()),
        None => parts.request.as_ref().is_some_and(|r| r.stream),
    };
    if is_sse {
        let mut p = SseParser::new();
        let mut events = p.push(&bytes);
        events.extend(p.finish());
        if responses_api {
            return responses::stitch_events(&events);
        }
        return stitch::stitch_stream(stream_kind(operation), &events);
    }
    // A non-stream body too large to go inline was recorded as segments.
    lean_response(&bytes)
        .map(|v| {
            if responses_api && responses::is_response(&v) {
                responses::from_body(&v)
            } else {
                stitch::from_body(&v)
            }
        })
        .unwrap_or_default()
}

/// The top-level fields of a response body that consolidation reads, and nothing else: an
/// embeddings answer's `data` (thousands of floats per input) or any field we do not use is
/// skipped while parsing instead of being built into a tree.
#[derive(serde::Deserialize)]
struct LeanResponse {
    id: Option<Value>,
    model: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: Option<Value>,
    usage: Option<Value>,
    prompt_filter_results: Option<Value>,
    prompt_annotations: Option<Value>,
    error: Option<Value>,
    // The Responses API's answer.
    object: Option<Value>,
    status: Option<Value>,
    output: Option<Value>,
    incomplete_details: Option<Value>,
}

fn lean_response(bytes: &[u8]) -> Option<Value> {
    let lean: LeanResponse = serde_json::from_slice(bytes).ok()?;
    let fields = [
        ("id", lean.id),
        ("model", lean.model),
        ("system_fingerprint", lean.system_fingerprint),
        ("choices", lean.choices),
        ("usage", lean.usage),
        ("prompt_filter_results", lean.prompt_filter_results),
        ("prompt_annotations", lean.prompt_annotations),
        ("error", lean.error),
        ("object", lean.object),
        ("status", lean.status),
        ("output", lean.output),
        ("incomplete_details", lean.incomplete_details),
    ];
    Some(Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect(),
    ))
}

fn prompt_of(body: &Value) -> Option<Value> {
    ["messages", "prompt", "input"]
        .iter()
        .find_map(|k| body.get(*k).cloned())
}

pub fn consolidate(parts: &Parts, opts: &Options<'_>) -> Option<ConsolidatedRecord> {
    let request = parts.request.as_ref();
    let end = parts.end.as_ref();
    let id = request
        .map(|r| r.request_id.clone())
        .or_else(|| end.map(|e| e.request_id.clone()))?;
    let operation = request.map_or_else(|| "unknown".to_owned(), |r| r.operation.clone());
    let deployment = request.and_then(|r| r.deployment.clone());
    // The end record's body (a non-stream response or AOAI's error) is parsed once here.
    let end_json = end.and_then(|e| match &e.body {
        Body::Json { json } => lean_response(json.as_str().as_bytes()),
        _ => None,
    });
    let stitched = stitch_response(parts, end_json.as_ref(), &operation);
    let model = stitched.model.clone().or_else(|| {
        deployment
            .as_ref()
            .and_then(|d| opts.deployment_models.get(d).cloned())
    });
    let status = end.map(|e| e.status);
    // Without an end record (the proxy died, or the end is lost) the response may still carry
    // AOAI's usage in its segments: AOAI served the request, so it counts.
    let succeeded = status.is_none_or(|s| s < 400);
    let request_json = request.and_then(|r| r.body.parse_json());

    let counting_model = model.as_deref().or(deployment.as_deref()).unwrap_or("");
    let reported = stitched.usage.as_ref().and_then(usage::reported);
    let usage = if end.is_none() {
        // Only AOAI's own figures: an estimate of an answer whose end never arrived would
        // bill a guess at a partial response.
        reported
    } else if succeeded {
        reported.or_else(|| {
            usage::estimate(&operation, counting_model, request_json.as_ref(), &stitched)
        })
    } else if prompt_is_charged(end, end_json.as_ref()) {
        // AOAI charges the prompt of some requests it refuses and reports no usage for them:
        // count the prompt, nothing else.
        usage::estimate(
            &operation,
            counting_model,
            request_json.as_ref(),
            &Stitched::default(),
        )
    } else {
        None
    };
    // The serving backend's factor, recorded by the proxy, is the finer grain (a PTU and a
    // pay-as-you-go backend of one pool); the deployment's applies when it names none.
    let multiplier = end
        .and_then(|e| e.price_multiplier)
        .or_else(|| {
            deployment
                .as_ref()
                .and_then(|d| opts.deployment_price_multipliers.get(d).copied())
        })
        .and_then(|f| tollgate_tokens::multiplier_per_10k(f).map(|per_10k| (f, per_10k)));
    let cost = match (&usage, &model) {
        (Some(u), Some(m)) => opts
            .prices
            .cost_of(
                m,
                &tollgate_tokens::Tokens {
                    input: u.input_tokens,
                    cached: u.cached_input_tokens,
                    output: u.output_tokens,
                    audio_input: u.audio_input_tokens,
                    audio_output: u.audio_output_tokens,
                },
            )
            .map(|c| match multiplier {
                Some((_, per_10k)) => c.scaled(per_10k),
                None => c,
            })
            .map(|c| Cost {
                input: Money::from_nanos(c.input_nanos),
                cached_input: Money::from_nanos(c.cached_input_nanos),
                output: Money::from_nanos(c.output_nanos),
                total: Money::from_nanos(c.total_nanos),
                currency: opts.prices.currency.clone(),
                price_table_version: opts.prices.version.clone(),
                price_multiplier: multiplier.map(|(f, _)| f),
            }),
        _ => None,
    };

    let complete = parts.is_complete();
    let usage_quality = usage_quality(
        usage.as_ref(),
        request,
        request_json.as_ref(),
        end,
        succeeded,
        complete,
        counting_model,
    );
    let error = match (end, complete) {
        (Some(e), _) if e.error.is_some() => e.error.clone(),
        (Some(e), _) if e.status >= 400 => Some(upstream_error(e, end_json.as_ref())),
        (None, _) => Some(ErrorInfo {
            source: ErrorSource::Internal,
            code: "Incomplete".into(),
            message: "No end record arrived before the parser's deadline.".into(),
        }),
        (Some(_), false) => Some(ErrorInfo {
            source: ErrorSource::Internal,
            code: "Incomplete".into(),
            message: "Some response segments never arrived.".into(),
        }),
        _ => None,
    };
    let choices = stitched.choices;
    let prompt = request_json.as_ref().and_then(prompt_of);
    let mut record = ConsolidatedRecord {
        schema_version: SCHEMA_VERSION,
        id,
        time: request
            .map(|r| r.time)
            .or_else(|| end.map(|e| e.time))
            .unwrap_or_default(),
        consumer: request
            .map(|r| r.consumer.clone())
            .unwrap_or_else(Consumer::anonymous),
        deployment,
        model,
        operation,
        api_version: request.and_then(|r| r.api_version.clone()),
        path: request.map(|r| r.path.clone()).unwrap_or_default(),
        stream: request.is_some_and(|r| r.stream),
        status,
        backend: end.and_then(|e| e.backend.clone()),
        attempts: end.map(|e| e.attempts.clone()).unwrap_or_default(),
        latency: end.map(|e| Latency {
            ttfb_ms: e.ttfb_ms,
            total_ms: e.total_ms,
        }),
        unpriced: cost.is_none() && usage.as_ref().is_some_and(|u| u.total_tokens > 0),
        usage,
        usage_quality,
        cost,
        prompt,
        choices,
        prompt_filter_results: stitched.prompt_filter_results,
        response_id: stitched.id,
        system_fingerprint: stitched.system_fingerprint,
        response_headers: end.map(|e| e.headers.clone()).unwrap_or_default(),
        client_ip: request.and_then(|r| r.client_ip.clone()),
        user_agent: request.and_then(|r| r.user_agent.clone()),
        client_disconnected: end.is_some_and(|e| e.client_disconnected),
        complete,
        truncated: end.is_some_and(|e| e.truncated),
        response_bytes: end.map_or(0, |e| e.response_bytes),
        revision: tollgate_records::revision(parts.raw_records, complete),
        error,
    };
    if !opts.store_content {
        record.drop_content();
    }
    Some(record)
}

/// How exact the usage is, and why when it is not AOAI's own figure; `None` when AOAI bills
/// nothing for the request.
fn usage_quality(
    usage: Option<&Usage>,
    request: Option<&RequestRecord>,
    request_json: Option<&Value>,
    end: Option<&EndRecord>,
    succeeded: bool,
    complete: bool,
    model: &str,
) -> Option<UsageQualityInfo> {
    let info = |quality, reason: Option<String>| {
        // A count that included images given by URL counted them at a guessed size: say so.
        let counted = matches!(quality, UsageQuality::Estimated | UsageQuality::LowerBound);
        let guessed = request_json
            .filter(|_| counted)
            .map_or(0, tollgate_tokens::images_of_unknown_size);
        let reason = match (reason, guessed) {
            (reason, 0) => reason,
            (Some(r), n) => Some(format!(
                "{r}; {n} image(s) of unknown size counted as 1024x1024"
            )),
            (None, n) => Some(format!("{n} image(s) of unknown size counted as 1024x1024")),
        };
        Some(UsageQualityInfo { quality, reason })
    };
    let injected = request.is_some_and(|r| r.stream_usage_injected);
    // Cut: segments missing, the proxy stopped reading (a limit, a timeout, a client that left
    // past the drain bound), or the backend broke off a successful answer.
    let cut = if !complete {
        Some("response segments are missing".to_owned())
    } else if let Some(e) = end.filter(|e| e.truncated) {
        Some(match &e.error {
            Some(err) => format!("the proxy stopped reading the answer ({})", err.code),
            None => "the proxy stopped reading the answer".to_owned(),
        })
    } else {
        end.filter(|e| e.status < 400)
            .and_then(|e| e.error.as_ref())
            .map(|err| format!("the answer was cut ({})", err.code))
    };
    match usage {
        Some(u) if u.source == UsageSource::Reported => {
            let quality = if injected {
                UsageQuality::ReportedAfterInjection
            } else {
                UsageQuality::Reported
            };
            info(quality, None)
        }
        Some(_) if !succeeded => info(
            UsageQuality::Estimated,
            Some("AOAI bills the prompt of this refusal and reports no usage for it".to_owned()),
        ),
        Some(_) if cut.is_some() => info(UsageQuality::LowerBound, cut),
        Some(_) if tollgate_tokens::is_reasoning_model(model) => info(
            UsageQuality::LowerBound,
            Some(format!(
                "{model} bills reasoning tokens it never sends; only what was sent is counted"
            )),
        ),
        Some(_) => info(UsageQuality::Estimated, Some(estimate_reason(request, end))),
        None if end.is_none() => info(
            UsageQuality::Unknown,
            Some("no end record arrived and AOAI's usage was not in the segments".to_owned()),
        ),
        None if succeeded => info(
            UsageQuality::Unknown,
            Some("AOAI's answer carried no usage and could not be counted".to_owned()),
        ),
        None => None,
    }
}

/// Why a complete answer had to be counted.
fn estimate_reason(request: Option<&RequestRecord>, end: Option<&EndRecord>) -> String {
    let stream = request.is_some_and(|r| r.stream);
    let noted = |note: &str| {
        end.is_some_and(|e| e.attempts.iter().any(|a| a.error.as_deref() == Some(note)))
    };
    let rejected = noted(tollgate_records::STREAM_OPTIONS_REJECTED);
    if !stream {
        "AOAI's answer carried no usage".to_owned()
    } else if noted(tollgate_records::STREAM_OPTIONS_NOT_SENT) {
        "the backend is configured without include_usage, so the stream carried no usage".to_owned()
    } else if rejected {
        "the backend rejected stream_options, so the stream carried no usage".to_owned()
    } else if request.is_some_and(|r| r.stream_usage_injected) {
        "the usage frame the proxy asked for did not arrive".to_owned()
    } else {
        "a stream without include_usage where the proxy does not ask for it (api-version before 2024-09-01-preview, or proxy.stream_usage off)".to_owned()
    }
}

/// Whether AOAI bills the prompt of a request it answered with an error: a prompt its content
/// filter blocked (400 `content_filter`), one over the model's context length (400
/// `context_length_exceeded`; the prompt was tokenised to find that out), and a request AOAI
/// timed out on (408). Only AOAI's own answers count: a 408 the proxy sent when the client's
/// body stalled never reached a backend.
fn prompt_is_charged(end: Option<&EndRecord>, body: Option<&Value>) -> bool {
    let Some(end) = end else {
        return false;
    };
    let from_backend = end.error.is_none() && end.backend.is_some();
    let code = body
        .and_then(|b| b.pointer("/error/code"))
        .and_then(Value::as_str);
    match end.status {
        400 => matches!(code, Some("content_filter" | "context_length_exceeded")) && from_backend,
        408 => from_backend,
        _ => false,
    }
}

/// An error AOAI returned, summarised from its body.
fn upstream_error(end: &EndRecord, body: Option<&Value>) -> ErrorInfo {
    let err = body.and_then(|b| b.get("error"));
    let code = err
        .and_then(|e| e.get("code"))
        .map(|c| match c {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| end.status.to_string());
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| match &end.body {
            Body::Text { text, .. } => text.chars().take(512).collect(),
            _ => format!("HTTP {}", end.status),
        });
    ErrorInfo {
        source: ErrorSource::Upstream,
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tollgate_records::{AuthKind, Consumer as C, UsageSource};

    use super::*;

    fn parts(status: u16, response: Value) -> Parts {
        let request = RequestRecord {
            schema_version: SCHEMA_VERSION,
            request_id: "r".into(),
            time: chrono::Utc::now(),
            method: "POST".into(),
            path: "/openai/deployments/d/chat/completions".into(),
            query: None,
            deployment: Some("d".into()),
            api_version: Some("2024-10-21".into()),
            operation: "chat.completions".into(),
            stream: false,
            consumer: C {
                id: "c".into(),
                key_id: None,
                auth_kind: AuthKind::ApiKey,
                ..C::default()
            },
            client_ip: None,
            user_agent: None,
            headers: Default::default(),
            body: Body::json(&json!({"messages": [{"role": "user", "content": "secret plan"}]})),
            stream_usage_injected: false,
        };
        let end = EndRecord {
            price_multiplier: None,
            schema_version: SCHEMA_VERSION,
            request_id: "r".into(),
            seq: 1,
            time: chrono::Utc::now(),
            status,
            backend: Some("b".into()),
            attempts: vec![],
            ttfb_ms: Some(1.0),
            total_ms: 2.0,
            headers: Default::default(),
            content_type: Some("application/json".into()),
            body: Body::json(&response),
            client_disconnected: false,
            truncated: false,
            error: None,
            segments: 0,
            first_segment_seq: 1,
            response_bytes: 10,
        };
        Parts {
            request: Some(request),
            segments: BTreeMap::new(),
            end: Some(end),
            body_parts: BTreeMap::new(),
            raw_records: 2,
        }
    }

    static NO_MULTIPLIERS: BTreeMap<String, f64> = BTreeMap::new();

    /// An image given by URL is counted at a guessed size; an estimate that includes one says
    /// so.
    #[test]
    fn an_estimate_with_images_of_unknown_size_says_so() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let answer = json!({"id": "x", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0,
            "finish_reason": "stop", "message": {"role": "assistant", "content": "a cat"}}]});
        let mut p = parts(200, answer);
        if let Some(r) = p.request.as_mut() {
            r.body = Body::json(&json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}));
        }
        let r = consolidate(&p, &opts(&models, &prices, true)).unwrap();
        let q = r.usage_quality.unwrap();
        assert_eq!(q.quality, UsageQuality::Estimated);
        assert!(q.reason.unwrap().contains("1 image(s) of unknown size"));
    }

    /// A reasoning model's answer without AOAI's usage: what was sent is counted, but the
    /// reasoning it billed was never sent, so the figure is a lower bound, and says so.
    #[test]
    fn a_reasoning_models_counted_output_is_a_lower_bound() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let answer = |model: &str| {
            json!({"id": "x", "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "forty-two"}}]})
        };
        let r = consolidate(
            &parts(200, answer("o4-mini-2025-04-16")),
            &opts(&models, &prices, true),
        )
        .unwrap();
        assert_eq!(r.usage.unwrap().source, UsageSource::Estimated);
        let q = r.usage_quality.unwrap();
        assert_eq!(q.quality, UsageQuality::LowerBound);
        assert!(q.reason.unwrap().contains("reasoning"));
        let r = consolidate(
            &parts(200, answer("gpt-4o-2024-08-06")),
            &opts(&models, &prices, true),
        )
        .unwrap();
        assert_eq!(r.usage_quality.unwrap().quality, UsageQuality::Estimated);
    }

    /// A Data Zone deployment's 10% premium on the table's prices, exactly.
    #[test]
    fn a_deployment_price_multiplier_scales_every_part_of_the_cost() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let answer = json!({"id": "x", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0,
            "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}});
        let plain = consolidate(&parts(200, answer.clone()), &opts(&models, &prices, true))
            .unwrap()
            .cost
            .unwrap();
        // 1000 × 2,500 + 100 × 10,000 nano-dollars.
        assert_eq!(plain.total, Money::from_nanos(3_500_000));
        assert_eq!(plain.price_multiplier, None);
        let zone = BTreeMap::from([("d".to_owned(), 1.1)]);
        let o = Options {
            deployment_models: &models,
            deployment_price_multipliers: &zone,
            prices: &prices,
            store_content: true,
        };
        let c = consolidate(&parts(200, answer.clone()), &o)
            .unwrap()
            .cost
            .unwrap();
        assert_eq!(c.input, Money::from_nanos(2_750_000));
        assert_eq!(c.output, Money::from_nanos(1_100_000));
        assert_eq!(c.total, Money::from_nanos(3_850_000));
        assert_eq!(c.price_multiplier, Some(1.1));
        // The backend's factor, recorded in the `end`, wins over the deployment's.
        let mut p = parts(200, answer);
        if let Some(e) = p.end.as_mut() {
            e.price_multiplier = Some(0.5);
        }
        let c = consolidate(&p, &o).unwrap().cost.unwrap();
        assert_eq!(c.total, Money::from_nanos(1_750_000));
        assert_eq!(c.price_multiplier, Some(0.5));
    }

    fn opts<'a>(
        models: &'a BTreeMap<String, String>,
        prices: &'a PriceTable,
        content: bool,
    ) -> Options<'a> {
        Options {
            deployment_models: models,
            deployment_price_multipliers: &NO_MULTIPLIERS,
            prices,
            store_content: content,
        }
    }

    #[test]
    fn content_policy_drops_prompts_and_completions_but_keeps_usage() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let response = json!({"id": "x", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0,
            "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "the plan",
            "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}});
        let kept =
            consolidate(&parts(200, response.clone()), &opts(&models, &prices, true)).unwrap();
        assert_eq!(kept.choices[0].content.as_deref(), Some("the plan"));
        assert!(kept.prompt.is_some());
        let dropped = consolidate(&parts(200, response), &opts(&models, &prices, false)).unwrap();
        assert!(dropped.prompt.is_none());
        assert!(dropped.choices[0].content.is_none());
        assert_eq!(dropped.choices[0].tool_calls[0].arguments, "");
        assert_eq!(dropped.choices[0].tool_calls[0].name, "f", "metadata stays");
        let u = dropped.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.source),
            (9, 4, UsageSource::Reported)
        );
        assert!(dropped.cost.is_some());
    }

    /// Defect: a model with no price entry read as $0 in the store and the report.
    #[test]
    fn a_model_without_a_price_is_recorded_unpriced_not_free() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let answer = |model: &str| {
            json!({"id": "x", "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}})
        };
        let r = consolidate(
            &parts(200, answer("gpt-4-1106-preview")),
            &opts(&models, &prices, true),
        )
        .unwrap();
        assert!(r.usage.is_some() && r.cost.is_none() && r.unpriced);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["unpriced"], true);
        assert!(json.get("cost").is_none());

        let r = consolidate(
            &parts(200, answer("gpt-4o-2024-08-06")),
            &opts(&models, &prices, true),
        )
        .unwrap();
        assert!(r.cost.is_some() && !r.unpriced);
        assert!(serde_json::to_value(&r).unwrap().get("unpriced").is_none());
    }

    #[test]
    fn aoai_errors_are_summarised_and_model_falls_back_to_the_deployment_map() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::from([("d".to_owned(), "gpt-4o-2024-08-06".to_owned())]);
        let body = json!({"error": {"code": "content_filter", "message": "The prompt was filtered.", "param": "prompt"}});
        let r = consolidate(&parts(400, body), &opts(&models, &prices, true)).unwrap();
        let e = r.error.unwrap();
        assert_eq!(
            (e.code.as_str(), e.source),
            ("content_filter", ErrorSource::Upstream)
        );
        assert_eq!(e.message, "The prompt was filtered.");
        assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert!(r.complete);
        let u = r.usage.expect("a filtered prompt is charged");
        assert_eq!(u.source, UsageSource::Estimated);
        assert_eq!(u.output_tokens, 0);
        let body = json!({"messages": [{"role": "user", "content": "secret plan"}]});
        assert_eq!(
            u.input_tokens,
            tollgate_tokens::count_chat_prompt("gpt-4o-2024-08-06", &body)
        );

        // Over the context length: AOAI tokenised the prompt and bills it.
        let long = json!({"error": {"code": "context_length_exceeded", "message": "This model's maximum context length is 128000 tokens."}});
        let r = consolidate(&parts(400, long), &opts(&models, &prices, true)).unwrap();
        let u = r
            .usage
            .expect("a prompt over the context length is charged");
        assert_eq!((u.source, u.output_tokens), (UsageSource::Estimated, 0));
        assert!(u.input_tokens > 0);

        // AOAI timed out on the request: the prompt is billed.
        let timeout =
            json!({"error": {"code": "Timeout", "message": "The operation was timeout."}});
        let r = consolidate(&parts(408, timeout.clone()), &opts(&models, &prices, true)).unwrap();
        assert!(r.usage.is_some(), "AOAI's 408 is charged");
        // The proxy's own 408 (the client's body stalled) never reached AOAI.
        let mut own = parts(408, timeout);
        if let Some(end) = own.end.as_mut() {
            end.backend = None;
            end.error = Some(ErrorInfo {
                source: ErrorSource::Downstream,
                code: "RequestTimeout".into(),
                message: "body stalled".into(),
            });
        }
        let r = consolidate(&own, &opts(&models, &prices, true)).unwrap();
        assert!(r.usage.is_none(), "the proxy's own 408 is not charged");

        let other = json!({"error": {"code": "BadRequest", "message": "nope"}});
        let r = consolidate(&parts(400, other), &opts(&models, &prices, true)).unwrap();
        assert!(r.usage.is_none(), "other rejected requests are not charged");
    }

    /// Defect: Responses API streams got no usage and no cost (their usage is inside the
    /// `response.completed` event); bodies got no content.
    #[test]
    fn responses_api_answers_are_billed_with_their_usage() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let answer = json!({"id": "resp_1", "object": "response", "status": "completed",
            "model": "gpt-4o-2024-08-06",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi there"}]}],
            "usage": {"input_tokens": 20, "output_tokens": 3, "total_tokens": 23,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}});
        let as_responses = |p: &mut Parts| {
            if let Some(r) = p.request.as_mut() {
                r.operation = "responses".into();
                r.path = "/openai/v1/responses".into();
            }
        };
        // Non-stream.
        let mut p = parts(200, answer.clone());
        as_responses(&mut p);
        let r = consolidate(&p, &opts(&models, &prices, true)).unwrap();
        let u = r.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.source),
            (20, 3, UsageSource::Reported)
        );
        assert_eq!(r.choices[0].content.as_deref(), Some("Hi there"));
        // 20 × 2,500 + 3 × 10,000 nano-dollars.
        assert_eq!(r.cost.unwrap().total, Money::from_nanos(80_000));

        // Stream: the usage only in `response.completed`.
        let mut p = parts(200, json!({}));
        as_responses(&mut p);
        if let Some(r) = p.request.as_mut() {
            r.stream = true;
        }
        if let Some(e) = p.end.as_mut() {
            e.body = Body::Empty;
            e.content_type = Some("text/event-stream".into());
        }
        let events = [
            json!({"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress", "model": "gpt-4o-2024-08-06", "output": []}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}),
            json!({"type": "response.output_text.delta", "output_index": 0, "delta": " there"}),
            json!({"type": "response.completed", "response": answer}),
        ];
        let text: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
        p.segments.insert(1, text.into_bytes());
        let r = consolidate(&p, &opts(&models, &prices, true)).unwrap();
        let u = r.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.source),
            (20, 3, UsageSource::Reported)
        );
        assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(r.choices[0].content.as_deref(), Some("Hi there"));
        assert_eq!(r.cost.unwrap().total, Money::from_nanos(80_000));
    }

    /// Defect: a request whose `end` never arrived was consolidated with no usage and no cost,
    /// even when AOAI's usage frame was already stored in its segments.
    #[test]
    fn usage_in_segments_counts_without_an_end() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let mut p = parts(200, json!({}));
        p.end = None;
        if let Some(r) = p.request.as_mut() {
            r.stream = true;
        }
        let frames = concat!(
            "data: {\"id\":\"c\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n",
        );
        p.segments.insert(1, frames.as_bytes().to_vec());
        p.raw_records = 2;
        let r = consolidate(&p, &opts(&models, &prices, true)).unwrap();
        assert!(!r.complete);
        let u = r.usage.expect("AOAI's reported usage counts");
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.source),
            (11, 2, UsageSource::Reported)
        );
        assert!(r.cost.expect("priced").total > Money::ZERO);
        assert!(r.revision < tollgate_records::COMPLETE_REVISION);

        // Without AOAI's figures and without an end, nothing is guessed.
        p.segments.insert(
            1,
            frames
                .lines()
                .next()
                .unwrap_or_default()
                .as_bytes()
                .to_vec(),
        );
        let r = consolidate(&p, &opts(&models, &prices, true)).unwrap();
        assert!(r.usage.is_none());
    }

    /// A request body recorded in parts is joined again: the prompt is counted from it, and
    /// the request is incomplete until every part is here.
    #[test]
    fn a_body_recorded_in_parts_is_joined() {
        let prices = PriceTable::bundled().unwrap();
        let models = BTreeMap::new();
        let response = json!({"id": "x", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0,
            "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}]});
        let whole = parts(200, response.clone());
        let expected = consolidate(&whole, &opts(&models, &prices, true)).unwrap();
        let request = whole.request.clone().unwrap();
        let body = match &request.body {
            Body::Json { json } => json.as_str().as_bytes().to_vec(),
            other => panic!("{other:?}"),
        };
        let (stub, pieces) = tollgate_records::split_body("r", Some("application/json"), &body, 7);
        assert!(pieces.len() > 2);
        let mut split_request = request.clone();
        split_request.body = stub;
        let mut end = whole.end.clone().unwrap();
        end.seq = pieces.len() as u32 + 1;
        end.first_segment_seq = pieces.len() as u32 + 1;
        let mut records = vec![RawRecord::Request(split_request), RawRecord::End(end)];
        records.extend(pieces.iter().skip(1).cloned());
        let missing_one = Parts::from_records(records.clone());
        assert!(!missing_one.is_complete());
        records.push(pieces[0].clone());
        let joined = Parts::from_records(records);
        assert!(joined.is_complete());
        let r = consolidate(&joined, &opts(&models, &prices, true)).unwrap();
        assert_eq!(r.prompt, expected.prompt);
        assert_eq!(r.usage, expected.usage);
    }

    /// Defect: the parser built every non-stream body into a `Value`, an embeddings answer's
    /// thousands of floats included. Only the fields consolidation reads are kept.
    #[test]
    fn only_the_fields_read_are_built() {
        let floats: Vec<f64> = (0..1536).map(|i| f64::from(i) / 1e4).collect();
        let body = json!({"object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": floats}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}});
        let lean = lean_response(body.to_string().as_bytes()).unwrap();
        assert!(lean.get("data").is_none());
        assert_eq!(lean["usage"]["prompt_tokens"], 5);
        assert_eq!(lean["model"], "text-embedding-3-small");
        assert!(lean_response(b"not json").is_none());
    }
}
