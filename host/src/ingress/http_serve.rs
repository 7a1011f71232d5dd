//! The accept loop of the two HTTP servers. axum 0.8's `serve` gives hyper no timer, so a
//! client that opens connections and never finishes its request headers held each one for as
//! long as it liked: 400 such connections stayed open past 35 s in a test walk. Here hyper
//! gets a timer and a header read timeout, and shutdown stays graceful: the listener closes,
//! and requests in flight finish.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a connection may take to send a request's headers, the first request's or the
/// next one's on a kept-alive connection: hyper's timer runs whenever it waits for headers,
/// so this is also how long an idle kept-alive connection stays open. 75 s, longer than the
/// 60 s idle timeout of common proxies (ALB, nginx upstreams), so a proxy never reuses a
/// connection this server is closing; a client's headers arrive in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// How long shutdown waits for requests in flight before it stops waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then drains the connections.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    serve_with(listener, app, shutdown, HEADER_READ_TIMEOUT).await;
}

/// [`serve`] with another header read timeout (tests).
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    header_read_timeout: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // A client that gave up before its connection was accepted: nothing to do.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue;
            }
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin (and log) on it.
                tracing::warn!(error = %e, "accepting a connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection; not an error of ours.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain timeout; stopping anyway");
    }
}

/// `app` served on a loopback port by [`serve_with`], for unit tests that talk raw TCP to it.
#[cfg(test)]
pub(crate) struct TestServer {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(test)]
impl TestServer {
    pub async fn start(app: Router, header_read_timeout: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_with(listener, app, shutdown, header_read_timeout));
        Self { addr, stop, task }
    }

    /// Shuts the server down and waits for it (10 s at most).
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off_and_others_are_served() {
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = TestServer::start(app, Duration::from_millis(300)).await;
        let addr = server.addr;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        // Meanwhile a whole request is answered.
        let mut quick = tokio::net::TcpStream::connect(addr).await.unwrap();
        quick
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        quick.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        // The slow one is closed once the timeout passes (hyper may say 408 first).
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the half-sent request was still open after 10 s"
        );
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
        server.stop().await;
    }
}
