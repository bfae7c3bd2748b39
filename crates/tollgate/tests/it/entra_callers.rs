//! Entra ID callers: tokens signed with RSA keys generated here, verified against a JWKS served
//! on port 0 behind an OpenID configuration, as Entra ID publishes them. Valid tokens map to a
//! consumer by their claims and are recorded with the caller's object id and app id; every
//! forged or misdirected token is refused with AOAI's 401 body, and a valid token no rule maps
//! with 403.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tollgate_logging_proxy::entra_callers::{CallerRule, EntraCallersConfig};

use crate::harness::{self, Stack, request_id, serve};

const TENANT: &str = "11111111-1111-1111-1111-111111111111";
const AUDIENCE: &str = "api://tollgate";
const APP: &str = "22222222-2222-2222-2222-222222222222";

/// An RSA key pair for signing, and its JWK.
struct Signer {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key's PEM (what a forger would use as an HMAC secret).
    public_pem: String,
}

fn signer(kid: &str) -> Signer {
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
    let pem = key
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
        .expect("pem")
        .to_string();
    let public = key.to_public_key();
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let public_pem =
        rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_pem(&public, rsa::pkcs1::LineEnding::LF)
            .expect("public pem");
    Signer {
        kid: kid.to_owned(),
        encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key"),
        jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": b64(public.n().to_bytes_be()), "e": b64(public.e().to_bytes_be())}),
        public_pem,
    }
}

/// Two key pairs, made once (RSA generation is slow in a debug build).
fn signers() -> &'static (Signer, Signer) {
    static KEYS: OnceLock<(Signer, Signer)> = OnceLock::new();
    KEYS.get_or_init(|| (signer("k1"), signer("k2")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a good token from `TENANT`, with `overrides` applied.
fn claims(authority: &str, overrides: Value) -> Value {
    let mut c = json!({
        "aud": AUDIENCE, "iss": format!("{authority}/{TENANT}/v2.0"), "tid": TENANT,
        "iat": now(), "nbf": now() - 10, "exp": now() + 3600,
        "oid": "33333333-3333-3333-3333-333333333333", "azp": APP, "roles": ["Tollgate.Call"],
    });
    if let (Some(c), Some(o)) = (c.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn sign(s: &Signer, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&header, claims, &s.encoding).expect("sign")
}

/// The tenant's published keys, changeable mid-test (a key rotation), and how often fetched.
#[derive(Default)]
struct Published {
    keys: Vec<Value>,
    fetches: usize,
}

async fn stack(
    published: Arc<Mutex<Published>>,
    default_consumer: Option<&str>,
    more: impl FnOnce(&mut tollgate_logging_proxy::ProxyConfig),
) -> (Stack, String) {
    let authority = {
        let p = published.clone();
        // The JWKS address is known once the server listens; the OpenID configuration names it.
        let base: Arc<OnceLock<String>> = Arc::default();
        let named = base.clone();
        let router = axum::Router::new()
            .route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let base = named.get().cloned().unwrap_or_default();
                    async move { axum::Json(json!({"jwks_uri": format!("{base}/keys")})) }
                }),
            )
            .route(
                "/keys",
                axum::routing::get(move || {
                    let p = p.clone();
                    async move {
                        let mut p = p.lock().unwrap();
                        p.fetches += 1;
                        axum::Json(json!({"keys": p.keys.clone()}))
                    }
                }),
            );
        let url = format!("http://{}", serve(router).await);
        let _ = base.set(url.clone());
        url
    };
    let callers = EntraCallersConfig {
        tenants: vec![TENANT.into()],
        audiences: vec![AUDIENCE.into()],
        authority_host: authority.clone(),
        jwks_min_refresh_s: 0,
        rules: vec![CallerRule {
            claim: "azp".into(),
            value: APP.into(),
            consumer: "tester".into(),
        }],
        default_consumer: default_consumer.map(str::to_owned),
        ..EntraCallersConfig::default()
    };
    let s = harness::start(move |c| {
        c.entra_callers = callers;
        more(c);
    })
    .await;
    (s, authority)
}

async fn call(s: &Stack, token: &str) -> reqwest::Response {
    s.http
        .post(s.chat_url("gpt-4o"))
        .header("authorization", format!("Bearer {token}"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_map_to_a_consumer_and_forged_ones_are_refused() {
    let (k1, k2) = signers();
    let published = Arc::new(Mutex::new(Published {
        keys: vec![k1.jwk.clone()],
        fetches: 0,
    }));
    let (s, authority) = stack(published.clone(), None, |_| {}).await;

    let good = call(&s, &sign(k1, &claims(&authority, json!({})))).await;
    assert_eq!(good.status(), 200);
    let id = request_id(&good);
    good.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.consumer.id, "tester");
    assert_eq!(
        r.consumer.subject.as_deref(),
        Some("33333333-3333-3333-3333-333333333333")
    );
    assert_eq!(r.consumer.app_id.as_deref(), Some(APP));
    let raw = serde_json::to_string(&s.raw(&id).await).unwrap();
    assert!(!raw.contains("eyJ"), "no token in the records");

    let v1_issuer = claims(
        &authority,
        json!({"iss": format!("https://sts.windows.net/{TENANT}/"), "appid": APP}),
    );
    assert_eq!(
        call(&s, &sign(k1, &v1_issuer)).await.status(),
        200,
        "v1 token"
    );

    let refused: Vec<(&str, String)> = vec![
        (
            "expired",
            sign(k1, &claims(&authority, json!({"exp": now() - 3600}))),
        ),
        (
            "not yet valid",
            sign(k1, &claims(&authority, json!({"nbf": now() + 3600}))),
        ),
        (
            "wrong audience",
            sign(k1, &claims(&authority, json!({"aud": "api://other"}))),
        ),
        (
            "wrong issuer",
            sign(k1, &claims(&authority, json!({"iss": "https://evil/"}))),
        ),
        (
            "another tenant",
            sign(
                k1,
                &claims(
                    &authority,
                    json!({"tid": "99999999-9999-9999-9999-999999999999",
                        "iss": format!("{authority}/99999999-9999-9999-9999-999999999999/v2.0")}),
                ),
            ),
        ),
        ("alg none", {
            let enc =
                |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                enc(json!({"alg": "none", "kid": "k1", "typ": "JWT"})),
                enc(claims(&authority, json!({})))
            )
        }),
        ("HS256 with the public key as secret", {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("k1".into());
            jsonwebtoken::encode(
                &header,
                &claims(&authority, json!({})),
                &EncodingKey::from_secret(k1.public_pem.as_bytes()),
            )
            .unwrap()
        }),
        (
            "signed by an unpublished key",
            sign(k2, &claims(&authority, json!({}))),
        ),
    ];
    for (what, token) in &refused {
        let resp = call(&s, token).await;
        assert_eq!(resp.status(), 401, "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "401", "{what}");
    }

    // A valid token no rule maps, and no default consumer: 403.
    let stranger = sign(
        k1,
        &claims(
            &authority,
            json!({"azp": "44444444-4444-4444-4444-444444444444"}),
        ),
    );
    assert_eq!(call(&s, &stranger).await.status(), 403);

    // The tenant rotates to k2: a token with the new kid makes Tollgate fetch the keys again.
    published.lock().unwrap().keys = vec![k2.jwk.clone()];
    let before = published.lock().unwrap().fetches;
    assert_eq!(
        call(&s, &sign(k2, &claims(&authority, json!({}))))
            .await
            .status(),
        200
    );
    assert_eq!(
        published.lock().unwrap().fetches,
        before + 1,
        "refreshed once"
    );
}

/// With a default consumer, a valid token no rule maps is charged to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmapped_valid_token_goes_to_the_default_consumer() {
    let (k1, _) = signers();
    let published = Arc::new(Mutex::new(Published {
        keys: vec![k1.jwk.clone()],
        fetches: 0,
    }));
    let (s, authority) = stack(published, Some("tester"), |_| {}).await;
    let token = sign(
        k1,
        &claims(
            &authority,
            json!({"azp": "55555555-5555-5555-5555-555555555555"}),
        ),
    );
    let resp = call(&s, &token).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.consumer.id, "tester");
    assert_eq!(
        r.consumer.app_id.as_deref(),
        Some("55555555-5555-5555-5555-555555555555")
    );
}

/// An Entra ID administrator: a valid token carrying the configured app role may use the
/// consumer API (and is named in the audit trail by its object id); a valid token without the
/// role gets 403, a forged one 401. A rule may name a consumer only the registry holds: its
/// callers are refused until it is created, and served from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_role_makes_an_administrator_and_rules_reach_registered_consumers() {
    const OTHER_APP: &str = "66666666-6666-6666-6666-666666666666";
    let (k1, k2) = signers();
    let published = Arc::new(Mutex::new(Published {
        keys: vec![k1.jwk.clone()],
        fetches: 0,
    }));
    const PARTNER: &str = "77777777-7777-7777-7777-777777777777";
    let (s, authority) = stack(published, None, |c| {
        c.entra_callers.tenants.push(PARTNER.into());
        c.admin.entra_role = Some("Tollgate.Admin".into());
        c.admin.tenants = vec![TENANT.into()];
        c.entra_callers.rules.push(CallerRule {
            claim: "azp".into(),
            value: OTHER_APP.into(),
            consumer: "reg-team".into(),
        });
    })
    .await;
    let admin = format!("http://{}", serve(s.proxy.admin_router()).await);
    let create = async |token: &str| {
        s.http
            .post(format!("{admin}/tollgate/admin/consumers"))
            .header("authorization", format!("Bearer {token}"))
            .json(&json!({"id": "reg-team"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let caller = sign(k1, &claims(&authority, json!({"azp": OTHER_APP})));
    let refused = call(&s, &caller).await;
    assert_eq!(refused.status(), 403, "no such consumer yet");

    let no_role = sign(k1, &claims(&authority, json!({})));
    assert_eq!(create(&no_role).await, 403);
    let forged = sign(
        k2,
        &claims(&authority, json!({"roles": ["Tollgate.Admin"]})),
    );
    assert_eq!(create(&forged).await, 401);
    let expired = sign(
        k1,
        &claims(
            &authority,
            json!({"roles": ["Tollgate.Admin"], "exp": now() - 600, "nbf": now() - 900}),
        ),
    );
    assert_eq!(create(&expired).await, 401);
    // A partner tenant whose tokens are accepted from callers assigns the role in its own
    // directory: it does not make an administrator here.
    let partner = sign(
        k1,
        &claims(
            &authority,
            json!({"roles": ["Tollgate.Admin"], "tid": PARTNER,
                   "iss": format!("{authority}/{PARTNER}/v2.0")}),
        ),
    );
    assert_eq!(create(&partner).await, 403);
    let admin_token = sign(
        k1,
        &claims(&authority, json!({"roles": ["Tollgate.Admin"]})),
    );
    assert_eq!(create(&admin_token).await, 201);

    // The replica that made the change applies it at once.
    let served = call(&s, &caller).await;
    assert_eq!(served.status(), 200);
    let id = request_id(&served);
    served.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.consumer.id, "reg-team");
    assert_eq!(r.consumer.app_id.as_deref(), Some(OTHER_APP));

    let audit: Value = s
        .http
        .get(format!("{admin}/tollgate/admin/audit"))
        .header("authorization", format!("Bearer {admin_token}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["data"][0]["action"], "consumer.create");
    assert_eq!(
        audit["data"][0]["actor"],
        format!("entra:{TENANT}/33333333-3333-3333-3333-333333333333")
    );
}
