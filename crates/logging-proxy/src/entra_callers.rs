//! Entra ID callers: `Authorization: Bearer <JWT>` validated as an Entra ID access token and
//! mapped to a consumer by its claims, so apps and users with an identity need no Tollgate key
//! (what APIM's `validate-jwt` does).
//!
//! - **Tenant first**: the unverified `tid` must be a configured tenant; its OpenID
//!   configuration (`{authority_host}/{tid}/v2.0/.well-known/openid-configuration`) names the
//!   JWKS. A token from another tenant is refused before anything is fetched.
//! - **Signature** from the tenant's JWKS, cached; an unknown `kid` refreshes it, at most once
//!   per `jwks_min_refresh_s` per tenant (a stream of made-up `kid`s cannot make Tollgate hammer
//!   Entra). Only the allowed algorithms (RS256 by default): `none` and HMAC never verify.
//! - **Claims**: issuer (`{authority_host}/{tid}/v2.0`, or v1's `https://sts.windows.net/{tid}/`),
//!   audience (one of `audiences`), `exp` and `nbf` with `clock_skew_s`.
//! - **Mapping**: the first rule whose claim (`appid`, `azp`, `oid`, `sub`, `tid`, or a value
//!   of `roles` / `groups`) equals its value names the consumer; otherwise `default_consumer`;
//!   otherwise the valid token is refused (403). The record keeps the caller's `oid` (else
//!   `sub`) and app id, never the token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tollgate_records::{AuthKind, Consumer};

/// `[proxy.entra_callers]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EntraCallersConfig {
    /// Tenant ids whose tokens are accepted; none: Entra ID callers are off.
    pub tenants: Vec<String>,
    /// Accepted `aud` values: the Tollgate app registration's application id URI and client id.
    pub audiences: Vec<String>,
    /// `https://login.microsoftonline.com`; another cloud's (or a test's) authority.
    pub authority_host: String,
    /// Algorithms a token may be signed with.
    pub algorithms: Vec<Algorithm>,
    pub clock_skew_s: u64,
    /// Least time between two JWKS fetches of one tenant.
    pub jwks_min_refresh_s: u64,
    /// Claims → consumer, first match wins.
    pub rules: Vec<CallerRule>,
    /// The consumer of a valid token no rule maps; refused when absent.
    pub default_consumer: Option<String>,
}

impl Default for EntraCallersConfig {
    fn default() -> Self {
        EntraCallersConfig {
            tenants: Vec::new(),
            audiences: Vec::new(),
            authority_host: "https://login.microsoftonline.com".into(),
            algorithms: vec![Algorithm::RS256],
            clock_skew_s: 60,
            jwks_min_refresh_s: 60,
            rules: Vec::new(),
            default_consumer: None,
        }
    }
}

/// One mapping rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerRule {
    /// `appid`, `azp`, `oid`, `sub`, `tid`, `roles` or `groups`.
    pub claim: String,
    pub value: String,
    pub consumer: String,
}

const RULE_CLAIMS: &[&str] = &["appid", "azp", "oid", "sub", "tid", "roles", "groups"];

impl EntraCallersConfig {
    pub(crate) fn enabled(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// What is wrong with it, given the consumer ids that exist.
    pub(crate) fn problems(&self, consumers: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        if !self.enabled() {
            return out;
        }
        if self.audiences.is_empty() {
            out.push("proxy.entra_callers: audiences is empty".to_owned());
        }
        if self
            .algorithms
            .iter()
            .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            out.push(
                "proxy.entra_callers.algorithms: HMAC algorithms cannot verify Entra ID tokens"
                    .to_owned(),
            );
        }
        for r in &self.rules {
            if !RULE_CLAIMS.contains(&r.claim.as_str()) {
                out.push(format!(
                    "proxy.entra_callers.rules: claim `{}` is not one of {}",
                    r.claim,
                    RULE_CLAIMS.join(", ")
                ));
            }
        }
        for c in self
            .rules
            .iter()
            .map(|r| &r.consumer)
            .chain(self.default_consumer.iter())
        {
            // A rule may name a consumer the registry holds (checked per request); one the
            // file does not declare must at least be an id the registry could hold.
            if !consumers.contains(&c.as_str()) && !tollgate_store::valid_consumer_id(c) {
                out.push(format!(
                    "proxy.entra_callers: consumer `{c}` is neither a configured consumer nor a valid registry id"
                ));
            }
        }
        out
    }
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Not a valid token for us (401); the reason is for the record.
    Invalid(String),
    /// Valid, but no rule maps it and there is no default consumer (403).
    Unmapped,
}

/// Validates caller tokens; keeps each tenant's JWKS.
pub(crate) struct Callers {
    config: EntraCallersConfig,
    http: reqwest::Client,
    /// Each tenant's signing keys, read by every request; never held across a fetch.
    keys: Mutex<HashMap<String, JwkSet>>,
    /// Held by the one request fetching a JWKS: a token with a key not yet known waits for the
    /// fetch under way; a token with a known key never does.
    fetching: tokio::sync::Mutex<()>,
    /// Last JWKS fetch attempt per tenant (success or not), for the refresh bound.
    tried: Mutex<HashMap<String, Instant>>,
}

impl Callers {
    pub(crate) fn new(config: EntraCallersConfig, http: reqwest::Client) -> Callers {
        Callers {
            config,
            http,
            keys: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            tried: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// The consumer of a valid token.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Consumer, Rejected> {
        let claims = self.validate(token).await?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        let id = self
            .config
            .rules
            .iter()
            .find(|r| match claims.get(&r.claim) {
                Some(Value::String(v)) => *v == r.value,
                Some(Value::Array(vs)) => vs.iter().any(|v| v.as_str() == Some(&r.value)),
                _ => false,
            })
            .map(|r| r.consumer.clone())
            .or_else(|| self.config.default_consumer.clone())
            .ok_or(Rejected::Unmapped)?;
        Ok(Consumer {
            id,
            key_id: None,
            auth_kind: AuthKind::EntraId,
            subject: text("oid").or_else(|| text("sub")),
            app_id: text("appid").or_else(|| text("azp")),
        })
    }

    /// The claims of a token valid for the configured tenants and audiences.
    pub(crate) async fn validate(&self, token: &str) -> Result<Value, Rejected> {
        let invalid = |why: &str| Rejected::Invalid(why.to_owned());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("not a JWT"))?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(invalid("algorithm not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("no kid"))?;
        let tid = unverified_claim(token, "tid").ok_or_else(|| invalid("no tid"))?;
        if !self.config.tenants.contains(&tid) {
            return Err(invalid("tenant not accepted"));
        }
        let key = self.key(&tid, &kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.config.clock_skew_s;
        validation.validate_nbf = true;
        validation.set_audience(&self.config.audiences);
        let host = self.config.authority_host.trim_end_matches('/');
        validation.set_issuer(&[
            format!("{host}/{tid}/v2.0"),
            format!("https://sts.windows.net/{tid}/"),
        ]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| Rejected::Invalid(format!("{:?}", e.kind())))?;
        Ok(data.claims)
    }

    /// The key `kid` of tenant `tid`: from the cache, else from a fresh JWKS when the refresh
    /// bound allows one.
    async fn key(&self, tid: &str, kid: &str) -> Result<DecodingKey, Rejected> {
        if let Some(known) = self.known(tid, kid) {
            return known;
        }
        let _fetching = self.fetching.lock().await;
        // Another request may have fetched the keys while this one waited.
        if let Some(known) = self.known(tid, kid) {
            return known;
        }
        let bound = Duration::from_secs(self.config.jwks_min_refresh_s);
        let recently = {
            let tried = self
                .tried
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tried.get(tid).is_some_and(|t| t.elapsed() < bound)
        };
        if recently {
            return Err(Rejected::Invalid("unknown kid".into()));
        }
        self.tried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tid.to_owned(), Instant::now());
        let set = self.fetch(tid).await.map_err(|e| {
            tracing::warn!(tenant = tid, error = %e, "The tenant's signing keys could not be fetched.");
            Rejected::Invalid("signing keys unavailable".into())
        })?;
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tid.to_owned(), set);
        self.known(tid, kid)
            .unwrap_or_else(|| Err(Rejected::Invalid("unknown kid".into())))
    }

    /// Key `kid` of tenant `tid` from the cached keys, if they have it.
    fn known(&self, tid: &str, kid: &str) -> Option<Result<DecodingKey, Rejected>> {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let jwk = keys.get(tid)?.find(kid)?;
        Some(
            DecodingKey::from_jwk(jwk)
                .map_err(|_| Rejected::Invalid("unusable signing key".into())),
        )
    }

    async fn fetch(&self, tid: &str) -> Result<JwkSet, String> {
        let host = self.config.authority_host.trim_end_matches('/');
        let config_url = format!("{host}/{tid}/v2.0/.well-known/openid-configuration");
        let get = |url: String| {
            let http = self.http.clone();
            async move {
                http.get(url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| e.to_string())?
                    .json::<Value>()
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let openid = get(config_url).await?;
        let jwks_uri = openid
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("the OpenID configuration names no jwks_uri")?;
        let jwks = get(jwks_uri.to_owned()).await?;
        serde_json::from_value(jwks).map_err(|e| e.to_string())
    }
}

/// A claim read without verifying the token: only to pick the tenant whose keys verify it.
fn unverified_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_known_claims_and_consumers() {
        let config = EntraCallersConfig {
            tenants: vec!["t".into()],
            audiences: vec![],
            algorithms: vec![Algorithm::HS256],
            rules: vec![CallerRule {
                claim: "email".into(),
                value: "x".into(),
                consumer: "gh/ost".into(),
            }],
            ..EntraCallersConfig::default()
        };
        let problems = config.problems(&["team-a"]);
        for expected in ["audiences", "HMAC", "`email`", "`gh/ost`"] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_token_from_another_tenant_is_refused_before_any_fetch() {
        let callers = Callers::new(
            EntraCallersConfig {
                tenants: vec!["mine".into()],
                audiences: vec!["api://tollgate".into()],
                authority_host: "http://127.0.0.1:9".into(),
                ..EntraCallersConfig::default()
            },
            reqwest::Client::new(),
        );
        use base64::Engine as _;
        let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.sig",
            enc(serde_json::json!({"alg": "RS256", "kid": "k"})),
            enc(serde_json::json!({"tid": "theirs"}))
        );
        assert_eq!(
            callers.authenticate(&token).await,
            Err(Rejected::Invalid("tenant not accepted".into()))
        );
        assert!(callers.tried.lock().unwrap().is_empty(), "nothing fetched");
    }
}
