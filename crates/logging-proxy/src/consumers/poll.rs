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

/// Reads the registry once and applies it when it changed; whether it did. One refresh at a
/// time, from the read to the swap: a read that started before a change must not be applied
/// after a read that saw the change (a revoked key would work again until the next poll).
pub(crate) async fn refresh(
    app: &AppState,
    store: &dyn ConsumerRegistry,
) -> Result<bool, tollgate_store::StoreError> {
    let _reading = app.registry_reads.lock().await;
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
    let registered = super::registry::active_consumers(&stored, &last.1);
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

/// Polls until `cancel` fires.
pub(crate) async fn run(
    app: Arc<AppState>,
    store: Arc<dyn tollgate_store::Store>,
    cancel: CancellationToken,
) {
    let every = Duration::from_millis(app.config.registry.poll_ms);
    loop {
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

/// Reads budgeted consumers' month-to-date spend every `quotas.budget_refresh_ms`, and at
/// once when the set of budgeted consumers changes (a start, a new budget, a registry
/// change), until `cancel` fires. Its own task: the reads (one grouped query) never hold up
/// the registry's poll.
pub(crate) async fn spend(
    app: Arc<AppState>,
    store: Arc<dyn tollgate_store::Store>,
    cancel: CancellationToken,
) {
    let tick = Duration::from_millis(app.config.registry.poll_ms);
    let mut last: Option<(tokio::time::Instant, Vec<String>)> = None;
    loop {
        let mut budgeted: Vec<String> = app
            .directory
            .load()
            .limits
            .iter()
            .filter(|(_, l)| l.all.cost_per_month.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        budgeted.sort();
        let every = Duration::from_millis(app.live.load().config.quotas.budget_refresh_ms);
        let due = last
            .as_ref()
            .is_none_or(|(at, set)| at.elapsed() >= every || *set != budgeted);
        if due {
            if !budgeted.is_empty()
                && let Err(e) = app.spend.refresh(store.as_ref(), &budgeted).await
            {
                tracing::warn!(error = %e, "Budgeted consumers' spend could not be read; the last figures stay in force.");
            }
            last = Some((tokio::time::Instant::now(), budgeted));
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(tick.min(every)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use async_trait::async_trait;
    use tokio::sync::Notify;
    use tollgate_store::{ConsumerRegistry, StoreError, StoredConsumer};

    use super::refresh;
    use crate::auth::{Digest32, digest};
    use crate::consumers::registry::{ConsumerFields, Registry};

    /// A registry whose listing is read at once and handed back only when let go: a poll
    /// that read before a change and finishes after it.
    struct Slow {
        inner: Arc<dyn tollgate_store::Store>,
        read: Notify,
        go: Notify,
    }

    #[async_trait]
    impl ConsumerRegistry for Slow {
        async fn consumers(&self) -> Result<Vec<StoredConsumer>, StoreError> {
            let read = self.inner.consumers().await;
            self.read.notify_one();
            self.go.notified().await;
            read
        }
        async fn consumer(&self, id: &str) -> Result<Option<StoredConsumer>, StoreError> {
            self.inner.consumer(id).await
        }
        async fn put_consumer(
            &self,
            id: &str,
            document: &serde_json::Value,
            expected: Option<&str>,
        ) -> Result<Option<String>, StoreError> {
            self.inner.put_consumer(id, document, expected).await
        }
    }

    /// Defect (found in review): a poll that read the registry before a key was revoked, and
    /// finished after the revoking replica applied the change, put the key back until the next
    /// poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_begun_before_a_revocation_is_not_applied_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
            .await
            .unwrap();
        let proxy = crate::Proxy::build(
            &crate::ProxyConfig::default(),
            crate::ProxyDeps {
                store: store.clone(),
                registry: None,
                data_dir: dir.path().to_path_buf(),
                after_flush: None,
                reload: None,
            },
        )
        .unwrap();
        let app = proxy.state.clone();
        let registry = Registry::new(store.as_ref(), &[], "test");
        let (_, old) = registry
            .create("team", ConsumerFields::default(), None)
            .await
            .unwrap();
        let (_, new) = registry.add_key("team", None, None).await.unwrap();
        refresh(&app, store.as_ref()).await.unwrap();
        let works = |key: &str| {
            app.directory
                .load()
                .keys
                .contains_key(&Digest32(digest(key)))
        };
        assert!(works(&old.key) && works(&new.key));

        let slow = Arc::new(Slow {
            inner: store.clone(),
            read: Notify::new(),
            go: Notify::new(),
        });
        let tasks = tokio_util::task::TaskTracker::new();
        let poll = tasks.spawn({
            let (app, slow) = (app.clone(), slow.clone());
            async move { refresh(&app, slow.as_ref()).await }
        });
        slow.read.notified().await;
        registry.revoke("team", &old.key_id).await.unwrap();
        let mut applied = tasks.spawn({
            let (app, store) = (app.clone(), store.clone());
            async move { refresh(&app, store.as_ref()).await }
        });
        // The revoking replica's refresh may not finish while the slow read is under way (it
        // waits for it); without that order it finishes at once, and the slow read is then let
        // go after it. The wait bounds only how long that finish is given, not the outcome
        // of the correct order.
        let finished_first =
            tokio::time::timeout(std::time::Duration::from_millis(500), &mut applied).await;
        slow.go.notify_one();
        poll.await.unwrap().unwrap();
        match finished_first {
            Ok(done) => done.unwrap().unwrap(),
            Err(_) => applied.await.unwrap().unwrap(),
        };
        assert!(!works(&old.key), "the revoked key came back");
        assert!(works(&new.key));
        proxy.shutdown(tokio::time::Instant::now()).await;
    }
}
