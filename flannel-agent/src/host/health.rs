//! `/healthz` and `/readyz` on `--healthz-ip:--healthz-port`, with flannel's bodies,
//! plus `/metrics` (Prometheus) and `/status` (JSON, what `flanneld status` prints). The
//! same handler also serves a root-only local socket, so `flanneld status` works when
//! the health port is disabled (flannel's default).
//!
//! Two fixed answers do not need an HTTP stack: this is a minimal HTTP/1.x responder on a
//! tokio `TcpListener`. Every connection gets one response and is closed. Probes come from
//! kubelet or a load balancer, but the port may be reachable by anyone, so each connection
//! has a deadline, the request head is bounded, and the number of connections served at
//! once is capped; a client that misbehaves only loses its own connection.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};

use super::status::Status;

/// Largest request head we read; a probe's is under 200 bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Input read and discarded after answering, and for how long at most.
const MAX_DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;

pub const HEALTHZ_BODY: &str = "flanneld is running";
pub const READY_BODY: &str = "flanneld is ready";
pub const NOT_READY_BODY: &str = "flanneld is not ready yet";

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen for health checks on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on the status socket {path}: {source}")]
    BindUnix {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// State the health endpoints report. Shared between the daemon, which flips it, and the
/// server, which reads it.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    status: std::sync::RwLock<Status>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set once the rules are in place and subnet.env is written, as flannel does.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Publishes a new status snapshot for `/status` and `/metrics`.
    pub fn set_status(&self, status: Status) {
        // A poisoned lock only means a writer panicked mid-assignment of plain data.
        *self
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }

    /// The current snapshot, with the ready flag filled in.
    pub fn status(&self) -> Status {
        let mut s = self
            .status
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        s.ready = self.is_ready();
        s
    }
}

/// A bound, not yet serving, health listener; lets the caller learn the port first.
#[derive(Debug)]
pub struct HealthServer {
    listener: TcpListener,
    client_timeout: Duration,
}

impl HealthServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, HealthError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HealthError::Bind { addr, source })?;
        Ok(Self {
            listener,
            client_timeout: CLIENT_TIMEOUT,
        })
    }

    /// Changes the per-connection deadline (default 5 s).
    #[must_use]
    pub fn with_client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes. Connections in flight are left to finish on
    /// their own deadline.
    pub async fn run(self, health: Arc<Health>, shutdown: impl Future<Output = ()>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let client_timeout = self.client_timeout;
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let health = Arc::clone(&health);
                    tokio::spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(client_timeout, handle(stream, &health)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "health check connection failed");
                            }
                            Err(_) => tracing::debug!(%peer, "health check client timed out"),
                        }
                    });
                }
                Err(err) => {
                    // Usually EMFILE or ECONNABORTED; back off a little rather than spin.
                    tracing::warn!(error = %err, "cannot accept health check connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracing::debug!("health server stopped");
    }
}

/// Binds `addr` and serves `/healthz` and `/readyz` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HealthError> {
    let server = HealthServer::bind(addr).await?;
    tracing::info!(addr = %server.local_addr().unwrap_or(addr), "serving health checks");
    server.run(health, shutdown).await;
    Ok(())
}

/// Serves the same endpoints on a Unix socket at `path` (mode 0600: counters and the
/// node's lease are for root), replacing a stale socket file, until `shutdown`.
pub async fn serve_unix(
    path: &std::path::Path,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HealthError> {
    use std::os::unix::fs::PermissionsExt as _;
    let bind_err = |source| HealthError::BindUnix {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let health = Arc::clone(&health);
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(CLIENT_TIMEOUT, handle(stream, &health)).await;
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot accept status connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    health: &Health,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            break false;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // The client gave up; answer what we have if it holds a request line.
            break buf.contains(&b'\n');
        }
        buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST_BYTES - buf.len())]);
    };
    let response = if head_complete {
        respond(&buf, health)
    } else {
        Response::new(
            431,
            "Request Header Fields Too Large",
            "request too large",
            true,
        )
    };
    stream.write_all(response.to_bytes().as_slice()).await?;
    stream.shutdown().await?;
    // Closing with unread input makes the kernel send a reset, which can destroy the answer
    // before the client reads it; so read and discard a bounded amount first.
    let drain = async {
        let mut left = MAX_DRAIN_BYTES;
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    Ok(())
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: std::borrow::Cow<'static, str>,
    send_body: bool,
}

impl Response {
    fn new(
        status: u16,
        reason: &'static str,
        body: impl Into<std::borrow::Cow<'static, str>>,
        send_body: bool,
    ) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            send_body,
        }
    }

    fn typed(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if self.send_body {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Chooses the answer from the request head. Like Go's `http.HandleFunc` handlers in
/// flannel, any method gets the answer; HEAD gets it without a body.
fn respond(head: &[u8], health: &Health) -> Response {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Response::new(400, "Bad Request", "bad request", true);
    };
    if !version.starts_with("HTTP/1.") {
        return Response::new(400, "Bad Request", "bad request", true);
    }
    let send_body = method != "HEAD";
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match path {
        "/healthz" => Response::new(200, "OK", HEALTHZ_BODY, send_body),
        "/readyz" if health.is_ready() => Response::new(200, "OK", READY_BODY, send_body),
        "/readyz" => Response::new(503, "Service Unavailable", NOT_READY_BODY, send_body),
        "/metrics" => Response::new(200, "OK", health.status().prometheus(), send_body)
            .typed("text/plain; version=0.0.4; charset=utf-8"),
        "/status" => {
            Response::new(200, "OK", health.status().to_json(), send_body).typed("application/json")
        }
        _ => Response::new(404, "Not Found", "404 page not found", send_body),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        net::{TcpStream, UnixStream},
        sync::oneshot,
    };

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_millis(300);

    async fn start() -> (
        SocketAddr,
        Arc<Health>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let server = HealthServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_client_timeout(TEST_TIMEOUT);
        let addr = server.local_addr().unwrap();
        let health = Arc::new(Health::new());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(Arc::clone(&health), async move {
            let _ = rx.await;
        }));
        (addr, health, tx, task)
    }

    async fn request(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let resp = request(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        let status = resp[9..12].parse().unwrap();
        let body = resp.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn metrics_and_status_follow_the_published_snapshot() {
        let (addr, health, _stop, _task) = start().await;
        health.set_status(Status {
            subnet: "10.5.1.0/24".into(),
            dataplane: "kernel".into(),
            ..Status::default()
        });
        health.set_ready(true);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("subnet=\"10.5.1.0/24\""), "{body}");
        assert!(body.contains("flannel_ready 1"), "{body}");
        let (code, body) = get(addr, "/status").await;
        assert_eq!(code, 200);
        let st = Status::from_json(&body).unwrap();
        assert_eq!(st.dataplane, "kernel");
        assert!(st.ready);
    }

    #[tokio::test]
    async fn unix_socket_serves_status_to_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flanneld.sock");
        // A stale socket file from a killed daemon is replaced.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let health = Arc::new(Health::new());
        health.set_status(Status {
            subnet: "10.5.2.0/24".into(),
            ..Status::default()
        });
        let (p, h) = (path.clone(), Arc::clone(&health));
        tokio::spawn(async move { serve_unix(&p, h, std::future::pending()).await });
        let mut stream = loop {
            if let Ok(s) = UnixStream::connect(&path).await {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        stream
            .write_all(b"GET /status HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(Status::from_json(body).unwrap().subnet, "10.5.2.0/24");
    }

    #[tokio::test]
    async fn healthz_and_readyz() {
        let (addr, health, stop, task) = start().await;
        assert_eq!(get(addr, "/healthz").await, (200, HEALTHZ_BODY.to_owned()));
        assert_eq!(get(addr, "/readyz").await, (503, NOT_READY_BODY.to_owned()));
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await, (200, READY_BODY.to_owned()));
        assert_eq!(
            get(addr, "/readyz?verbose=1").await,
            (200, READY_BODY.to_owned())
        );
        assert_eq!(get(addr, "/").await.0, 404);

        let head = request(addr, b"HEAD /healthz HTTP/1.0\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Length: 19\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }

    #[tokio::test]
    async fn garbage_and_oversized_requests() {
        let (addr, _health, stop, _task) = start().await;
        let resp = request(addr, b"\x00\x01\x02 garbage\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");

        let mut huge = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES * 2));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before we finish writing; only its answer matters.
        let _ = s.write_all(&huge).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");

        // Still serving normally afterwards.
        assert_eq!(get(addr, "/healthz").await.0, 200);
        stop.send(()).unwrap();
    }

    #[tokio::test]
    async fn silent_client_is_dropped_without_blocking_others() {
        let (addr, _health, stop, _task) = start().await;
        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /hea").await.unwrap();
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let mut out = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut out))
            .await
            .expect("server closed the silent connection")
            .unwrap();
        assert_eq!(n, 0, "no answer to a client that sent nothing");
        assert!(started.elapsed() >= TEST_TIMEOUT);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out))
            .await
            .expect("server closed the slow connection")
            .unwrap();
        assert!(
            out.is_empty(),
            "a request that never completes gets no answer"
        );
        stop.send(()).unwrap();
    }

    #[tokio::test]
    async fn bind_error_names_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(addr, Arc::new(Health::new()), std::future::pending())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
