//! The part of the configuration that changes without a restart: consumers, backends and their
//! pools, and which deployments are left without usage injection. It is swapped whole on a
//! reload (`Proxy::reload`); a request keeps the snapshot it started with, so a backend
//! removed by a reload still serves the streams it was serving. The other sections (limits,
//! recorder, admin key) size what was built at start, and a reload that changes them is
//! refused.

use std::sync::Arc;

use crate::backend_auth::BackendAuth;
use crate::config::{Backend, LiveConfig};
use crate::pool::BackendState;

pub(crate) struct Live {
    pub config: LiveConfig,
    /// Each backend's state, index for index with `config.backends`.
    pub state: Vec<Arc<BackendState>>,
}

impl Live {
    /// The live configuration, each backend's state carried over from `previous` when a
    /// backend of the same name and endpoint was there (its rest, breaker and requests in
    /// flight go on counting); a new or moved backend starts fresh. An Entra ID identity the
    /// previous configuration had keeps its cached token.
    pub(crate) fn new(mut config: LiveConfig, previous: Option<&Live>) -> Live {
        if let Some(p) = previous {
            for b in &mut config.backends {
                let BackendAuth::Entra(token) = &b.auth else {
                    continue;
                };
                let kept = p.config.backends.iter().find_map(|old| match &old.auth {
                    BackendAuth::Entra(t) if t.config() == token.config() => Some(t.clone()),
                    _ => None,
                });
                if let Some(kept) = kept {
                    b.auth = BackendAuth::Entra(kept);
                }
            }
        }
        let state = config
            .backends
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| {
                        p.config
                            .backends
                            .iter()
                            .zip(&p.state)
                            .find(|(old, _)| old.name == b.name && old.endpoint == b.endpoint)
                            .map(|(_, s)| s.clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        if let Some(keeper) = config.stateful {
            let mut without: Vec<&String> = config
                .routes
                .iter()
                .filter(|(_, pool)| !pool.contains(&keeper))
                .map(|(d, _)| d)
                .collect();
            if !without.is_empty() {
                without.sort();
                // Stored Responses and chat completions stay on the stateful backend only where
                // it serves the deployment; elsewhere they are balanced, and a later call on
                // their id may reach a resource that does not have them.
                tracing::warn!(
                    deployments = ?without,
                    "These deployments' pools do not include the stateful backend: their stored responses cannot be read back by id reliably."
                );
            }
        }
        Live { config, state }
    }

    /// Backend `i` and its state.
    pub(crate) fn backend(&self, i: usize) -> Option<(&Backend, &Arc<BackendState>)> {
        Some((self.config.backends.get(i)?, self.state.get(i)?))
    }
}
