//! Runs the services: proxy, parser, and (when no backend is configured) the simulator, in
//! one process for `tollgate up`, or one of them for `tollgate proxy|parser|sim`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_aoai_sim::Simulator;
use tollgate_log_parser::{OtlpSink, Parser, RecordSink, StoreSink};
use tollgate_logging_proxy::config::{BackendConfig, ConsumerConfig};
use tollgate_logging_proxy::{FlushHook, Proxy, ProxyDeps, ReloadHook};
use tollgate_store::{ChangeFeed, RawWriter, RequestStore};
use tollgate_telemetry::{OtlpConfig, UsageExporter};

use crate::config::Config;
use crate::keys;
use crate::output::say;

/// The key of the demo consumer `tollgate up` creates when none is configured.
pub(crate) const DEMO_KEY: &str = "tollgate-demo-key";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts {
    pub(crate) proxy: bool,
    pub(crate) parser: bool,
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Reads the proxy section of `path` again, as at start (environment overrides included).
fn reload_hook(path: PathBuf) -> ReloadHook {
    Arc::new(move || {
        crate::config::load(Some(&path), None)
            .map(|c| c.proxy)
            .map_err(|e| without_quoted_source(&format!("{e:#}")))
    })
}

/// A configuration error without the lines of the file a parse error quotes (`4 | api_key =
/// "…`, and the `|` lines around it), which may hold a key: the error goes to a log line and
/// to the admin caller. Where the error is (line, column) and what it is stay.
fn without_quoted_source(error: &str) -> String {
    error
        .lines()
        .map(str::trim)
        .filter(|l| {
            let quoted = l
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !l.is_empty() && !quoted.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Applies the configuration file again on each SIGHUP (as `POST /tollgate/admin/reload`
/// does), until `stop`.
async fn reload_on_hangup(proxy: Arc<Proxy>, read: ReloadHook, stop: CancellationToken) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                got = hangups.recv() => if got.is_none() { return },
                () = stop.cancelled() => return,
            }
            match read().and_then(|c| proxy.reload(&c).map_err(|e| e.to_string())) {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "Reload on SIGHUP refused; the running configuration is kept.")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (proxy, read);
        stop.cancelled().await;
    }
}

async fn start_sim(
    sim: Simulator,
    listen: SocketAddr,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let router = sim.router();
    tracker.spawn(async move {
        let served = axum::serve(
            listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router,
        )
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Simulator server failed.");
        }
    });
    Ok(addr)
}

/// Serves the admin API on its own listener until `stop`.
async fn serve_admin(
    router: axum::Router,
    listen: SocketAddr,
    background: &TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (proxy.admin.listen)"))?;
    let addr = listener.local_addr()?;
    background.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Admin server failed.");
        }
    });
    Ok(addr)
}

/// `tollgate sim`: the simulator alone, until a signal.
pub(crate) async fn sim(config: Config) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let sim = Simulator::new(config.sim.clone())?;
    let addr = start_sim(sim, config.sim_listen, &tracker, cancel.clone()).await?;
    say(&format!("simulator listening on http://{addr}"));
    shutdown_signal().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

pub(crate) async fn run(mut config: Config, parts: Parts) -> anyhow::Result<()> {
    let data_dir: PathBuf = config.local_dir.clone();
    // Held until this function returns (and by the kernel until the process dies).
    let _lock = lock_local_dir(&data_dir)?;
    let store = tollgate_store::open(&config.store)
        .await
        .context("store could not be opened")?;
    let background = TaskTracker::new();
    let sim_cancel = CancellationToken::new();
    let mut sim_addr = None;
    let mut demo_key = None;

    // A reload reads the file again; not offered when the backends are the bundled simulator
    // this process made up, which the file does not describe.
    let reload_hook = match &config.source {
        Some(path) if !config.proxy.backends.is_empty() => Some(reload_hook(path.clone())),
        _ => None,
    };
    if parts.proxy && config.proxy.backends.is_empty() {
        let mut sim_config = config.sim.clone();
        let sim_key = sim_config.api_key.get_or_insert_with(keys::new_key).clone();
        let sim = Simulator::new(sim_config)?;
        let addr = start_sim(
            sim,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &background,
            sim_cancel.clone(),
        )
        .await?;
        config.proxy.backends.push(BackendConfig {
            name: "aoai-sim".into(),
            endpoint: format!("http://{addr}"),
            api_key: Some(sim_key.into()),
            deployments: config
                .sim
                .deployments
                .iter()
                .map(|d| d.name.clone())
                .collect(),
            ..Default::default()
        });
        for d in &config.sim.deployments {
            config
                .parser
                .deployment_models
                .entry(d.name.clone())
                .or_insert_with(|| d.model.clone());
        }
        if config.proxy.consumers.is_empty() {
            config.proxy.consumers.push(ConsumerConfig {
                id: "demo".into(),
                key_sha256: vec![keys::hash(DEMO_KEY)],
                ..Default::default()
            });
            demo_key = Some(DEMO_KEY);
        }
        sim_addr = Some(addr);
    }

    let exporter = match OtlpConfig::from_env(|k| std::env::var(k).ok(), "tollgate-log-parser")? {
        Some(c) if parts.parser => Some(Arc::new(UsageExporter::new(&c)?)),
        _ => None,
    };
    let parser = if parts.parser {
        let mut sinks: Vec<Arc<dyn RecordSink>> = vec![Arc::new(StoreSink::new(
            store.clone() as Arc<dyn RequestStore>
        ))];
        if let Some(e) = &exporter {
            sinks.push(Arc::new(OtlpSink::new(e.clone())));
        }
        let mut parser_config = config.parser.clone();
        if parser_config.replica_id.is_none() {
            parser_config.replica_id = Some(replica_id(&data_dir)?);
        }
        Some(Arc::new(Parser::new(
            parser_config,
            store.clone() as Arc<dyn ChangeFeed>,
            sinks,
        )?))
    } else {
        None
    };
    let parser_cancel = CancellationToken::new();
    if let Some(p) = &parser {
        let p = p.clone();
        let cancel = parser_cancel.clone();
        background.spawn(async move { p.run(cancel).await });
    }

    let mut proxy_server = None;
    if parts.proxy {
        let hook: Option<FlushHook> = parser.clone().map(|p| {
            let hook: FlushHook = Arc::new(move || {
                let p = p.clone();
                Box::pin(async move {
                    if let Err(e) = p.catch_up().await {
                        tracing::warn!(error = %e, "Parser catch-up after flush failed.");
                    }
                })
            });
            hook
        });
        let proxy = Proxy::build(
            &config.proxy,
            ProxyDeps {
                store: store.clone() as Arc<dyn RawWriter>,
                registry: Some(store.clone() as Arc<dyn tollgate_store::Store>),
                data_dir: data_dir.clone(),
                after_flush: hook,
                reload: reload_hook.clone(),
            },
        )?;
        // Registered consumers work from the first request; a store that cannot be read now
        // leaves the file's consumers, and the poll goes on trying.
        if let Err(e) = proxy.load_registry().await {
            tracing::warn!(error = %e, "The consumer registry could not be read at start; only the configuration file's consumers work until it can.");
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let server_cancel = CancellationToken::new();
        let admin_addr = match proxy.admin_listen() {
            Some(listen) => Some(
                serve_admin(
                    proxy.admin_router(),
                    listen,
                    &background,
                    server_cancel.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let proxy = Arc::new(proxy);
        let server = proxy.clone();
        let stop = server_cancel.clone();
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let handle = background.spawn(async move { server.serve(listener, stop, grace).await });
        if let Some(read) = reload_hook {
            background.spawn(reload_on_hangup(proxy.clone(), read, parser_cancel.clone()));
        }
        proxy_server = Some((proxy, server_cancel, handle));
        let deployments: Vec<String> = config
            .sim
            .deployments
            .iter()
            .map(|d| d.name.clone())
            .collect();
        if let Some(a) = admin_addr {
            say(&format!("admin API on http://{a}/tollgate/admin/consumers"));
        }
        banner(
            addr,
            sim_addr,
            demo_key,
            &data_dir,
            exporter.is_some(),
            &deployments,
        );
    } else {
        say("parser running");
    }

    shutdown_signal().await;
    tracing::info!("Shutting down: draining requests and records.");
    // One grace period for everything: connections get it to finish (the server closes what
    // is left at its end), exchanges and drains get what remains of it.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.shutdown_grace_ms);
    if let Some((proxy, server_cancel, handle)) = proxy_server {
        server_cancel.cancel();
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "Proxy server failed."),
            Err(e) => tracing::error!(error = %e, "Proxy server task failed."),
        }
        proxy.shutdown(deadline).await;
    }
    parser_cancel.cancel();
    sim_cancel.cancel();
    background.close();
    background.wait().await;
    if let Some(e) = exporter {
        tokio::task::spawn_blocking(move || e.shutdown()).await??;
    }
    say("stopped");
    Ok(())
}

fn banner(
    addr: SocketAddr,
    sim: Option<SocketAddr>,
    demo_key: Option<&str>,
    data_dir: &std::path::Path,
    otlp: bool,
    deployments: &[String],
) {
    say(&format!("listening on http://{addr}"));
    if let Some(sim) = sim {
        say(&format!(
            "simulator on http://{sim} (deployments: {})",
            deployments.join(", ")
        ));
    }
    say(&format!("store: embedded, {}", data_dir.display()));
    say(&format!(
        "otlp export: {}",
        if otlp {
            "on"
        } else {
            "off (set OTEL_EXPORTER_OTLP_ENDPOINT)"
        }
    ));
    if let Some(key) = demo_key {
        say("");
        say("Try it:");
        say(&format!(
            "  curl -s http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\\n    -H 'api-key: {key}' -H 'content-type: application/json' \\\n    -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
        ));
        say("");
        say("  from openai import AzureOpenAI");
        say(&format!(
            "  client = AzureOpenAI(azure_endpoint=\"http://{addr}\", api_key=\"{key}\", api_version=\"2024-10-21\")"
        ));
        say(
            "  r = client.chat.completions.create(model=\"gpt-4o\", messages=[{\"role\": \"user\", \"content\": \"Hello\"}])",
        );
        say("  print(r.choices[0].message.content, r.usage)");
        say("");
        say(&format!(
            "Then: tollgate report --data-dir {}",
            data_dir.display()
        ));
    }
}

/// This parser replica's name, kept in its local state directory: a replica restarted on the
/// same directory (after a crash, a SIGKILL) takes its feed units back at once instead of
/// waiting for their leases to expire, and replicas on different directories never share one.
fn replica_id(dir: &std::path::Path) -> anyhow::Result<String> {
    let file = dir.join("parser-replica-id");
    match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = format!(
        "{}/{}",
        tollgate_log_parser::config::host_name(),
        uuid::Uuid::now_v7()
    );
    std::fs::write(&file, &id).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(id)
}

/// One process per local state directory: two would replay each other's journal and spool, and
/// share a parser replica name (both would read every feed unit). An advisory lock the kernel
/// drops when the process dies, so a restart after a crash or SIGKILL is never refused.
fn lock_local_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("tollgate.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another Tollgate process uses {} (its lock file is held); give each process its own --data-dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in review: a reload's error quoted the line of the file it failed on, key and all,
    /// into a log line and the admin caller's answer.
    #[test]
    fn a_parse_error_keeps_where_and_what_but_not_the_quoted_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[proxy]\n[[proxy.backends]]\nname = \"x\"\napi_key = \"sk-secret-abc\nendpoint = \"http://a\"\n",
        )
        .unwrap();
        let error = reload_hook(path)().unwrap_err();
        assert!(!error.contains("sk-secret"), "{error}");
        assert!(error.contains("line 4"), "{error}");
    }
}
