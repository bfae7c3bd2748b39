//! The whole configuration file: each section is owned by the crate it configures; this only
//! composes them and loads file < environment (`TOLLGATE__SECTION__KEY`) < command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use tollgate_aoai_sim::SimConfig;
use tollgate_log_parser::ParserConfig;
use tollgate_logging_proxy::ProxyConfig;
use tollgate_store::StoreConfig;

/// Prefix of environment overrides; `__` separates nesting levels.
pub(crate) const ENV_PREFIX: &str = "TOLLGATE__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `RUST_LOG`-style filter for Tollgate's own logs.
    #[serde(default = "default_filter")]
    pub(crate) filter: String,
    /// Log as JSON lines instead of text.
    #[serde(default)]
    pub(crate) json: bool,
}

fn default_filter() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: default_filter(),
            json: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Address the proxy listens on.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Address `tollgate sim` listens on (`tollgate up` picks a free loopback port).
    #[serde(default = "default_sim_listen")]
    pub(crate) sim_listen: SocketAddr,
    /// How long shutdown waits for open requests to finish before giving up on them.
    #[serde(default = "default_shutdown_grace_ms")]
    pub(crate) shutdown_grace_ms: u64,
    #[serde(default)]
    pub(crate) store: StoreConfig,
    #[serde(default)]
    pub(crate) proxy: ProxyConfig,
    #[serde(default)]
    pub(crate) parser: ParserConfig,
    #[serde(default)]
    pub(crate) sim: SimConfig,
    #[serde(default)]
    pub(crate) log: LogConfig,
    /// Where this process keeps its local state (the proxy's spool and journal): the embedded
    /// store's directory, or `--data-dir` / `./data` next to a Cosmos DB store.
    #[serde(skip)]
    pub(crate) local_dir: PathBuf,
    /// The file this configuration was read from, read again on a reload.
    #[serde(skip)]
    pub(crate) source: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_sim_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_shutdown_grace_ms() -> u64 {
    30_000
}

/// Loads and validates the configuration.
pub(crate) fn load(path: Option<&Path>, data_dir: Option<&PathBuf>) -> anyhow::Result<Config> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.exists() {
            bail!("configuration file {} does not exist", path.display());
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
    let mut config: Config = figment.extract().context("configuration is invalid")?;
    if let (Some(dir), StoreConfig::Embedded { data_dir, .. }) = (data_dir, &mut config.store) {
        *data_dir = dir.clone();
    }
    config.local_dir = match (&config.store, data_dir) {
        (StoreConfig::Embedded { data_dir, .. }, _) => data_dir.clone(),
        (StoreConfig::Cosmos(_), Some(dir)) => dir.clone(),
        (StoreConfig::Cosmos(_), None) => PathBuf::from("./data"),
    };
    config.source = path.map(Path::to_path_buf);
    let mut problems = Vec::new();
    if let StoreConfig::Cosmos(c) = &config.store {
        problems.extend(c.problems());
    }
    if let Err(p) = config.parser.validate() {
        problems.extend(p);
    }
    if let Err(p) = config.sim.validate() {
        problems.extend(p);
    }
    if !problems.is_empty() {
        bail!("configuration is invalid:\n  - {}", problems.join("\n  - "));
    }
    Ok(config)
}

#[cfg(test)]
/// Parses a TOML string as a whole configuration (used to check the example file).
pub(crate) fn parse_str(toml: &str) -> anyhow::Result<Config> {
    Ok(Figment::new().merge(Toml::string(toml)).extract()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configuration_parses_with_every_section() {
        let text = include_str!("../../../tollgate.example.toml");
        let config = parse_str(text).expect("tollgate.example.toml is valid");
        assert_eq!(config.listen, default_listen());
        assert!(!config.proxy.backends.is_empty());
        assert!(!config.proxy.consumers.is_empty());
        assert!(config.parser.validate().is_ok());
        assert!(config.sim.validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(parse_str("listn = \"127.0.0.1:1\"").is_err());
        assert!(parse_str("[proxy]\nbackend = []").is_err());
    }
}
