//! Connecting to the account and making sure the database, containers and shard count are what
//! Tollgate expects, with errors that name what is missing.

use std::sync::Arc;

use azure_core::credentials::{Secret, TokenCredential};
use azure_data_cosmos::clients::{ContainerClient, DatabaseClient};
use azure_data_cosmos::models::{ContainerProperties, IndexingPolicy, PropertyPath};
use azure_data_cosmos::options::{BinaryEncodingOptions, ConnectionPoolOptions};
use azure_data_cosmos::{
    AccountEndpoint, AccountReference, CosmosClient, CosmosRuntime, RoutingStrategy,
};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential,
};
use serde::{Deserialize, Serialize};

use super::{CosmosStore, status_of, store_error};
use crate::{CosmosAuth, CosmosConfig, StoreError};

/// The id of the document in `leases` that records the raw container's shard count.
const META_RAW: &str = "meta.raw";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    id: String,
    kind: String,
    shards: u32,
    /// The raw container's resource id: the feed positions saved in the leases belong to it.
    #[serde(default)]
    raw_rid: Option<String>,
}

fn config_error(what: impl std::fmt::Display) -> StoreError {
    StoreError::Config(what.to_string())
}

/// The account reference for the configured authentication.
fn account(config: &CosmosConfig) -> Result<AccountReference, StoreError> {
    let endpoint: AccountEndpoint = config
        .endpoint
        .parse()
        .map_err(|e| config_error(format!("store.endpoint {:?}: {e}", config.endpoint)))?;
    let credential: Arc<dyn TokenCredential> = match &config.auth {
        CosmosAuth::Key { key_env, key_file } => {
            let key = match key_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| {
                        config_error(format!("store.auth.key_file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_owned(),
                None => std::env::var(key_env).map_err(|_| {
                    config_error(format!(
                        "store.auth is a key, but the environment variable {key_env} that holds it is not set"
                    ))
                })?,
            };
            return Ok(AccountReference::with_authentication_key(
                endpoint,
                Secret::new(key),
            ));
        }
        CosmosAuth::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            }))
            .map_err(|e| config_error(format!("managed identity: {e}")))?
        }
        CosmosAuth::WorkloadIdentity => WorkloadIdentityCredential::new(None)
            .map_err(|e| config_error(format!("workload identity: {e}")))?,
        CosmosAuth::DeveloperTools => DeveloperToolsCredential::new(None)
            .map_err(|e| config_error(format!("developer tools credential: {e}")))?,
    };
    Ok(AccountReference::with_credential(endpoint, credential))
}

/// A client for the configured account.
pub async fn connect(config: &CosmosConfig) -> Result<CosmosClient, StoreError> {
    let account = account(config)?;
    let pool = ConnectionPoolOptions::builder()
        .with_is_http2_allowed(config.http2)
        .build()
        .map_err(store_error)?;
    let runtime = CosmosRuntime::builder()
        .with_connection_pool(pool)
        .build()
        .await
        .map_err(store_error)?;
    CosmosClient::builder()
        .with_runtime(runtime)
        .with_binary_encoding_options(
            BinaryEncodingOptions::new().with_enabled(config.binary_encoding),
        )
        .build(
            account,
            RoutingStrategy::ProximityTo(config.region.clone().into()),
        )
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot reach Cosmos DB account {}: {e}",
                config.endpoint
            ))
        })
}

/// Opens the store; `read_only` (commands that only read) records nothing in the account.
pub(super) async fn open(
    config: &CosmosConfig,
    read_only: bool,
) -> Result<CosmosStore, StoreError> {
    let client = connect(config).await?;
    let database = client.database_client(config.database.clone());
    let mut missing = Vec::new();
    if let Err(e) = database.read(None).await {
        if status_of(&e) != 404 {
            return Err(store_error(e));
        }
        if config.create_if_missing {
            match client.create_database(&config.database, None).await {
                Ok(_) => {}
                Err(e) if status_of(&e) == 409 => {}
                Err(e) => return Err(store_error(e)),
            }
        } else {
            missing.push(format!("database {:?}", config.database));
        }
    }
    let ttl = (config.raw_ttl_days > 0).then(|| config.raw_ttl_days.saturating_mul(86_400));
    let mut wanted = [
        raw_properties(&config.containers.raw, ttl),
        requests_properties(&config.containers.requests),
        ContainerProperties::new(config.containers.leases.clone(), "/id".into()),
    ]
    .into_iter();
    let mut clients = Vec::new();
    if missing.is_empty() {
        for properties in wanted.by_ref() {
            let name = properties.id.to_string();
            match container(&database, config, properties).await? {
                Some(c) => clients.push(c),
                None => missing.push(format!("container {name:?}")),
            }
        }
    } else {
        missing.extend(wanted.map(|p| format!("container {:?}", p.id)));
    }
    let (Some(leases), Some(requests), Some(raw), true) = (
        clients.pop(),
        clients.pop(),
        clients.pop(),
        missing.is_empty(),
    ) else {
        return Err(config_error(format!(
            "Cosmos DB account {} lacks {}; create them (the Bicep in infra/ does) or set store.create_if_missing with key auth",
            config.endpoint,
            missing.join(", ")
        )));
    };
    let raw_rid = raw
        .read(None)
        .await
        .map_err(store_error)?
        .into_model()
        .map_err(store_error)?
        .system_properties
        .resource_id;
    check_raw_meta(&leases, config, raw_rid, read_only).await?;
    Ok(CosmosStore {
        raw: Arc::new(raw),
        requests: Arc::new(requests),
        leases: Arc::new(leases),
        units: Arc::new(config.units()),
        write_concurrency: config.write_concurrency,
        stats: Arc::default(),
    })
}

/// Raw records: bodies, headers and stream data are kept but never queried, so only the fields
/// the feed and `read_request` use are indexed.
fn raw_properties(name: &str, ttl_seconds: Option<u32>) -> ContainerProperties {
    let policy = IndexingPolicy::default()
        .with_included_path(PropertyPath::default().with_path("/requestId/?"))
        .with_included_path(PropertyPath::default().with_path("/seq/?"))
        .with_included_path(PropertyPath::default().with_path("/kind/?"))
        .with_excluded_path(PropertyPath::default().with_path("/*"));
    let props =
        ContainerProperties::new(name.to_owned(), "/shard".into()).with_indexing_policy(policy);
    match ttl_seconds {
        Some(s) => props.with_default_ttl(s),
        None => props,
    }
}

/// Consolidated records: everything is indexed for the analysts' filters except the content
/// (prompts, answers) and the response headers, which are large and never filtered on.
fn requests_properties(name: &str) -> ContainerProperties {
    let policy = IndexingPolicy::default()
        .with_included_path(PropertyPath::default().with_path("/*"))
        .with_excluded_path(PropertyPath::default().with_path("/prompt/*"))
        .with_excluded_path(PropertyPath::default().with_path("/choices/*"))
        .with_excluded_path(PropertyPath::default().with_path("/responseHeaders/*"))
        .with_excluded_path(PropertyPath::default().with_path("/promptFilterResults/*"));
    ContainerProperties::new(name.to_owned(), "/id".into()).with_indexing_policy(policy)
}

/// The container's client, creating the container first when it is missing and allowed to;
/// `None` when it is missing and may not be created.
async fn container(
    database: &DatabaseClient,
    config: &CosmosConfig,
    properties: ContainerProperties,
) -> Result<Option<ContainerClient>, StoreError> {
    let name = properties.id.to_string();
    match database.container_client(name.clone(), None).await {
        Ok(c) => {
            check_partition_key(&c, &name, &properties).await?;
            return Ok(Some(c));
        }
        Err(e) if status_of(&e) == 404 || is_missing(&e) => {}
        Err(e) => return Err(store_error(e)),
    }
    if !config.create_if_missing {
        return Ok(None);
    }
    match database.create_container(properties, None).await {
        Ok(_) => {}
        Err(e) if status_of(&e) == 409 => {}
        Err(e) => return Err(store_error(e)),
    }
    database
        .container_client(name, None)
        .await
        .map(Some)
        .map_err(store_error)
}

/// An existing container must be keyed as Tollgate writes it: with another partition key every
/// write would be refused (400), and the records set aside as if each were at fault.
async fn check_partition_key(
    container: &ContainerClient,
    name: &str,
    wanted: &ContainerProperties,
) -> Result<(), StoreError> {
    let found: ContainerProperties = container
        .read(None)
        .await
        .map_err(store_error)?
        .into_model()
        .map_err(store_error)?;
    let (found, wanted) = (
        found.partition_key.paths().to_vec(),
        wanted.partition_key.paths().to_vec(),
    );
    if found != wanted {
        return Err(config_error(format!(
            "Cosmos DB container {name:?} has partition key {found:?}; Tollgate needs {wanted:?} (recreate it, or name another container)"
        )));
    }
    Ok(())
}

/// Whether loading a container's metadata failed because it does not exist (the SDK reports
/// a missing container while resolving it, not always as a plain 404).
fn is_missing(e: &azure_data_cosmos::CosmosError) -> bool {
    e.to_string().contains("NotFound") || e.to_string().contains("404")
}

/// The shard count is part of where records live: a different count would look for a request's
/// records in the wrong shard. And the feed positions in the leases belong to one raw container:
/// after it is deleted and recreated they are refused for ever. Both are recorded on first
/// start and checked on every start.
async fn check_raw_meta(
    leases: &ContainerClient,
    config: &CosmosConfig,
    raw_rid: Option<String>,
    read_only: bool,
) -> Result<(), StoreError> {
    match super::find::<RawMeta>(leases, META_RAW).await? {
        Some(meta) if meta.shards != config.raw_shards => Err(config_error(format!(
            "store.raw_shards is {}, but the raw container was created with {} shards; a different count would look for records in the wrong shard",
            config.raw_shards, meta.shards
        ))),
        Some(RawMeta {
            raw_rid: Some(recorded),
            ..
        }) if raw_rid.as_ref().is_some_and(|rid| *rid != recorded) => Err(config_error(format!(
            "the raw container {:?} was recreated since the parser's checkpoints were saved (its resource id was {recorded}, now {}); delete the lease documents in {:?} (and the document {META_RAW:?}) so the parsers read the new container from its beginning",
            config.containers.raw,
            raw_rid.as_deref().unwrap_or("?"),
            config.containers.leases
        ))),
        Some(_) => Ok(()),
        None if read_only => Ok(()),
        None => {
            let meta = RawMeta {
                id: META_RAW.into(),
                kind: "meta".into(),
                shards: config.raw_shards,
                raw_rid: raw_rid.clone(),
            };
            match leases.create_item(META_RAW, META_RAW, &meta, None).await {
                Ok(_) => Ok(()),
                // Another replica started at the same time: check what it wrote.
                Err(e) if status_of(&e) == 409 => {
                    Box::pin(check_raw_meta(leases, config, raw_rid, read_only)).await
                }
                Err(e) => Err(store_error(e)),
            }
        }
    }
}
