//! The accept loop: HTTP/1.1 with a header-read timeout and a cap on open
//! connections, so idle or slow clients on the provisioning network cannot
//! starve the API and HTTP boot of sockets.
//!
//! A connection waits for a slot before it is accepted (the kernel's
//! backlog holds the rest); a client that sends no complete request header
//! within [`Limits::header_timeout`] — a new connection, or one kept alive
//! between requests — is closed. Each request carries the TCP peer as
//! `ConnectInfo`.
//!
//! [`serve_tls`] is the same loop with a rustls handshake first: the
//! handshake holds a connection slot and must finish within the header
//! timeout too, so a client that opens TLS and stalls is closed like one
//! that never sends a header.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How many connections and how long a header may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 2048,
            header_timeout: Duration::from_secs(15),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// requests finish (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    accept_loop(listener, None, app, limits, shutdown).await
}

/// As [`serve`], over TLS with `config` (HTTP/1.1 inside).
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    accept_loop(listener, Some(acceptor), app, limits, shutdown).await
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let builder = {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            b
        };
        let svc = TowerToHyperService::new(svc);
        match &tls {
            None => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                let watcher = graceful.watcher();
                let timeout = limits.header_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            if let Err(e) = watcher.watch(conn).await {
                                tracing::debug!(%peer, error = %e, "connection ended");
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("open connections did not finish in 10 s; stopping anyway");
        }
    }
}

/// Raises this process's soft open-files limit to its hard limit (a server
/// with many clients needs more than the default 1024).
pub fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        let want = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, want) {
            tracing::warn!(error = %e, "raising the open-files limit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::SocketAddr;

    fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_time_out_and_never_starve_a_real_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/x",
            axum::routing::get(|ConnectInfo(p): ConnectInfo<SocketAddr>| async move {
                format!("peer {}", p.ip())
            }),
        );
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_millis(500),
        };
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        let answer = tokio::task::spawn_blocking(move || {
            // Fill every slot with clients that never send a header, one
            // of them half a header.
            let mut idle: Vec<std::net::TcpStream> = (0..4)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            idle[0].write_all(b"GET /x HTTP/1.1\r\nHo").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let answer = get(addr);
            // The server closed the idle ones (read returns 0 or an error).
            let mut buf = [0u8; 1];
            let closed = idle
                .iter_mut()
                .all(|s| matches!(s.read(&mut buf), Ok(0) | Err(_)));
            (answer, closed)
        })
        .await
        .unwrap();
        let (answer, closed) = answer;
        let answer = answer.unwrap();
        assert!(answer.contains("200 OK"), "{answer}");
        assert!(answer.contains("peer 127.0.0.1"), "{answer}");
        assert!(closed, "idle connections were kept open");
    }
}
