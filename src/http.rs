//! The admin port: `/healthz` (the process runs), `/readyz` (the role is up: the controller holds or
//! waits for its lease, the agent reached OVSDB), `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the admin endpoints.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], admin.metrics.encode())
}

/// Opens the admin port, before anything else starts, so that a port already taken is one clear
/// start-up error that names the address and the flag (`flag`) that sets it.
pub async fn listen(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => "; another process (a second agent or controller on this host?) uses it",
            std::io::ErrorKind::PermissionDenied => "; ports below 1024 need a privilege crosstrace does not ask for",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {addr} for /healthz, /readyz and /metrics (set by {flag}): {e}{hint}")
    })
}

/// Serves the admin endpoints on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, admin: Admin) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoints listening");
    }
    axum::serve(listener, app).await
}

/// Why a spawned admin server ended, as one line.
pub fn stopped(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("the admin server stopped"),
        Ok(Err(e)) => anyhow::anyhow!("the admin server failed: {e}"),
        Err(e) => anyhow::anyhow!("the admin server task ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_in_use_is_one_line_naming_the_address_and_the_flag() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = listen(addr, "--admin-addr").await.unwrap_err();
        let line = format!("{error:#}");
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains(&addr.to_string()) && line.contains("--admin-addr"), "{line}");
        assert!(line.contains("another process"), "{line}");
    }
}
