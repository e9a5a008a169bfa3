//! The HTTP endpoint: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (serving),
//! `/status` (JSON for `watchpost status`), and the status page with its JSON
//! ([`crate::page`]). Loopback by default; read-only.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::error;

use crate::metrics::{self, Info};
use crate::shutdown::Signal;
use crate::stats::Stats;

/// The ingest loop goes round at least once a second; longer than this means it is stuck.
pub const INGEST_STALL_MS: u64 = 5_000;

/// What the handlers read.
pub struct Endpoint {
    /// The gateway's counters.
    pub stats: Arc<Stats>,
    /// Names and addresses.
    pub info: Info,
}

/// The status page and the login in front of it, if any.
pub type PageRoutes = (Arc<crate::page::Page>, Option<crate::page::Login>);

/// Serves until `shutdown`; with `page`, the status page too. `listener` is a TCP listener,
/// or [`TlsIncoming`] for HTTPS.
pub async fn serve<L>(
    listener: L,
    endpoint: Arc<Endpoint>,
    page: Option<PageRoutes>,
    shutdown: Signal,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let mut app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state(endpoint);
    if let Some((page, login)) = page {
        app = app.merge(crate::page::routes(page, login));
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.wait())
        .await
    {
        error!(error = %e, "the HTTP endpoint stopped");
    }
}

async fn metrics_text(State(e): State<Arc<Endpoint>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&e.stats, &e.info),
    )
}

/// 200 `ready` while serving; 200 `degraded` (still serving) with the data directory full or
/// the upstream down; 503 when ingest has stopped going round.
async fn ready(State(e): State<Arc<Endpoint>>) -> (StatusCode, String) {
    let beat = Stats::get(&e.stats.ingest_heartbeat_ms);
    if crate::stats::monotonic_ms().saturating_sub(beat) > INGEST_STALL_MS {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: ingest is not making progress\n".into(),
        );
    }
    if e.stats.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::OK,
            format!(
                "degraded: the data directory's file system is full: history is shed ({} rows so far); readings are judged and alerts and the outbox go on in the reserve\n",
                Stats::get(&e.stats.history_shed)
            ),
        );
    }
    if let Some(p) = metrics::peer_status(&e.stats, &e.info) {
        let silent = p.heard_seconds_ago.is_none_or(|s| {
            s >= e
                .info
                .peer
                .as_ref()
                .map_or(10.0, |i| i.takeover_after.as_secs_f64())
        });
        if !p.mirror_up || silent {
            return (
                StatusCode::OK,
                format!(
                    "degraded: the peer gateway {} at {} is not reachable or silent: this gateway judges alone and keeps what it mirrors for it\n",
                    p.name, p.address
                ),
            );
        }
        if p.alerts_differ_seconds >= crate::peer::DIVERGENCE_AFTER.as_secs_f64() {
            return (
                StatusCode::OK,
                format!(
                    "degraded: the peer gateway {}'s raised alerts have differed from this one's for {:.0} s\n",
                    p.name, p.alerts_differ_seconds
                ),
            );
        }
    }
    let up = e
        .stats
        .uplink_connected
        .load(std::sync::atomic::Ordering::Relaxed);
    match (&e.info.upstream, up) {
        (Some(u), false) => (
            StatusCode::OK,
            format!("degraded: serving locally, but the upstream {u} is not acknowledging\n"),
        ),
        _ => (StatusCode::OK, "ready\n".into()),
    }
}

async fn status(State(e): State<Arc<Endpoint>>) -> axum::Json<metrics::Status> {
    axum::Json(metrics::status(&e.stats, &e.info))
}

/// HTTPS connections, handshaken: each TLS handshake runs in a task of its own (at most
/// [`TLS_HANDSHAKE`] long), so that a slow or silent client holds no one else up.
pub struct TlsIncoming {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// How long a client has for its TLS handshake.
pub const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

impl TlsIncoming {
    /// Accepts on `listener` and shakes hands with `acceptor`.
    pub fn new(
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<TlsIncoming> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        error!(error = %e, "cannot accept an HTTPS connection; retrying in 100 ms");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsIncoming { ready, local, task })
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task ended: the gateway is stopping.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A plain HTTP/1.1 GET on `addr`; returns the status code and body. For `watchpost status`.
pub fn get_blocking(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_owned()))
}
