//! The etcd v3 registry: the only module that imports etcd-client.
//!
//! It knows flannel's key layout (`<prefix>/config`, `<prefix>/subnets/<key>`) and
//! offers the few operations the lease manager needs, each one RPC (or one
//! transaction): no per-key `TimeToLive` calls, unlike flannel, so a list of N leases
//! costs one RPC whatever N is.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};

use super::watch::RawLease;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid etcd TLS settings: {0}")]
    TlsSettings(String),
    #[error("cannot connect to etcd at {endpoints}: {source}{hint}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
        /// Empty, or "; " and what probably went wrong.
        hint: String,
    },
    #[error("etcd {op} failed: {source}")]
    Rpc {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op} timed out after {secs}s")]
    Timeout { op: &'static str, secs: u64 },
    #[error("etcd watch from revision {from} was compacted (compact revision {compact})")]
    Compacted { from: i64, compact: i64 },
    #[error("etcd watch was canceled: {0}")]
    WatchCanceled(String),
    #[error("etcd watch stream ended")]
    WatchEnded,
    #[error("etcd answered without a response header")]
    NoHeader,
}

/// How to reach etcd, from flanneld's `--etcd-*` flags.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log line.
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("cafile", &self.cafile)
            .field("certfile", &self.certfile)
            .field("keyfile", &self.keyfile)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Bound on every unary RPC, so a hung etcd is an error the caller can retry.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Result of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The write happened; the key now has this mod revision and etcd lease.
    Ok { mod_revision: i64, etcd_lease: i64 },
    /// The condition failed: the key exists (create) or changed (swap).
    Conflict,
}

/// One change seen by the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(RawLease),
    Delete { name: String, mod_revision: i64 },
}

/// RPCs sent by a [`Registry`] and its clones, by kind: for the control-plane bench.
/// Counted when sent, whatever the outcome; the connect probe is not counted.
#[derive(Debug, Default)]
pub struct RpcCounts {
    /// Single-key reads (`get config`, `get subnet`).
    pub get: AtomicU64,
    /// Full listings of the subnets prefix.
    pub list: AtomicU64,
    /// Keys-only listings (the periodic resync).
    pub list_keys: AtomicU64,
    /// Transactions (create, swap, conditional delete).
    pub txn: AtomicU64,
    pub grant: AtomicU64,
    pub revoke: AtomicU64,
    pub watch_create: AtomicU64,
}

impl RpcCounts {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as `(kind, count)`, in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, u64); 7] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("get", l(&self.get)),
            ("list", l(&self.list)),
            ("list keys-only", l(&self.list_keys)),
            ("txn", l(&self.txn)),
            ("lease grant", l(&self.grant)),
            ("lease revoke", l(&self.revoke)),
            ("watch create", l(&self.watch_create)),
        ]
    }

    pub fn total(&self) -> u64 {
        self.snapshot().iter().map(|(_, n)| n).sum()
    }
}

#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
    subnets: String,
    /// Shared by all clones.
    counts: Arc<RpcCounts>,
}

async fn timed<T>(
    op: &'static str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|source| EtcdError::Rpc { op, source }),
        Err(_) => Err(EtcdError::Timeout {
            op,
            secs: RPC_TIMEOUT.as_secs(),
        }),
    }
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::ReadFile {
        what,
        path: path.clone(),
        source,
    })
}

/// TLS is used when any TLS file is given or any endpoint is https. It then applies to
/// every endpoint: a plain http endpoint is refused rather than silently used.
fn connect_options(opts: &EtcdOptions) -> Result<ConnectOptions, EtcdError> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_require_leader(true);
    let any_https = opts.endpoints.iter().any(|e| e.starts_with("https://"));
    let any_file = opts.cafile.is_some() || opts.certfile.is_some() || opts.keyfile.is_some();
    if any_https || any_file {
        if let Some(plain) = opts.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(EtcdError::TlsSettings(format!(
                "TLS is configured but endpoint {plain} is not https://"
            )));
        }
        let Some(ca) = &opts.cafile else {
            return Err(EtcdError::TlsSettings(
                "https endpoints need --etcd-cafile to verify the server".into(),
            ));
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA file", ca)?));
        match (&opts.certfile, &opts.keyfile) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("certificate file", cert)?,
                    read("key file", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::TlsSettings(
                    "--etcd-certfile and --etcd-keyfile must be given together".into(),
                ));
            }
        }
        co = co.with_tls(tls);
    }
    match (&opts.username, &opts.password) {
        (Some(u), Some(p)) if !u.is_empty() => co = co.with_user(u.clone(), p.clone()),
        (Some(u), None) if !u.is_empty() => {
            return Err(EtcdError::TlsSettings(
                "--etcd-username is set without --etcd-password".into(),
            ));
        }
        _ => {}
    }
    Ok(co)
}

fn raw_lease(subnets: &str, kv: &KeyValue) -> Option<RawLease> {
    let name = kv.key().strip_prefix(subnets.as_bytes())?;
    Some(RawLease {
        name: String::from_utf8_lossy(name).into_owned(),
        value: kv.value().to_vec(),
        etcd_lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    })
}

impl Registry {
    /// Connects and proves the connection with one request, so that a wrong CA,
    /// certificate or password fails here with a clear error.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, EtcdError> {
        let co = connect_options(opts)?;
        let endpoints = opts.endpoints.join(",");
        let connect = Client::connect(opts.endpoints.clone(), Some(co));
        let client = match tokio::time::timeout(RPC_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                return Err(EtcdError::Connect {
                    endpoints,
                    source,
                    hint: String::new(),
                });
            }
            Err(_) => {
                return Err(EtcdError::Timeout {
                    op: "connect",
                    secs: RPC_TIMEOUT.as_secs(),
                });
            }
        };
        let prefix = opts.prefix.trim_end_matches('/').to_owned();
        let reg = Self {
            client,
            subnets: format!("{prefix}/subnets/"),
            prefix,
            counts: Arc::default(),
        };
        let mut kv = reg.client.kv_client();
        let probe = kv.get(
            format!("{}/config", reg.prefix),
            Some(GetOptions::new().with_count_only()),
        );
        match tokio::time::timeout(RPC_TIMEOUT, probe).await {
            Ok(Ok(_)) => Ok(reg),
            Ok(Err(source)) => {
                // etcd drops a TLS connection whose client certificate it rejects without
                // saying why; the client only sees the connection close.
                let closed = matches!(&source, etcd_client::Error::GRpcStatus(st)
                    if matches!(st.code(), tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown));
                let hint = if closed && opts.cafile.is_some() {
                    "; the server closed the TLS connection: it may require a client certificate \
                     (--etcd-certfile/--etcd-keyfile) or reject the one given as not signed by a CA it trusts"
                        .to_owned()
                } else {
                    String::new()
                };
                Err(EtcdError::Connect {
                    endpoints,
                    source,
                    hint,
                })
            }
            Err(_) => Err(EtcdError::Timeout {
                op: "connect",
                secs: RPC_TIMEOUT.as_secs(),
            }),
        }
    }

    /// The RPCs sent so far through this registry and all its clones.
    pub fn rpc_counts(&self) -> Arc<RpcCounts> {
        Arc::clone(&self.counts)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full etcd key of a subnet key name.
    pub fn subnet_key(&self, name: &str) -> String {
        format!("{}{name}", self.subnets)
    }

    /// The raw config value, or None when the key is missing.
    pub async fn get_config(&self) -> Result<Option<Vec<u8>>, EtcdError> {
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.get);
        let resp = timed(
            "get config",
            kv.get(format!("{}/config", self.prefix), None),
        )
        .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// All subnet keys and the revision of the listing.
    pub async fn list_subnets(&self) -> Result<(Vec<RawLease>, i64), EtcdError> {
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.list);
        let resp = timed(
            "list subnets",
            kv.get(self.subnets.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = resp.header().ok_or(EtcdError::NoHeader)?.revision();
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| raw_lease(&self.subnets, kv))
            .collect();
        Ok((leases, rev))
    }

    /// Names and mod revisions only: the cheap check of the periodic resync.
    pub async fn list_subnet_revisions(&self) -> Result<(Vec<(String, i64)>, i64), EtcdError> {
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.list_keys);
        let resp = timed(
            "list subnet keys",
            kv.get(
                self.subnets.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let rev = resp.header().ok_or(EtcdError::NoHeader)?.revision();
        let keys = resp
            .kvs()
            .iter()
            .filter_map(|kv| raw_lease(&self.subnets, kv).map(|r| (r.name, r.mod_revision)))
            .collect();
        Ok((keys, rev))
    }

    pub async fn get_subnet(&self, name: &str) -> Result<Option<RawLease>, EtcdError> {
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.get);
        let resp = timed("get subnet", kv.get(self.subnet_key(name), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| raw_lease(&self.subnets, kv)))
    }

    async fn grant(&self, ttl: Option<i64>) -> Result<i64, EtcdError> {
        match ttl {
            None => Ok(0),
            Some(ttl) => {
                let mut lc = self.client.lease_client();
                RpcCounts::bump(&self.counts.grant);
                Ok(timed("lease grant", lc.grant(ttl, None)).await?.id())
            }
        }
    }

    /// Best effort: an unused etcd lease expires by itself anyway.
    pub async fn revoke(&self, etcd_lease: i64) {
        if etcd_lease == 0 {
            return;
        }
        let mut lc = self.client.lease_client();
        RpcCounts::bump(&self.counts.revoke);
        if let Err(e) = timed("lease revoke", lc.revoke(etcd_lease)).await {
            tracing::debug!(etcd_lease, error = %e, "revoking an unused etcd lease failed");
        }
    }

    /// Writes `value` at the subnet key under a condition, attached to a fresh etcd lease
    /// of `ttl` seconds (None: no lease, a reservation). On conflict the fresh lease is
    /// revoked.
    async fn write_if(
        &self,
        op: &'static str,
        name: &str,
        cond: Compare,
        value: &str,
        ttl: Option<i64>,
    ) -> Result<Written, EtcdError> {
        let key = self.subnet_key(name);
        let etcd_lease = self.grant(ttl).await?;
        let put_opts = (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease));
        let txn = Txn::new().when([cond]).and_then([
            TxnOp::put(key.clone(), value, put_opts),
            TxnOp::get(key, None),
        ]);
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.txn);
        let resp = match timed(op, kv.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(etcd_lease).await;
                return Err(e);
            }
        };
        if !resp.succeeded() {
            self.revoke(etcd_lease).await;
            return Ok(Written::Conflict);
        }
        let rev = resp.header().ok_or(EtcdError::NoHeader)?.revision();
        let mod_revision = resp
            .op_responses()
            .iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(KeyValue::mod_revision),
                _ => None,
            })
            .unwrap_or(rev);
        Ok(Written::Ok {
            mod_revision,
            etcd_lease,
        })
    }

    /// Creates the key only if it does not exist (`version(key) == 0`).
    pub async fn create_subnet(
        &self,
        name: &str,
        value: &str,
        ttl: Option<i64>,
    ) -> Result<Written, EtcdError> {
        let cond = Compare::version(self.subnet_key(name), CompareOp::Equal, 0);
        self.write_if("create subnet", name, cond, value, ttl).await
    }

    /// Replaces the key only if it is unchanged since `mod_revision`: a renewal or an
    /// update of our own lease can never overwrite a node that took the subnet over.
    pub async fn swap_subnet(
        &self,
        name: &str,
        mod_revision: i64,
        value: &str,
        ttl: Option<i64>,
    ) -> Result<Written, EtcdError> {
        let cond = Compare::mod_revision(self.subnet_key(name), CompareOp::Equal, mod_revision);
        self.write_if("swap subnet", name, cond, value, ttl).await
    }

    /// Deletes the key only if it is unchanged since `mod_revision`.
    pub async fn delete_subnet_if(&self, name: &str, mod_revision: i64) -> Result<bool, EtcdError> {
        let key = self.subnet_key(name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut kv = self.client.kv_client();
        RpcCounts::bump(&self.counts.txn);
        Ok(timed("delete subnet", kv.txn(txn)).await?.succeeded())
    }

    /// Starts a watch of every subnet key from `from_revision` (inclusive).
    pub async fn watch_subnets(&self, from_revision: i64) -> Result<SubnetWatch, EtcdError> {
        let mut wc = self.client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision)
            .with_progress_notify();
        RpcCounts::bump(&self.counts.watch_create);
        let stream = timed("watch", wc.watch(self.subnets.clone(), Some(opts))).await?;
        Ok(SubnetWatch {
            stream,
            subnets: self.subnets.clone(),
            next_revision: from_revision,
        })
    }
}

/// A live watch on the subnets prefix.
pub struct SubnetWatch {
    stream: WatchStream,
    subnets: String,
    /// The first revision not yet delivered; where a reconnect resumes.
    next_revision: i64,
}

impl SubnetWatch {
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// The next batch of events (possibly empty: progress notifications advance the
    /// revision only).
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, EtcdError> {
        let resp = match self.stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(EtcdError::WatchEnded),
            Err(source) => {
                return Err(EtcdError::Rpc {
                    op: "watch",
                    source,
                });
            }
        };
        if resp.compact_revision() > 0 {
            return Err(EtcdError::Compacted {
                from: self.next_revision,
                compact: resp.compact_revision(),
            });
        }
        if resp.canceled() {
            return Err(EtcdError::WatchCanceled(resp.cancel_reason().to_owned()));
        }
        let mut out = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.next_revision = self.next_revision.max(kv.mod_revision() + 1);
            let Some(raw) = raw_lease(&self.subnets, kv) else {
                continue;
            };
            out.push(match ev.event_type() {
                EventType::Put => WatchEvent::Put(raw),
                EventType::Delete => WatchEvent::Delete {
                    name: raw.name,
                    mod_revision: raw.mod_revision,
                },
            });
        }
        // Progress notifications and empty responses carry the store revision: nothing
        // below it is still to come.
        if let Some(h) = resp.header()
            && out.is_empty()
            && !resp.created()
        {
            self.next_revision = self.next_revision.max(h.revision() + 1);
        }
        Ok(out)
    }
}
