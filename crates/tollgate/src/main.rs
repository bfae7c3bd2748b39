//! `tollgate`: the command line. Parses arguments, loads configuration, runs a command.

mod config;
mod consumers;
mod keys;
mod output;
mod report;
mod run;

use std::path::PathBuf;

use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};
use tollgate_store::RecordQuery;

use crate::output::say;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A recording, metering gateway for Azure OpenAI"
)]
struct Cli {
    /// Configuration file (TOML); see tollgate.example.toml.
    #[arg(long, short, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Proxy + parser + embedded store in one process; starts the simulator when no backend
    /// is configured.
    Up {
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Data directory of the embedded store (overrides `store.data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The logging proxy alone.
    Proxy {
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The log parser alone.
    Parser {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The AOAI simulator alone.
    Sim {
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Usage by consumer, deployment/model and day (and serving backend with --by-backend).
    Report {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Window ending now, like 30d, 12h, 45m (ignored with --from).
        #[arg(long, default_value = "30d")]
        since: String,
        /// Window start: RFC 3339 or YYYY-MM-DD.
        #[arg(long)]
        from: Option<String>,
        /// Window end (exclusive): RFC 3339 or YYYY-MM-DD.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: report::Format,
        /// One row per serving backend (a pool's PTU and pay-as-you-go apart).
        #[arg(long)]
        by_backend: bool,
    },
    /// Consumer keys: new ones for the configuration file, and the registry's.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Consumers in the registry (the store): create, list, show, update, delete, audit.
    /// Running proxies apply changes within `proxy.registry.poll_ms`.
    Consumers {
        #[command(subcommand)]
        command: consumers::ConsumersCommand,
    },
    /// Loads and validates the configuration, opens the store, and probes each backend's
    /// deployments once (credential accepted, deployment exists; nothing is generated or
    /// billed); exits non-zero on problems.
    Check {
        /// Skip the backend probes (no network to the backends from here).
        #[arg(long)]
        no_probe: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Prints a new random key and the configuration entry holding its hash.
    New {
        #[arg(long, default_value = "my-app")]
        id: String,
    },
    /// Prints the SHA-256 of a key read from standard input (first line), for
    /// `proxy.consumers.key_sha256`. Never on the command line, where shell history and the
    /// process list would keep it.
    Hash,
    #[command(flatten)]
    Registry(consumers::RegistryKeysCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    match cli.command {
        Command::Up { listen, data_dir } => {
            let parts = run::Parts {
                proxy: true,
                parser: true,
            };
            services(path, data_dir, listen, parts).await
        }
        Command::Proxy { listen, data_dir } => {
            let parts = run::Parts {
                proxy: true,
                parser: false,
            };
            services(path, data_dir, listen, parts).await
        }
        Command::Parser { data_dir } => {
            let parts = run::Parts {
                proxy: false,
                parser: true,
            };
            services(path, data_dir, None, parts).await
        }
        Command::Sim { listen } => {
            let mut config = config::load(path, None)?;
            init_tracing(&config);
            if let Some(l) = listen {
                config.sim_listen = l;
            }
            run::sim(config).await
        }
        Command::Report {
            data_dir,
            since,
            from,
            to,
            consumer,
            deployment,
            format,
            by_backend,
        } => {
            let config = config::load(path, data_dir.as_ref())?;
            let store = tollgate_store::open_existing(&config.store)
                .await
                .context("store could not be opened")?;
            let to = to.as_deref().map(report::parse_time).transpose()?;
            let from = match from {
                Some(f) => Some(report::parse_time(&f)?),
                None => Some(to.unwrap_or_else(Utc::now) - report::parse_since(&since)?),
            };
            let query = RecordQuery {
                from,
                to,
                consumer,
                deployment,
                limit: None,
            };
            let report = report::build(store, query, by_backend).await?;
            report::print(&report, format)
        }
        Command::Keys { command } => {
            match command {
                KeysCommand::New { id } => {
                    let key = keys::new_key();
                    say(&format!("key: {key}"));
                    say("Give the key to the consumer; configure only its hash:");
                    say(&format!(
                        "[[proxy.consumers]]\nid = \"{id}\"\nkeys = [{{ sha256 = \"{}\", name = \"primary\" }}]",
                        keys::hash(&key)
                    ));
                }
                KeysCommand::Hash => say(&keys::hash(&keys::read_key(std::io::stdin().lock())?)),
                KeysCommand::Registry(command) => {
                    let config = config::load(path, None)?;
                    return consumers::keys(&config, command).await;
                }
            }
            Ok(())
        }
        Command::Consumers { command } => {
            let config = config::load(path, None)?;
            consumers::consumers(&config, command).await
        }
        Command::Check { no_probe } => {
            let config = config::load(path, None)?;
            check(&config, !no_probe).await
        }
    }
}

/// Loads the configuration, applies the flags, and runs the chosen services until a signal.
async fn services(
    path: Option<&std::path::Path>,
    data_dir: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    parts: run::Parts,
) -> anyhow::Result<()> {
    let mut config = config::load(path, data_dir.as_ref())?;
    init_tracing(&config);
    if let Some(l) = listen {
        config.listen = l;
    }
    Box::pin(run::run(config, parts)).await
}

async fn check(config: &config::Config, probe: bool) -> anyhow::Result<()> {
    // Validation only: building a proxy would open the spool and take over the journal files
    // of a `tollgate up` running on the same data directory.
    config.proxy.check()?;
    tollgate_store::open_existing(&config.store)
        .await
        .context("store healthcheck failed")?;
    say("configuration ok; store reachable");
    if !probe {
        return Ok(());
    }
    let probes = tollgate_logging_proxy::probe_backends(&config.proxy).await?;
    for p in &probes {
        let status = p.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let verdict = if p.ok { "ok" } else { "FAILED" };
        say(&format!(
            "backend {} deployment {}: {verdict} ({status}: {})",
            p.backend, p.deployment, p.finding
        ));
    }
    let failed = probes.iter().filter(|p| !p.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} backend probes failed", probes.len());
    }
    Ok(())
}

fn init_tracing(config: &config::Config) {
    tollgate_telemetry::init_tracing(&tollgate_telemetry::TracingConfig {
        filter: Some(std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.filter.clone())),
        json: config.log.json,
    });
}
