//! `tollgate check`'s look at each backend: one request per backend and deployment that AOAI
//! answers without generating anything. A chat completions call with an empty `messages` list
//! is authenticated and routed to its deployment before the body is validated, so the answer
//! tells what is wrong: 401/403 the credential (a key refused, local auth disabled, a token
//! without the role), 404 the deployment (or the endpoint), 400 means both are right (the empty
//! list, or an embeddings deployment refusing chat). A 400 is not billed.

use std::time::Duration;

use serde::Serialize;

use crate::ProxyBuildError;
use crate::config::ProxyConfig;
use crate::path;

/// The api-version of the probe: generally available, and known to every AOAI resource.
const PROBE_API_VERSION: &str = "api-version=2024-10-21";

/// Longest a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one probe found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub backend: String,
    /// The deployment as clients call it.
    pub deployment: String,
    pub ok: bool,
    /// The status the backend answered with, when it answered.
    pub status: Option<u16>,
    /// What the answer means.
    pub finding: String,
}

/// Probes every backend's every deployment, one request each, in configuration order.
pub async fn probe_backends(config: &ProxyConfig) -> Result<Vec<Probe>, ProxyBuildError> {
    let validated = config.validate().map_err(ProxyBuildError::Config)?;
    let client = validated
        .fixed
        .backend_client()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|e| ProxyBuildError::Client(e.to_string()))?;
    let mut probes = Vec::new();
    for (b, config) in validated.live.backends.iter().zip(&config.backends) {
        for deployment in &config.deployments {
            // The path a client calls, turned into the backend's URL as a request's is
            // (its own name for the deployment included).
            let called = path::parse(&format!(
                "/openai/deployments/{deployment}/chat/completions"
            ));
            let (ok, status, finding) = match (called, b.auth.header().await) {
                (Err(_), _) => (
                    false,
                    None,
                    "not a deployment name a path can carry".to_owned(),
                ),
                (_, Err(e)) => (false, None, format!("no credential: {e}")),
                (Ok(route), Ok(header)) => {
                    let url = path::upstream_url(
                        &b.endpoint,
                        &route,
                        Some(PROBE_API_VERSION),
                        &b.deployment_names,
                    );
                    let mut request = client.post(url).json(&serde_json::json!({"messages": []}));
                    if let Some((name, value)) = header {
                        request = request.header(name, value);
                    }
                    match request.send().await {
                        Err(e) => (false, None, format!("unreachable: {e}")),
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let (ok, finding) = meaning(status);
                            (ok, Some(status), finding.to_owned())
                        }
                    }
                }
            };
            probes.push(Probe {
                backend: b.name.clone(),
                deployment: deployment.clone(),
                ok,
                status,
                finding,
            });
        }
    }
    Ok(probes)
}

fn meaning(status: u16) -> (bool, &'static str) {
    match status {
        400 | 200 => (true, "reachable, credential accepted, deployment exists"),
        429 => (
            true,
            "reachable and throttled now (credential and deployment accepted)",
        ),
        401 | 403 => (false, "credential refused"),
        404 => (false, "deployment (or endpoint) not found"),
        500..=599 => (false, "the backend is failing"),
        _ => (false, "unexpected answer"),
    }
}
