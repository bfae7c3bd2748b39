//! Brings the registry's changes to this replica: every `poll_ms` the registered consumers are
//! read and, when any version changed, the directory is rebuilt (file's consumers joined by
//! the registry's) and swapped in. A revoked key therefore stops working everywhere within
//! one interval (plus the read's time); a replica that cannot read the store keeps the last
//! directory it built and says so in metrics.
//!
//! The whole list is read each time: registered consumers are few and small (Cosmos DB: one
//! cross-partition query of the `leases` container, a few RU for a hundred consumers), and a
//! full read has no change stream to lose.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::ConsumerRegistry;

use crate::AppState;

/// What the last successful read saw: each document's id and version.
pub(crate) type Seen = Vec<(String, String)>;

/// Reads the registry once and applies it when it changed; whether it did.
pub(crate) async fn refresh(
    app: &AppState,
    store: &dyn ConsumerRegistry,
) -> Result<bool, tollgate_store::StoreError> {
    let stored = match store.consumers().await {
        Ok(s) => s,
        Err(e) => {
            app.registry_status.errors.fetch_add(1, Ordering::Relaxed);
            app.registry_status.up.store(false, Ordering::Relaxed);
            return Err(e);
        }
    };
    app.registry_status.up.store(true, Ordering::Relaxed);
    let seen: Seen = stored
        .iter()
        .map(|s| (s.id.clone(), s.version.clone()))
        .collect();
    let registered = super::registry::active_consumers(&stored);
    let _one_at_a_time = app
        .reloading
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut last = app
        .registered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.0 == seen {
        return Ok(false);
    }
    let directory = app
        .live
        .load()
        .config
        .consumers
        .with_registered(&registered);
    app.directory.store(Arc::new(directory));
    *last = (seen, Arc::new(registered));
    Ok(true)
}

/// Polls until `cancel` fires; reads budgeted consumers' spend every `budget_refresh_ms` too.
pub(crate) async fn run(
    app: Arc<AppState>,
    store: Arc<dyn tollgate_store::Store>,
    cancel: CancellationToken,
) {
    let every = Duration::from_millis(app.config.registry.poll_ms);
    let spend_every = Duration::from_millis(app.live.load().config.quotas.budget_refresh_ms);
    let mut spend_read: Option<tokio::time::Instant> = None;
    loop {
        if spend_read.is_none_or(|t| t.elapsed() >= spend_every) {
            let budgeted: Vec<String> = app
                .directory
                .load()
                .limits
                .iter()
                .filter(|(_, l)| l.all.cost_per_month.is_some())
                .map(|(id, _)| id.clone())
                .collect();
            if let Err(e) = app.spend.refresh(store.as_ref(), &budgeted).await {
                tracing::warn!(error = %e, "Budgeted consumers' spend could not be read; the last figures stay in force.");
            }
            spend_read = Some(tokio::time::Instant::now());
        }
        match refresh(&app, store.as_ref()).await {
            Ok(true) => tracing::info!("Consumer registry changes applied."),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "The consumer registry could not be read; the last consumers read stay in force.");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
