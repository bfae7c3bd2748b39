//! Where a request goes: the operation and deployment from the path (or the body's `model` on
//! the v1 surface), and the `api-version` the deployment-scoped surface requires.

use serde_json::Value;

use crate::API_VERSIONS;
use crate::config::DeploymentKind;
use crate::error::AoaiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

impl Operation {
    /// AOAI's operation name, as its throttling and error messages spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Operation::Chat => "ChatCompletions_Create",
            Operation::Completions => "Completions_Create",
            Operation::Embeddings => "Embeddings_Create",
            Operation::Responses => "Responses_Create",
        }
    }

    /// The short name AOAI uses in `OperationNotSupported` and model-session headers.
    pub(crate) fn short(self) -> &'static str {
        match self {
            Operation::Chat => "chatCompletion",
            Operation::Completions => "completion",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    /// The kind of deployment that serves this operation.
    pub(crate) fn served_by(self) -> DeploymentKind {
        match self {
            Operation::Embeddings => DeploymentKind::Embeddings,
            Operation::Chat | Operation::Completions | Operation::Responses => DeploymentKind::Chat,
        }
    }
}

/// A recognised path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route<'a> {
    /// The deployment named in the path; `None` on the v1 surface, where the body names it.
    pub(crate) deployment: Option<&'a str>,
    pub(crate) op: Operation,
    pub(crate) v1: bool,
}

pub(crate) fn route(path: &str) -> Option<Route<'_>> {
    let op = |rest: &str| match rest {
        "chat/completions" => Some(Operation::Chat),
        "completions" => Some(Operation::Completions),
        "embeddings" => Some(Operation::Embeddings),
        "responses" => Some(Operation::Responses),
        _ => None,
    };
    // The Responses API's preview path, with an api-version and the model in the body.
    if path == "/openai/responses" {
        return Some(Route {
            deployment: None,
            op: Operation::Responses,
            v1: false,
        });
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (deployment, rest) = rest.split_once('/')?;
        return Some(Route {
            deployment: Some(deployment),
            op: op(rest)?,
            v1: false,
        });
    }
    let rest = path.strip_prefix("/openai/v1/")?;
    Some(Route {
        deployment: None,
        op: op(rest)?,
        v1: true,
    })
}

/// The request's API version: required and checked on deployment-scoped routes, optional
/// (checked when present) on v1, where its absence reads as `v1`.
pub(crate) fn api_version(query: Option<&str>, v1: bool) -> Result<String, AoaiError> {
    match (query_param(query, "api-version"), v1) {
        (None, false) => Err(AoaiError::resource_not_found()),
        (Some(v), _) if !API_VERSIONS.contains(&v) => Err(AoaiError::api_version_not_supported()),
        (v, _) => Ok(v.unwrap_or("v1").to_owned()),
    }
}

/// Whether an api-version knows `stream_options`: from 2024-09-01-preview on in the list of
/// versions, and the undated ones (`preview`, `latest`, v1). Earlier ones answer 400.
pub(crate) fn knows_stream_options(api_version: &str) -> bool {
    let first = API_VERSIONS.iter().position(|v| *v == "2024-09-01-preview");
    match (API_VERSIONS.iter().position(|v| *v == api_version), first) {
        (Some(i), Some(first)) => i >= first,
        // Not in the list: `v1` (no api-version on a v1 path).
        _ => true,
    }
}

/// The deployment the request addresses: from the path, or the body's `model` on v1.
pub(crate) fn deployment_name(route: &Route<'_>, body: &Value) -> Result<String, AoaiError> {
    match route.deployment {
        Some(d) => Ok(d.to_owned()),
        None => body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                AoaiError::invalid_request("'model' is a required property", Some("model"))
            }),
    }
}

/// The value of `name` in a query string, as sent.
pub(crate) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_surfaces_route() {
        assert_eq!(
            route("/openai/deployments/d/chat/completions"),
            Some(Route {
                deployment: Some("d"),
                op: Operation::Chat,
                v1: false
            })
        );
        assert_eq!(
            route("/openai/v1/embeddings"),
            Some(Route {
                deployment: None,
                op: Operation::Embeddings,
                v1: true
            })
        );
        assert_eq!(
            route("/openai/responses").map(|r| (r.op, r.deployment)),
            Some((Operation::Responses, None))
        );
        assert_eq!(
            route("/openai/v1/responses").map(|r| r.op),
            Some(Operation::Responses)
        );
        assert_eq!(route("/openai/deployments/d"), None);
        assert_eq!(route("/openai/deployments/d/other"), None);
        assert_eq!(route("/elsewhere"), None);
    }

    #[test]
    fn stream_options_are_known_from_2024_09_01_preview() {
        for v in [
            "2024-09-01-preview",
            "2024-10-21",
            "2025-04-01-preview",
            "preview",
            "v1",
        ] {
            assert!(knows_stream_options(v), "{v}");
        }
        for v in ["2024-08-01-preview", "2024-06-01", "2023-05-15"] {
            assert!(!knows_stream_options(v), "{v}");
        }
    }

    #[test]
    fn api_version_is_required_only_off_v1() {
        assert!(api_version(None, false).is_err());
        assert_eq!(api_version(None, true).ok().as_deref(), Some("v1"));
        assert_eq!(
            api_version(Some("a=1&api-version=2024-10-21"), false)
                .ok()
                .as_deref(),
            Some("2024-10-21")
        );
        assert!(api_version(Some("api-version=1999-01-01"), true).is_err());
    }
}
