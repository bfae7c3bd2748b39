//! `tollgate consumers` and the registry's `tollgate keys` commands: the consumer registry's
//! operations run against the configured store directly (no running proxy needed); every
//! running replica applies them at its next poll. The actor in the audit trail is
//! `cli:{user}@{host}`.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use tollgate_logging_proxy::consumers::registry::{
    ConsumerFields, ConsumerView, Issued, Registry, RegistryError,
};
use tollgate_logging_proxy::quota::ConsumerLimits;
use tollgate_records::Money;

use crate::config::Config;
use crate::output::say;
use crate::report;

#[derive(Subcommand)]
pub(crate) enum ConsumersCommand {
    /// Creates a consumer and prints its first key (shown once).
    Create {
        id: String,
        #[command(flatten)]
        fields: FieldArgs,
        /// When the key stops working: RFC 3339, YYYY-MM-DD, or a span from now (90d).
        #[arg(long)]
        key_expires: Option<String>,
    },
    /// Every consumer: the configuration file's and the registry's.
    List {
        /// Deleted consumers too.
        #[arg(long)]
        deleted: bool,
        #[arg(long)]
        json: bool,
    },
    /// One registered consumer, its keys and its history.
    Show { id: String },
    /// Changes what the flags name; the rest stays.
    Update {
        id: String,
        #[command(flatten)]
        fields: FieldArgs,
    },
    /// Deletes a consumer: its keys stop working; its history stays.
    Delete { id: String },
    /// Changes to registered consumers, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Registry key commands (`tollgate keys …`).
#[derive(Subcommand)]
pub(crate) enum RegistryKeysCommand {
    /// A second key for a consumer with one (printed once).
    Create {
        consumer: String,
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339, YYYY-MM-DD, or a span from now (90d).
        #[arg(long)]
        expires: Option<String>,
    },
    /// A new primary key (printed once); the previous one keeps working for the grace.
    Rotate {
        consumer: String,
        /// How long the previous key keeps working: 24h, 7d, 0m for not at all.
        #[arg(long, default_value = "24h")]
        grace: String,
        #[arg(long)]
        expires: Option<String>,
    },
    /// Revokes a key by its id (as `keys list` and records show it).
    Revoke { consumer: String, key_id: String },
    /// A consumer's keys: id, name, created, expires, active.
    List { consumer: String },
}

/// The consumer's fields as flags; those not given are left as they are.
#[derive(Args, Default)]
pub(crate) struct FieldArgs {
    #[arg(long)]
    display_name: Option<String>,
    #[arg(long)]
    owner: Option<String>,
    /// A deployment it may call (repeat for more; none given: unchanged, any on create).
    #[arg(long = "deployment")]
    deployments: Vec<String>,
    /// Any limit flag replaces the consumer's limits with the ones given.
    #[arg(long)]
    requests_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_day: Option<u64>,
    #[arg(long)]
    tokens_per_month: Option<u64>,
    /// In the prices' currency, e.g. 250 or 99.5.
    #[arg(long)]
    cost_per_month: Option<f64>,
}

impl FieldArgs {
    fn into_fields(self) -> anyhow::Result<ConsumerFields> {
        let cost = self
            .cost_per_month
            .map(|c| Money::from_f64(c).context("--cost-per-month is not an amount"))
            .transpose()?;
        let limits = ConsumerLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            tokens_per_month: self.tokens_per_month,
            cost_per_month: cost,
        };
        Ok(ConsumerFields {
            display_name: self.display_name,
            owner: self.owner,
            deployments: (!self.deployments.is_empty()).then_some(self.deployments),
            limits: (!limits.is_empty()).then_some(limits),
            deployment_limits: None::<BTreeMap<String, ConsumerLimits>>,
        })
    }
}

/// `cli:{user}@{host}`, from the environment.
fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("cli:{user}@{host}")
}

/// An instant from RFC 3339, a date, or a span from now (`90d`).
fn instant(s: &str) -> anyhow::Result<DateTime<Utc>> {
    report::parse_time(s).or_else(|_| {
        Utc::now()
            .checked_add_signed(report::parse_since(s)?)
            .with_context(|| format!("`{s}` is too far ahead"))
    })
}

fn issued(consumer: &str, i: &Issued) {
    say(&format!("consumer: {consumer}"));
    say(&format!("key id: {}", i.key_id));
    say(&format!("key: {}", i.key));
    say("The key is shown only now; give it to the consumer. Only its SHA-256 is stored.");
}

fn print_keys(v: &ConsumerView) {
    for k in &v.keys {
        let when = |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
        say(&format!(
            "  key {}  {:<9}  created {}  expires {}  {}",
            k.id,
            k.name.as_deref().unwrap_or("-"),
            when(k.created),
            when(k.expires),
            if k.active { "active" } else { "expired" }
        ));
    }
}

async fn open(config: &Config) -> anyhow::Result<std::sync::Arc<dyn tollgate_store::Store>> {
    tollgate_store::open(&config.store)
        .await
        .context("store could not be opened")
}

fn explain(e: RegistryError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

pub(crate) async fn consumers(config: &Config, command: ConsumersCommand) -> anyhow::Result<()> {
    let store = open(config).await?;
    let registry = Registry::new(store.as_ref(), &config.proxy.consumers, actor());
    match command {
        ConsumersCommand::Create {
            id,
            fields,
            key_expires,
        } => {
            let expires = key_expires.as_deref().map(instant).transpose()?;
            let (_, key) = registry
                .create(&id, fields.into_fields()?, expires)
                .await
                .map_err(explain)?;
            issued(&id, &key);
        }
        ConsumersCommand::List { deleted, json } => {
            let all = registry.list(deleted).await.map_err(explain)?;
            if json {
                say(&serde_json::to_string_pretty(&all)?);
            } else {
                for v in &all {
                    say(&format!(
                        "{}  ({}{})  {}  owner {}  deployments {}",
                        v.id,
                        v.source,
                        if v.deleted { ", deleted" } else { "" },
                        v.display_name.as_deref().unwrap_or("-"),
                        v.owner.as_deref().unwrap_or("-"),
                        if v.deployments.is_empty() {
                            "any".to_owned()
                        } else {
                            v.deployments.join(",")
                        }
                    ));
                    print_keys(v);
                }
            }
        }
        ConsumersCommand::Show { id } => {
            let shown = registry.show(&id).await.map_err(explain)?;
            say(&serde_json::to_string_pretty(&shown)?);
        }
        ConsumersCommand::Update { id, fields } => {
            registry
                .update(&id, fields.into_fields()?)
                .await
                .map_err(explain)?;
            say(&format!("consumer {id} updated"));
        }
        ConsumersCommand::Delete { id } => {
            registry.delete(&id).await.map_err(explain)?;
            say(&format!("consumer {id} deleted; its keys stop working"));
        }
        ConsumersCommand::Audit { limit } => {
            for e in registry.audit(limit).await.map_err(explain)? {
                say(&format!(
                    "{}  {}  {}  {}{}{}",
                    e.change.at.to_rfc3339(),
                    e.change.actor,
                    e.consumer,
                    e.change.action,
                    e.change
                        .key_id
                        .as_deref()
                        .map(|k| format!("  key {k}"))
                        .unwrap_or_default(),
                    e.change
                        .detail
                        .as_deref()
                        .map(|d| format!("  ({d})"))
                        .unwrap_or_default(),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) async fn keys(config: &Config, command: RegistryKeysCommand) -> anyhow::Result<()> {
    let store = open(config).await?;
    let registry = Registry::new(store.as_ref(), &config.proxy.consumers, actor());
    match command {
        RegistryKeysCommand::Create {
            consumer,
            name,
            expires,
        } => {
            let expires = expires.as_deref().map(instant).transpose()?;
            let (_, key) = registry
                .add_key(&consumer, name, expires)
                .await
                .map_err(explain)?;
            issued(&consumer, &key);
        }
        RegistryKeysCommand::Rotate {
            consumer,
            grace,
            expires,
        } => {
            let grace = report::parse_since(&grace)?;
            let expires = expires.as_deref().map(instant).transpose()?;
            let (_, key) = registry
                .rotate(&consumer, grace, expires)
                .await
                .map_err(explain)?;
            issued(&consumer, &key);
        }
        RegistryKeysCommand::Revoke { consumer, key_id } => {
            registry.revoke(&consumer, &key_id).await.map_err(explain)?;
            say(&format!("key {key_id} of {consumer} revoked"));
        }
        RegistryKeysCommand::List { consumer } => {
            let all = registry.list(false).await.map_err(explain)?;
            let v = all
                .iter()
                .find(|v| v.id == consumer)
                .with_context(|| format!("consumer `{consumer}` does not exist"))?;
            print_keys(v);
        }
    }
    Ok(())
}
