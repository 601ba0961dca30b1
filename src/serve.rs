//! Accepting connections for the main listener: a per-IP connection cap, a deadline for
//! each request head, an inactivity timeout, and graceful shutdown (stop accepting, let
//! requests in flight finish).
//!
//! Owns: the accept loop and the hyper HTTP/1 settings. Must not: look at requests (the
//! router and its edge middleware in [`crate::http`] do that, so every answer is a
//! problem with a request id), or trust `X-Forwarded-For` — the cap counts TCP peers, and
//! peers in `trusted_proxies` (a reverse proxy carries everyone's connections) are exempt.
//!
//! What hyper itself refuses never reaches the router and gets hyper's bare answer: a
//! request head beyond its ~400 KiB read buffer or with more than [`HYPER_MAX_HEADERS`]
//! headers (431), or a head not complete within `header_read_timeout` (the connection is
//! closed). The edge's own limits (`max_header_bytes`, [`crate::http::MAX_HEADERS`]) sit
//! well below those, so the 431 a client normally sees is a problem document.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Headers hyper parses per request; above it hyper answers a bare 431. The edge refuses
/// more than [`crate::http::MAX_HEADERS`] with a problem first.
pub const HYPER_MAX_HEADERS: usize = 256;

/// The connection limits, from the config.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_per_ip: u32,
    pub exempt: Vec<IpNet>,
}

impl ConnLimits {
    pub fn from_config(config: &crate::Config) -> ConnLimits {
        ConnLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_per_ip: config.max_connections_per_ip,
            exempt: config.trusted_proxies.clone(),
        }
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then waits for the open
/// connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: CancellationToken,
) {
    let counts = PerIp::default();
    // Every connection task holds a receiver; when all are gone, the drain is complete.
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.cancelled() => break,
                }
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let slot = if limits.max_per_ip == 0 || limits.exempt.iter().any(|n| n.contains(&ip)) {
            None
        } else {
            match counts.enter(ip, limits.max_per_ip) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%ip, "connection refused: too many open from this address");
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, router, &limits, stop).await;
            drop(slot);
            drop(close_rx);
        });
    }
    drop(listener);
    drop(close_rx);
    close_tx.closed().await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: &ConnLimits,
    stop: CancellationToken,
) {
    let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_headers(HYPER_MAX_HEADERS);
    builder.header_read_timeout(Some(limits.header_read_timeout).filter(|d| !d.is_zero()));
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Open connections per peer address.
#[derive(Clone, Default)]
struct PerIp(Arc<Mutex<HashMap<IpAddr, u32>>>);

impl PerIp {
    fn enter(&self, ip: IpAddr, max: u32) -> Option<PerIpSlot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpSlot {
            counts: self.clone(),
            ip,
        })
    }
}

/// Gives its connection's place back when the connection ends.
struct PerIpSlot {
    counts: PerIp,
    ip: IpAddr,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut map = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A stream that fails with `TimedOut` once nothing was read or written for `timeout`
/// while the connection waits on it: idle keep-alive connections, stalled bodies, and
/// clients that stop reading their response are all closed. A zero timeout disables it.
struct IdleTimeout<T> {
    inner: T,
    timeout: Option<Duration>,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleTimeout<T> {
    fn new(inner: T, timeout: Duration) -> IdleTimeout<T> {
        let timeout = Some(timeout).filter(|d| !d.is_zero());
        // Without a timeout the sleep is never polled, so its deadline does not matter.
        let first = Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    fn touch(&mut self) {
        if let Some(t) = self.timeout {
            self.deadline.as_mut().reset(Instant::now() + t);
        }
    }

    /// Called when the inner stream is not ready: an error once the deadline passed.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.timeout.is_none() {
            return Poll::Pending;
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for longer than idle_timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future as _;

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let counts = PerIp::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = counts.enter(a, 2).expect("first");
        let s2 = counts.enter(a, 2).expect("second");
        assert!(counts.enter(a, 2).is_none(), "third from the same address");
        let other = counts
            .enter(b, 2)
            .expect("another address has its own count");
        drop(s1);
        let s3 = counts.enter(a, 2).expect("a place was given back");
        drop((s2, s3, other));
        assert!(
            counts.0.lock().unwrap().is_empty(),
            "no entries left behind"
        );
    }
}
