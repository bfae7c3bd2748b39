//! Serves the proxy's router on a listener with the connection-level limits `axum::serve` does
//! not offer (it runs hyper without a timer, so no header-read timeout can apply):
//!
//! - a header-read timeout (`header_read_timeout_ms`): a client that trickles its headers, or
//!   holds a kept-alive connection without sending the next request, is cut off;
//! - a cap on open connections in total and per client IP: a connection over either cap is
//!   closed on accept and counted;
//! - a client write timeout (`client_write_timeout_ms`, see `stall.rs`): a client that stops
//!   reading its response is cut off, and its request drained and recorded;
//! - `TCP_NODELAY`, and the client's address as `ConnectInfo` for the records;
//! - shutdown: stop accepting, let open connections finish within the grace period, then close
//!   whatever is left.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ProxyStats;
use crate::stall::WriteDeadline;

/// Connection-level limits, from `[proxy.limits]`.
#[derive(Debug, Clone)]
pub(crate) struct ServeLimits {
    pub header_read_timeout: Duration,
    pub client_write_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

/// Open connections, in total and per IP; a [`ConnectionSlot`] gives its place back on drop.
#[derive(Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

struct ConnectionSlot {
    connections: Arc<Mutex<Connections>>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

fn admit_connection(
    connections: &Arc<Mutex<Connections>>,
    ip: IpAddr,
    limits: &ServeLimits,
) -> Option<ConnectionSlot> {
    let mut c = connections.lock().unwrap_or_else(|e| e.into_inner());
    let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
    if c.total >= limits.max_connections || from_ip >= limits.max_connections_per_ip {
        return None;
    }
    c.total += 1;
    c.per_ip.insert(ip, from_ip + 1);
    Some(ConnectionSlot {
        connections: connections.clone(),
        ip,
    })
}

/// Serves until `stop` fires, then drains as described in the module doc.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stats: Arc<ProxyStats>,
    stop: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let force = CancellationToken::new();
    let tasks = TaskTracker::new();
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "Accepting a connection failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = admit_connection(&connections, addr.ip(), &limits) else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut r: axum::http::Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                r
            })
            .service(router.clone());
        let conn = http.serve_connection(
            TokioIo::new(WriteDeadline::new(stream, limits.client_write_timeout)),
            TowerToHyperService::new(service),
        );
        let conn = graceful.watch(conn);
        let force = force.clone();
        tasks.spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "Client connection ended with an error.");
                    }
                }
                () = force.cancelled() => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Open connections outlived the shutdown grace period; closing them.");
        force.cancel();
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}
