//! AOAI's error responses, as the service sends them.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct AoaiError {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after_ms: Option<u64>,
}

impl AoaiError {
    fn new(status: StatusCode, body: Value) -> Self {
        AoaiError {
            status,
            body,
            retry_after_ms: None,
        }
    }

    /// An error with its status and body as given.
    pub(crate) fn status_body(status: StatusCode, body: Value) -> Self {
        Self::new(status, body)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
        )
    }

    /// A key sent to a resource with `disableLocalAuth`.
    pub fn key_auth_disabled() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            json!({"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this resource."}}),
        )
    }

    /// A Bearer token that is missing where one is required, or has expired.
    pub fn token_invalid() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": "401", "message": "Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}}),
        )
    }

    pub fn resource_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "404", "message": "Resource not found"}}),
        )
    }

    pub fn api_version_not_supported() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": "BadRequest", "message": "API version not supported"}}),
        )
    }

    pub fn deployment_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}),
        )
    }

    pub fn operation_not_supported(operation: &str, model: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": "OperationNotSupported", "message": format!("The {operation} operation does not work with the specified model, {model}. Please choose different model and try again. You can learn more about which models can be used with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993.")}}),
        )
    }

    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": message.into(), "type": "invalid_request_error", "param": param, "code": null}}),
        )
    }

    /// A body parameter the requested api-version does not know (`stream_options` before
    /// 2024-09-01-preview).
    pub fn unknown_parameter(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": format!("Unrecognized request argument supplied: {param}"), "type": "invalid_request_error", "param": param, "code": "unknown_parameter"}}),
        )
    }

    /// A prompt over the model's context window (AOAI tokenised it, and bills it).
    pub fn context_length_exceeded(window: usize, prompt_tokens: u64) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": format!("This model's maximum context length is {window} tokens. However, your messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages."), "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        )
    }

    /// A prompt blocked by the content filter (charged by AOAI, answered 400).
    pub fn prompt_filtered() -> Self {
        let flagged = json!({"filtered": true, "severity": "high"});
        let safe = json!({"filtered": false, "severity": "safe"});
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766", "type": null, "param": "prompt", "code": "content_filter", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    "hate": safe, "jailbreak": {"filtered": false, "detected": false},
                    "self_harm": safe, "sexual": safe, "violence": flagged}}}}),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": {"code": "RequestEntityTooLarge", "message": format!("The request body is larger than {limit} bytes.")}}),
        )
    }

    pub fn rate_limited(operation: &str, api_version: &str, retry_after_ms: u64) -> Self {
        let secs = retry_after_ms.div_ceil(1000).max(1);
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": {"code": "429", "message": format!("Requests to the {operation} Operation under Azure OpenAI API version {api_version} have exceeded token rate limit of your current AIServices S0 pricing tier. Please retry after {secs} second{}. Please contact Azure support service if you would like to further increase the default rate limit.", if secs == 1 { "" } else { "s" })}}),
        );
        e.retry_after_ms = Some(retry_after_ms);
        e
    }

    /// The error AOAI answers with for an injected status code.
    pub fn for_status(
        status: u16,
        operation: &str,
        api_version: &str,
        retry_after_ms: u64,
    ) -> Self {
        match status {
            429 => Self::rate_limited(operation, api_version, retry_after_ms),
            401 => Self::unauthorized(),
            404 => Self::deployment_not_found(),
            400 => Self::invalid_request("Invalid request (injected fault).", None),
            // AOAI gave up on the request (billed: the prompt was processed).
            408 => Self::new(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": {"code": "Timeout", "message": "The operation was timeout."}}),
            ),
            s => {
                let code = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut e = Self::new(
                    code,
                    json!({"error": {"code": if s == 503 { "ServiceUnavailable" } else { "InternalServerError" }, "message": "The server had an error while processing your request. Sorry about that!", "type": "server_error", "param": null}}),
                );
                if s == 503 {
                    e.retry_after_ms = Some(retry_after_ms);
                }
                e
            }
        }
    }
}

impl IntoResponse for AoaiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
                h.insert("retry-after-ms", v);
            }
            if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string()) {
                h.insert("retry-after", v);
            }
        }
        resp
    }
}
