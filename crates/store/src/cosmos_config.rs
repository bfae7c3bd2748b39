//! `store.type = "cosmos"`: where the Cosmos DB account is, how to authenticate, and how the
//! containers are laid out. Parsed in every build, so a configuration names what is wrong even
//! where the backend is not compiled in.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The Cosmos DB backend's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CosmosConfig {
    /// The account endpoint, `https://ACCOUNT.documents.azure.com:443/`.
    pub endpoint: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default)]
    pub auth: CosmosAuth,
    /// The Azure region the client prefers (Cosmos routes reads to the nearest replica).
    #[serde(default = "default_region")]
    pub region: String,
    /// Create the database and containers when missing. Needs key auth: Cosmos DB's data-plane
    /// roles do not allow creating containers, so with Entra ID they are created by the
    /// deployment (the Bicep in `infra/`) and only checked here.
    #[serde(default)]
    pub create_if_missing: bool,
    #[serde(default)]
    pub containers: CosmosContainers,
    /// Shards of the raw container: its partition key is `/shard`, a hash of the request id,
    /// and each shard is one unit of the change feed. The most parser replicas that can share
    /// the work; each shard is one logical partition (at most 20 GB and 10,000 RU/s), so the
    /// count bounds the raw container at shards × 20 GB of live records. Fixed once the
    /// container exists: a different value is refused at start.
    #[serde(default = "default_raw_shards")]
    pub raw_shards: u32,
    /// Raw records expire after this many days (Cosmos DB's per-container TTL); `0` keeps them
    /// for ever. Raw records are the audit trail of what was sent and received: 90 days covers
    /// a quarter's charge-back disputes.
    #[serde(default = "default_raw_ttl_days")]
    pub raw_ttl_days: u32,
    /// HTTP/2 to the account (Cosmos DB's default); off for local test servers that only speak
    /// HTTP/1.1.
    #[serde(default = "yes")]
    pub http2: bool,
    /// Cosmos DB's binary encoding of documents (the SDK's default); off for local test
    /// servers that only read JSON.
    #[serde(default = "yes")]
    pub binary_encoding: bool,
    /// Transactional batches written at once.
    #[serde(default = "default_write_concurrency")]
    pub write_concurrency: usize,
}

/// How Tollgate authenticates to Cosmos DB.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CosmosAuth {
    /// The account key, read from an environment variable or a file (as Container Apps
    /// mounts a Key Vault secret); never from the configuration file itself.
    Key {
        #[serde(default = "default_key_env")]
        key_env: String,
        #[serde(default)]
        key_file: Option<PathBuf>,
    },
    /// The managed identity of the host (Container Apps, App Service, a VM): system-assigned,
    /// or the user-assigned one with this client id.
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
    /// AKS workload identity (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity,
    /// A developer's own login (`az login` or `azd auth login`).
    DeveloperTools,
}

/// In Azure, the host's managed identity: no secret to store.
impl Default for CosmosAuth {
    fn default() -> Self {
        CosmosAuth::ManagedIdentity { client_id: None }
    }
}

/// Container names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosmosContainers {
    pub raw: String,
    pub requests: String,
    pub leases: String,
}

impl Default for CosmosContainers {
    fn default() -> Self {
        CosmosContainers {
            raw: "raw".into(),
            requests: "requests".into(),
            leases: "leases".into(),
        }
    }
}

fn default_database() -> String {
    "tollgate".into()
}

fn default_region() -> String {
    "East US".into()
}

fn default_raw_shards() -> u32 {
    16
}

fn default_raw_ttl_days() -> u32 {
    90
}

fn default_write_concurrency() -> usize {
    8
}

fn default_key_env() -> String {
    "TOLLGATE_COSMOS_KEY".into()
}

fn yes() -> bool {
    true
}

impl CosmosConfig {
    /// Problems a configuration has before anything is contacted.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.endpoint.starts_with("https://") || self.endpoint.starts_with("http://")) {
            problems.push(format!(
                "store.endpoint {:?} is not an https:// URL of a Cosmos DB account",
                self.endpoint
            ));
        }
        if !(1..=1024).contains(&self.raw_shards) {
            problems.push("store.raw_shards must be between 1 and 1024".into());
        }
        if self.write_concurrency == 0 {
            problems.push("store.write_concurrency must be at least 1".into());
        }
        for (what, name) in [
            ("database", &self.database),
            ("containers.raw", &self.containers.raw),
            ("containers.requests", &self.containers.requests),
            ("containers.leases", &self.containers.leases),
        ] {
            if name.is_empty() || name.contains(['/', '\\', '?', '#']) {
                problems.push(format!(
                    "store.{what} {name:?} is not a valid Cosmos DB name (empty, or has / \\ ? #)"
                ));
            }
        }
        problems
    }

    /// The raw container's shard names: the feed's units.
    pub fn units(&self) -> Vec<String> {
        (0..self.raw_shards).map(|i| format!("{i:04}")).collect()
    }
}
