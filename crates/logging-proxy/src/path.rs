//! The `/openai/…` path as Tollgate understands it, and the upstream URL built from it.
//!
//! Only canonical paths are accepted: every segment non-empty and made of URL-unreserved
//! characters (`A–Z a–z 0–9 - . _ ~`, plus `:` for AOAI's action suffixes), never `.` or `..`,
//! no percent-escapes and no backslashes. Anything else is a 400. The upstream URL is then built
//! from these validated segments, never by pasting the client's text onto the endpoint, so
//! nothing the URL library would resolve (`..`, `%2e%2e`, `\`) can reach another path on the
//! backend's origin with the backend's key while the records name an allowed deployment.

/// The parsed path of a proxied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The segments after the leading `/`, validated.
    pub segments: Vec<String>,
    pub deployment: Option<String>,
    /// `chat.completions`, `embeddings`, `files`, …
    pub operation: String,
    /// The v1 surface names the deployment in the body's `model`.
    pub v1: bool,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathError {
    /// Not under `/openai/`: not ours to serve.
    NotFound,
    /// Under `/openai/` but not canonical.
    NotCanonical,
}

fn segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':'))
}

/// Operations that name a model: without a deployment in the path, their body's `model`
/// picks the deployment.
const MODEL_BOUND: &[&str] = &[
    "chat.completions",
    "completions",
    "embeddings",
    "responses",
    "images.generations",
    "images.edits",
    "audio.transcriptions",
    "audio.translations",
    "audio.speech",
];

impl Route {
    /// Whether the body's `model` names the deployment: a model-bound operation on a path
    /// without one (the v1 surface, and the Responses API at `/openai/responses`).
    pub(crate) fn body_names_deployment(&self) -> bool {
        self.deployment.is_none() && MODEL_BOUND.contains(&self.operation.as_str())
    }
}

pub(crate) fn parse(path: &str) -> Result<Route, PathError> {
    let Some(rest) = path.strip_prefix("/openai/") else {
        return Err(PathError::NotFound);
    };
    let tail: Vec<&str> = rest.split('/').collect();
    if !tail.iter().all(|s| segment_ok(s)) {
        return Err(PathError::NotCanonical);
    }
    let op_name = |ops: &[&str]| ops.join(".");
    let (deployment, operation, v1) = match tail.as_slice() {
        ["deployments", deployment, op @ ..] => {
            (Some((*deployment).to_owned()), op_name(op), false)
        }
        ["v1", op @ ..] => (None, op_name(op), true),
        op => (None, op_name(op), false),
    };
    let mut segments = Vec::with_capacity(tail.len() + 1);
    segments.push("openai".to_owned());
    segments.extend(tail.iter().map(|s| (*s).to_owned()));
    Ok(Route {
        segments,
        deployment,
        operation,
        v1,
    })
}

/// Query parameters that carry credentials: never recorded in clear and never forwarded (the
/// backend gets its own credential from the configuration).
const SECRET_QUERY_PARAMS: &[&str] = &[
    "api-key",
    "subscription-key",
    "ocp-apim-subscription-key",
    "key",
    "sig",
    "access_token",
    "token",
];

/// A query parameter's name as the server reading it sees it: percent-escapes and `+`
/// decoded, so `api%2Dkey` is `api-key`.
fn decoded_name(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).trim().to_owned()
}

fn is_secret_param(pair: &str) -> bool {
    let name = decoded_name(pair.split_once('=').map_or(pair, |(k, _)| k));
    SECRET_QUERY_PARAMS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(&name))
}

/// The query with credential parameters replaced by `[redacted]`, for the records.
pub(crate) fn redacted_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            if is_secret_param(pair) {
                let name = pair.split_once('=').map_or(pair, |(k, _)| k);
                format!("{name}=[redacted]")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The query to forward: credential parameters dropped, the rest as the client sent it.
pub(crate) fn forwarded_query(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_secret_param(p))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The value of `name` in a query string, as sent; names compare as the server reading them
/// does (decoded, any case).
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        decoded_name(k).eq_ignore_ascii_case(name).then_some(v)
    })
}

/// `endpoint` (validated at config time) + the route's segments + the forwarded query.
pub(crate) fn upstream_url(
    endpoint: &reqwest::Url,
    route: &Route,
    query: Option<&str>,
    names: &std::collections::HashMap<String, String>,
) -> reqwest::Url {
    let mut url = endpoint.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for (i, segment) in route.segments.iter().enumerate() {
            // `/openai/deployments/{name}/…`: the backend's own name for the deployment.
            let renamed = (i == 2 && route.segments.get(1).is_some_and(|s| s == "deployments"))
                .then(|| names.get(segment))
                .flatten();
            path.push(renamed.unwrap_or(segment));
        }
    }
    url.set_query(query.and_then(forwarded_query).as_deref());
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse("/openai/deployments/gpt-4o/chat/completions").unwrap();
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(r.operation, "chat.completions");
        let r = parse("/openai/v1/embeddings").unwrap();
        assert!(r.v1);
        assert_eq!(r.operation, "embeddings");
        assert!(r.body_names_deployment());
        let r = parse("/openai/responses").unwrap();
        assert!(
            r.body_names_deployment(),
            "the Responses API names its deployment in `model`"
        );
        let r = parse("/openai/v1/fine_tuning/jobs").unwrap();
        assert!(
            !r.body_names_deployment(),
            "a base model is not a deployment"
        );
        let r = parse("/openai/deployments/gpt-4o/chat/completions").unwrap();
        assert!(!r.body_names_deployment());
        let r = parse("/openai/files").unwrap();
        assert_eq!((r.deployment, r.operation.as_str()), (None, "files"));
        assert_eq!(parse("/other"), Err(PathError::NotFound));
    }

    /// Defect: `url` resolves `..`, `%2e%2e` and `\`, so these reached other paths on the
    /// backend's origin with the backend's key.
    #[test]
    fn every_traversal_spelling_is_refused() {
        for path in [
            "/openai/deployments/gpt-4o/../../other/x",
            "/openai/deployments/gpt-4o/%2e%2e/%2e%2e/other/x",
            "/openai/deployments/gpt-4o/%2E%2E/x",
            "/openai/deployments/gpt-4o/.%2e/x",
            "/openai/deployments/gpt-4o/%2e./x",
            "/openai/deployments/gpt-4o/..\\..\\other",
            "/openai/deployments/gpt-4o/%5c..%5cother",
            "/openai/deployments/gpt-4o/./chat/completions",
            "/openai/deployments/gpt-4o//chat/completions",
            "/openai/deployments/gpt-4o/chat/completions/",
            "/openai/deployments/gpt-4o%2fchat/completions",
            "/openai/deployments/gpt 4o/chat/completions",
            "/openai/..",
            "/openai/",
        ] {
            assert_eq!(parse(path), Err(PathError::NotCanonical), "{path}");
        }
    }

    #[test]
    fn upstream_url_is_endpoint_plus_segments() {
        let endpoint = reqwest::Url::parse("https://res.openai.azure.com/base/").unwrap();
        let r = parse("/openai/deployments/gpt-4o/chat/completions").unwrap();
        let none = std::collections::HashMap::new();
        let url = upstream_url(
            &endpoint,
            &r,
            Some("api-version=2024-10-21&api-key=secret"),
            &none,
        );
        assert_eq!(
            url.as_str(),
            "https://res.openai.azure.com/base/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        let endpoint = reqwest::Url::parse("http://127.0.0.1:9").unwrap();
        let url = upstream_url(&endpoint, &r, None, &none);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/openai/deployments/gpt-4o/chat/completions"
        );
        // The backend's own name for a deployment, where it differs.
        let names = std::collections::HashMap::from([("gpt-4o".into(), "gpt-4o-ptu".into())]);
        let url = upstream_url(&endpoint, &r, None, &names);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/openai/deployments/gpt-4o-ptu/chat/completions"
        );
    }

    #[test]
    fn credentials_in_the_query_are_redacted_and_not_forwarded() {
        let q = "api-version=1&api-key=s3cret&Subscription-Key=k2&x=1";
        let r = redacted_query(q);
        assert!(!r.contains("s3cret") && !r.contains("k2"), "{r}");
        assert_eq!(
            r,
            "api-version=1&api-key=[redacted]&Subscription-Key=[redacted]&x=1"
        );
        assert_eq!(forwarded_query(q).as_deref(), Some("api-version=1&x=1"));
        assert_eq!(forwarded_query("api-key=x"), None);
        // Servers decode parameter names: an escaped name is the same credential.
        let escaped = "api-version=1&api%2Dkey=s3cret&api%2dKEY=s3cret&%61pi-key=s3cret";
        assert!(!redacted_query(escaped).contains("s3cret"));
        assert_eq!(forwarded_query(escaped).as_deref(), Some("api-version=1"));
        assert_eq!(decoded_name("a%2"), "a%2");
        assert_eq!(query_param(q, "api-version"), Some("1"));
        assert_eq!(query_param("API-Version=2&x=1", "api-version"), Some("2"));
    }
}
