//! How Tollgate authenticates to a backend: an `api-key` read once at start, or an Entra ID
//! token (scope `https://cognitiveservices.azure.com/.default`) from `azure_identity`, so no
//! AOAI key need be stored anywhere.
//!
//! Tokens are cached per identity, not per backend or request: every backend configured with
//! the same identity shares one [`EntraToken`], and one fetch serves every request until the
//! token nears expiry. A token is refreshed once less than [`REFRESH_AHEAD`] of it is left, by
//! the one request that finds it so (the others go on with the current token, which is still
//! good); requests wait only when there is no usable token at all (the first request, or after
//! refreshes failed until it expired). No fetch follows another within [`REFETCH_AFTER`],
//! failed or not, so an identity endpoint that is down, or one that hands out tokens already
//! near expiry, is not hammered by every request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderName, HeaderValue, header};
use azure_core::credentials::TokenCredential;
use azure_identity::{
    ClientSecretCredential, DeveloperToolsCredential, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The scope of Azure OpenAI's data plane in the public cloud.
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// A token with less than this left is refreshed. `azure_identity`'s own caches refresh 300 s
/// ahead, so asking it any sooner would only return the same token.
pub(crate) const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// A token with less than this left is not sent: it could expire before AOAI checks it.
const USABLE_MARGIN: Duration = Duration::from_secs(15);

/// After a fetch, requests go on with the token they have (or fail fast after a failure) for
/// this long before another fetch.
const REFETCH_AFTER: Duration = Duration::from_secs(5);

/// Longest a token fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Which Entra ID identity Tollgate uses towards a backend (`entra` in a backend's section).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    pub kind: EntraKind,
    /// The user-assigned managed identity, or the app registration (workload identity and
    /// client secret; workload identity defaults to `AZURE_CLIENT_ID`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Client secret: required; workload identity: defaults to `AZURE_TENANT_ID`.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Client secret only: the variable or the file (a mounted Key Vault secret) holding it.
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Another cloud's scope (Azure Government: `https://cognitiveservices.azure.us/.default`).
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_scope() -> String {
    COGNITIVE_SERVICES_SCOPE.to_owned()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EntraKind {
    /// The host's managed identity (Container Apps and App Service through `IDENTITY_ENDPOINT`
    /// and `IDENTITY_HEADER`, a VM through IMDS): system-assigned, or user-assigned with
    /// `client_id`.
    ManagedIdentity,
    /// AKS workload identity (`AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity,
    /// An app registration's client secret.
    ClientSecret,
    /// A developer's own login (`az login`, `azd auth login`), for running locally.
    DeveloperTools,
}

/// The credential a backend gets.
#[derive(Clone, Default)]
pub(crate) enum BackendAuth {
    /// Nothing added (a backend that needs no key, such as a local simulator).
    #[default]
    None,
    /// Sent as `api-key`; marked sensitive so no HTTP log shows it.
    ApiKey(HeaderValue),
    Entra(Arc<EntraToken>),
}

impl std::fmt::Debug for BackendAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendAuth::None => "None",
            BackendAuth::ApiKey(_) => "ApiKey([redacted])",
            BackendAuth::Entra(_) => "Entra",
        })
    }
}

impl BackendAuth {
    /// The header to send, or why there is none (Entra ID only: the token could not be had).
    pub(crate) async fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, String> {
        match self {
            BackendAuth::None => Ok(None),
            BackendAuth::ApiKey(v) => Ok(Some((HeaderName::from_static("api-key"), v.clone()))),
            BackendAuth::Entra(t) => t.header().await.map(|v| Some((header::AUTHORIZATION, v))),
        }
    }

    pub(crate) fn api_key(key: &SecretString) -> Option<BackendAuth> {
        let mut v = HeaderValue::from_str(key.expose_secret()).ok()?;
        v.set_sensitive(true);
        Some(BackendAuth::ApiKey(v))
    }
}

/// One identity's token for one scope, cached and refreshed ahead of expiry.
pub(crate) struct EntraToken {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    current: RwLock<Option<Cached>>,
    /// Held by the one request fetching; holds the last fetch's time and, when it failed, why.
    fetching: tokio::sync::Mutex<Option<LastFetch>>,
    fetches: AtomicU64,
    config: Option<EntraConfig>,
}

struct LastFetch {
    at: SystemTime,
    failure: Option<String>,
}

impl LastFetch {
    fn recent(&self, now: SystemTime) -> bool {
        now.duration_since(self.at).unwrap_or(Duration::ZERO) < REFETCH_AFTER
    }
}

#[derive(Clone)]
struct Cached {
    value: HeaderValue,
    expires: SystemTime,
}

impl EntraToken {
    pub(crate) fn new(credential: Arc<dyn TokenCredential>, scope: String) -> EntraToken {
        EntraToken {
            credential,
            scope,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            config: None,
        }
    }

    /// Moves the last fetch `by` into the past, as if that much time had gone by.
    #[cfg(test)]
    async fn age_last_fetch(&self, by: Duration) {
        if let Some(last) = self.fetching.lock().await.as_mut() {
            last.at -= by;
        }
    }

    /// The identity it was built for (a reload keeps the token of an unchanged identity).
    pub(crate) fn config(&self) -> Option<&EntraConfig> {
        self.config.as_ref()
    }

    /// Tokens fetched so far (for the admin metrics and tests).
    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn current(&self) -> Option<Cached> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Authorization: Bearer …` for the next request.
    pub(crate) async fn header(&self) -> Result<HeaderValue, String> {
        let now = SystemTime::now();
        let left = |c: &Cached| c.expires.duration_since(now).unwrap_or(Duration::ZERO);
        if let Some(c) = self.current() {
            if left(&c) > REFRESH_AHEAD {
                return Ok(c.value);
            }
            if left(&c) > USABLE_MARGIN {
                // Nearing expiry but good: one request refreshes, the others do not wait.
                let Ok(mut fetching) = self.fetching.try_lock() else {
                    return Ok(c.value);
                };
                if fetching.as_ref().is_some_and(|f| f.recent(now)) {
                    return Ok(c.value);
                }
                return Ok(match self.fetch(&mut fetching).await {
                    Ok(fresh) => fresh,
                    Err(_) => c.value,
                });
            }
        }
        let mut fetching = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(c) = self.current()
            && left(&c) > USABLE_MARGIN
        {
            return Ok(c.value);
        }
        let now = SystemTime::now();
        if let Some(last) = fetching.as_ref().filter(|f| f.recent(now)) {
            // Fetched a moment ago: its failure stands, or the token it gave (short-lived as
            // it is) is sent while it has not expired.
            if let Some(why) = &last.failure {
                return Err(why.clone());
            }
            if let Some(c) = self.current().filter(|c| c.expires > now) {
                return Ok(c.value);
            }
            return Err("Entra ID token: the identity gave an expired token".to_owned());
        }
        self.fetch(&mut fetching).await
    }

    async fn fetch(&self, last: &mut Option<LastFetch>) -> Result<HeaderValue, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let got = tokio::time::timeout(
            FETCH_TIMEOUT,
            self.credential.get_token(&[self.scope.as_str()], None),
        )
        .await;
        let token = match got {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(self.failed(last, e.to_string())),
            Err(_) => {
                return Err(self.failed(
                    last,
                    format!("no token within {} s", FETCH_TIMEOUT.as_secs()),
                ));
            }
        };
        let expires = u64::try_from(token.expires_on.unix_timestamp())
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", token.token.secret()))
        else {
            return Err(self.failed(last, "the token is not a valid header value".into()));
        };
        value.set_sensitive(true);
        *last = Some(LastFetch {
            at: SystemTime::now(),
            failure: None,
        });
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
            value: value.clone(),
            expires,
        });
        Ok(value)
    }

    fn failed(&self, last: &mut Option<LastFetch>, why: String) -> String {
        tracing::warn!(scope = %self.scope, error = %why, "Entra ID token for a backend could not be fetched.");
        let why = format!("Entra ID token: {why}");
        *last = Some(LastFetch {
            at: SystemTime::now(),
            failure: Some(why.clone()),
        });
        why
    }
}

/// Builds the credentials the configuration names, one per distinct identity, so backends
/// sharing an identity share its token.
#[derive(Default)]
pub(crate) struct Identities {
    built: HashMap<EntraConfig, Arc<EntraToken>>,
}

impl Identities {
    /// The token source for `config`; what is wrong with it is returned as one problem.
    pub(crate) fn get(&mut self, config: &EntraConfig) -> Result<Arc<EntraToken>, String> {
        if let Some(t) = self.built.get(config) {
            return Ok(t.clone());
        }
        let credential = credential(config)?;
        let mut token = EntraToken::new(credential, config.scope.clone());
        token.config = Some(config.clone());
        let token = Arc::new(token);
        self.built.insert(config.clone(), token.clone());
        Ok(token)
    }
}

fn credential(c: &EntraConfig) -> Result<Arc<dyn TokenCredential>, String> {
    let unused = |field: &str, set: bool| {
        if set {
            Err(format!("`{field}` does not apply to kind {:?}", c.kind))
        } else {
            Ok(())
        }
    };
    let secret_named = c.secret_env.is_some() || c.secret_file.is_some();
    match c.kind {
        EntraKind::ManagedIdentity => {
            unused("tenant_id", c.tenant_id.is_some())?;
            unused("secret_env/secret_file", secret_named)?;
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: c.client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            };
            let credential: Arc<dyn TokenCredential> =
                ManagedIdentityCredential::new(Some(options)).map_err(|e| e.to_string())?;
            Ok(credential)
        }
        EntraKind::WorkloadIdentity => {
            unused("secret_env/secret_file", secret_named)?;
            let options = WorkloadIdentityCredentialOptions {
                client_id: c.client_id.clone(),
                tenant_id: c.tenant_id.clone(),
                ..Default::default()
            };
            let credential: Arc<dyn TokenCredential> =
                WorkloadIdentityCredential::new(Some(options)).map_err(|e| e.to_string())?;
            Ok(credential)
        }
        EntraKind::ClientSecret => {
            let (Some(tenant), Some(client)) = (&c.tenant_id, &c.client_id) else {
                return Err("kind client_secret needs tenant_id and client_id".into());
            };
            let secret = client_secret(c)?;
            let credential: Arc<dyn TokenCredential> =
                ClientSecretCredential::new(tenant, client.clone(), secret.into(), None)
                    .map_err(|e| e.to_string())?;
            Ok(credential)
        }
        EntraKind::DeveloperTools => {
            unused("client_id", c.client_id.is_some())?;
            unused("tenant_id", c.tenant_id.is_some())?;
            unused("secret_env/secret_file", secret_named)?;
            let credential: Arc<dyn TokenCredential> =
                DeveloperToolsCredential::new(None).map_err(|e| e.to_string())?;
            Ok(credential)
        }
    }
}

/// A client secret from the one place named, never from the configuration file itself.
fn client_secret(c: &EntraConfig) -> Result<String, String> {
    match (&c.secret_env, &c.secret_file) {
        (Some(var), None) => crate::config::secret_from_env("secret_env", var),
        (None, Some(path)) => crate::config::secret_from_file("secret_file", path),
        _ => Err("kind client_secret needs one of secret_env, secret_file".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use azure_core::time::OffsetDateTime;

    use super::*;

    const GATE: u32 = 1_000;

    /// Hands out `t1`, `t2`, … each valid for the next lifetime queued (seconds), counting
    /// calls; fails while `down` is set.
    #[derive(Debug)]
    struct Fake {
        lifetimes: Mutex<Vec<i64>>,
        calls: AtomicU64,
        down: std::sync::atomic::AtomicBool,
        gate: tokio::sync::Semaphore,
    }

    impl Fake {
        fn new(lifetimes: &[i64]) -> Arc<Fake> {
            Arc::new(Fake {
                lifetimes: Mutex::new(lifetimes.iter().rev().copied().collect()),
                calls: AtomicU64::new(0),
                down: std::sync::atomic::AtomicBool::new(false),
                gate: tokio::sync::Semaphore::new(GATE as usize),
            })
        }
    }

    #[async_trait::async_trait]
    impl TokenCredential for Fake {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            assert_eq!(scopes, [COGNITIVE_SERVICES_SCOPE]);
            let _permit = self.gate.acquire().await;
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.down.load(Ordering::SeqCst) {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "identity endpoint down",
                ));
            }
            let life = self.lifetimes.lock().unwrap().pop().unwrap_or(3600);
            Ok(AccessToken::new(
                format!("t{n}"),
                OffsetDateTime::now_utc() + azure_core::time::Duration::seconds(life),
            ))
        }
    }

    fn token(fake: &Arc<Fake>) -> EntraToken {
        EntraToken::new(fake.clone(), COGNITIVE_SERVICES_SCOPE.into())
    }

    async fn bearer(t: &EntraToken) -> String {
        t.header().await.unwrap().to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_fetch() {
        let fake = Fake::new(&[]);
        // The first fetch is held until every request is waiting for it.
        let held = fake.gate.acquire_many(GATE).await.unwrap();
        let t = Arc::new(token(&fake));
        let tracker = tokio_util::task::TaskTracker::new();
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let t = t.clone();
                tracker.spawn(async move { bearer(&t).await })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(held);
        for w in waiting {
            assert_eq!(w.await.unwrap(), "Bearer t1");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(t.fetches(), 1);
    }

    #[tokio::test]
    async fn a_token_nearing_expiry_is_refreshed_once_and_replaced() {
        // 200 s left is inside the refresh window but still usable.
        let fake = Fake::new(&[200, 3600]);
        let t = token(&fake);
        assert_eq!(bearer(&t).await, "Bearer t1");
        t.age_last_fetch(REFETCH_AFTER).await;
        assert_eq!(bearer(&t).await, "Bearer t2", "refreshed ahead of expiry");
        for _ in 0..10 {
            assert_eq!(bearer(&t).await, "Bearer t2");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_good_token_and_is_not_retried_at_once() {
        let fake = Fake::new(&[200]);
        let t = token(&fake);
        assert_eq!(bearer(&t).await, "Bearer t1");
        fake.down.store(true, Ordering::SeqCst);
        t.age_last_fetch(REFETCH_AFTER).await;
        for _ in 0..10 {
            assert_eq!(
                bearer(&t).await,
                "Bearer t1",
                "the current token still serves"
            );
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "one failed refresh");
    }

    #[tokio::test]
    async fn without_a_usable_token_requests_fail_fast_after_a_failed_fetch() {
        let fake = Fake::new(&[]);
        fake.down.store(true, Ordering::SeqCst);
        let t = token(&fake);
        for _ in 0..10 {
            let err = t.header().await.unwrap_err();
            assert!(err.contains("identity endpoint down"), "{err}");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        // A token about to expire is not sent once it could be replaced.
        let fake = Fake::new(&[5]);
        let t = token(&fake);
        assert_eq!(bearer(&t).await, "Bearer t1");
        t.age_last_fetch(REFETCH_AFTER).await;
        assert_eq!(
            bearer(&t).await,
            "Bearer t2",
            "5 s left is too little to send"
        );
    }

    /// Found in review: a source handing out tokens already inside the refresh window was asked
    /// again by every request. Within the refetch bound the token it gave is sent.
    #[tokio::test]
    async fn a_source_of_short_lived_tokens_is_not_asked_on_every_request() {
        let fake = Fake::new(&[200, 200, 200]);
        let t = token(&fake);
        for _ in 0..20 {
            assert_eq!(bearer(&t).await, "Bearer t1");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        let fake = Fake::new(&[10, 10]);
        let t = token(&fake);
        for _ in 0..20 {
            assert_eq!(bearer(&t).await, "Bearer t1", "still valid: sent");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn kinds_refuse_fields_that_do_not_apply_and_secrets_come_from_one_place() {
        let base = EntraConfig {
            kind: EntraKind::ManagedIdentity,
            client_id: None,
            tenant_id: Some("t".into()),
            secret_env: None,
            secret_file: None,
            scope: default_scope(),
        };
        assert!(credential(&base).unwrap_err().contains("tenant_id"));
        let secret = EntraConfig {
            kind: EntraKind::ClientSecret,
            tenant_id: Some("72f988bf-86f1-41af-91ab-2d7cd011db47".into()),
            client_id: Some("c".into()),
            ..base.clone()
        };
        assert!(credential(&secret).unwrap_err().contains("secret_env"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let secret = EntraConfig {
            secret_file: Some(file),
            ..secret
        };
        assert!(credential(&secret).is_ok());
        let mut ids = Identities::default();
        let a = ids.get(&secret).unwrap();
        let b = ids.get(&secret).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one identity, one token cache");
    }
}
