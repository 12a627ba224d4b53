//! Our lease and the peer watch, over the etcd [`Registry`].
//!
//! Differences from flannel, on purpose:
//! - a create race is retried instead of exiting;
//! - a key without an etcd lease is a reservation and never gets a TTL;
//! - renewal is a compare-and-swap on our key's mod revision, never a blind put;
//! - losing our key (deleted, or now naming another node) re-acquires, the same
//!   subnet first, instead of exiting;
//! - the watch resumes from the last revision seen, re-lists on compaction, and
//!   re-checks the key list every few minutes, all without an RPC per peer.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, error, info, warn};

use super::{
    Lease, LeaseAttrs, PeerEvent,
    alloc::{self, AllocError, Choice},
    etcd::{EtcdError, Registry, WatchEvent, Written},
    key::SubnetKey,
    watch::{Outcome, PeerSet, RawLease, decode},
};
use crate::config::Ipv4Range;

/// Attempts before giving up on a contended allocation. Every conflict means another
/// node won a subnet, so this bounds the work, not the cluster size.
const MAX_ATTEMPTS: usize = 64;
/// How often the key list is compared with what the watch delivered.
const RESYNC_PERIOD: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("failed to acquire a lease: {0} conflicting writes in a row")]
    TooManyConflicts(usize),
}

/// What our lease should be.
#[derive(Debug, Clone)]
pub struct LeaseSpec {
    pub range: Ipv4Range,
    pub attrs: LeaseAttrs,
    /// The subnet from the previous subnet.env, if any.
    pub previous: Option<Ipv4Net>,
    pub ttl: Duration,
    pub renew_margin: Duration,
}

impl LeaseSpec {
    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs())
            .unwrap_or(super::LEASE_TTL_SECS)
            .max(1)
    }

    fn public_ip(&self) -> Ipv4Addr {
        self.attrs.public_ip
    }
}

/// Our lease as held, with when it must be renewed.
#[derive(Debug, Clone)]
pub struct OwnLease {
    pub lease: Lease,
    /// None for a reservation: nothing to renew.
    pub renew_at: Option<Instant>,
}

impl OwnLease {
    fn new(lease: Lease, spec: &LeaseSpec) -> Self {
        let renew_at = (!lease.is_reservation())
            .then(|| Instant::now() + spec.ttl.saturating_sub(spec.renew_margin));
        Self { lease, renew_at }
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.lease.subnet()
    }
}

/// Messages from the manager to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerEvent {
    /// Incremental changes from the watch.
    Peers(Vec<PeerEvent>),
    /// The complete, validated peer set after a full listing (start, compaction,
    /// resync), sent after the matching `Peers` diff. Backends reconcile the kernel
    /// against it, which removes state of peers that left while we were not looking.
    Snapshot(Vec<Lease>),
    /// Our lease was lost and re-acquired; the subnet may differ.
    OwnLease(Lease),
}

fn raw_to_lease(raw: &RawLease, attrs: LeaseAttrs) -> Option<Lease> {
    Some(Lease {
        key: SubnetKey::parse(&raw.name).ok()?,
        attrs,
        etcd_lease: raw.etcd_lease,
        mod_revision: raw.mod_revision,
    })
}

/// Acquires a lease: reuse by PublicIP, then the previous subnet, then a random free one.
pub async fn acquire(reg: &Registry, spec: &LeaseSpec) -> Result<Lease, ManagerError> {
    let value = spec.attrs.to_json();
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            // Spread racing nodes apart.
            let ms = rand::random_range(10..(50 + 20 * attempt as u64));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let (raws, _) = reg.list_subnets().await?;
        let mut taken = Vec::with_capacity(raws.len());
        let mut leases = Vec::new();
        for raw in &raws {
            // A key with a garbage value still occupies its subnet.
            let Ok(key) = SubnetKey::parse(&raw.name) else {
                continue;
            };
            taken.push(key.ipv4);
            if let Ok(l) = decode(&spec.range, raw) {
                leases.push(l);
            }
        }
        let mut stale = Vec::new();
        let choice = alloc::choose(
            &spec.range,
            &taken,
            &leases,
            spec.public_ip(),
            spec.previous,
            &mut rand::rng(),
            &mut stale,
        );
        for l in stale.iter().filter(|l| !l.is_reservation()) {
            info!(subnet = %l.subnet(), "deleting our old lease, which no longer fits the config");
            reg.delete_subnet_if(&l.key.to_string(), l.mod_revision)
                .await?;
        }
        let choice = choice?;
        let name = SubnetKey::v4(choice.subnet()).to_string();
        let written = match &choice {
            Choice::Reuse(l) => {
                // A reservation stays one: no TTL.
                let ttl = (!l.is_reservation()).then(|| spec.ttl_secs());
                info!(subnet = %l.subnet(), reservation = l.is_reservation(), "found a lease with our PublicIP, reusing it");
                reg.swap_subnet(&name, l.mod_revision, &value, ttl).await?
            }
            Choice::Previous(n) => {
                info!(subnet = %n, "found previously leased subnet, reusing");
                reg.create_subnet(&name, &value, Some(spec.ttl_secs()))
                    .await?
            }
            Choice::Fresh(n) => {
                info!(subnet = %n, min = %spec.range.subnet_min, max = %spec.range.subnet_max, "picked a subnet");
                reg.create_subnet(&name, &value, Some(spec.ttl_secs()))
                    .await?
            }
        };
        match written {
            Written::Ok {
                mod_revision,
                etcd_lease,
            } => {
                return Ok(Lease {
                    key: SubnetKey::v4(choice.subnet()),
                    attrs: spec.attrs.clone(),
                    etcd_lease,
                    mod_revision,
                });
            }
            Written::Conflict => {
                debug!(subnet = %choice.subnet(), attempt, "another node wrote this subnet first, retrying");
            }
        }
    }
    Err(ManagerError::TooManyConflicts(MAX_ATTEMPTS))
}

/// Capped exponential backoff with jitter, for reconnects.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    async fn wait(&mut self) {
        let base = self.next.as_millis() as u64; // at most 10_000
        let delay = Duration::from_millis(base / 2 + rand::random_range(0..=base));
        self.next = (self.next * 2).min(Self::MAX);
        tokio::time::sleep(delay).await;
    }
}

/// Keeps our lease and streams peer events until the receiver is dropped.
pub struct Manager {
    reg: Registry,
    spec: LeaseSpec,
    own: OwnLease,
    peers: PeerSet,
    /// Every subnet key seen, valid or not, with its mod revision: the resync compares
    /// this with a keys-only listing.
    seen: HashMap<String, i64>,
    tx: mpsc::Sender<ManagerEvent>,
}

impl Manager {
    pub fn new(reg: Registry, spec: LeaseSpec, own: Lease, tx: mpsc::Sender<ManagerEvent>) -> Self {
        let peers = PeerSet::new(spec.range, Some(own.subnet()));
        let own = OwnLease::new(own, &spec);
        Self {
            reg,
            spec,
            own,
            peers,
            seen: HashMap::new(),
            tx,
        }
    }

    pub fn own(&self) -> &OwnLease {
        &self.own
    }

    async fn emit(&mut self, outcome: Outcome) -> bool {
        for e in &outcome.rejected {
            warn!(error = %e, "ignoring malformed lease");
        }
        if outcome.events.is_empty() {
            return true;
        }
        self.tx
            .send(ManagerEvent::Peers(outcome.events))
            .await
            .is_ok()
    }

    /// Lists everything and diffs it against the known peers. Returns the revision.
    async fn relist(&mut self) -> Result<Option<i64>, ManagerError> {
        let (raws, rev) = self.reg.list_subnets().await?;
        self.seen = raws
            .iter()
            .map(|r| (r.name.clone(), r.mod_revision))
            .collect();
        let own_name = self.own.lease.key.to_string();
        match raws.iter().find(|r| r.name == own_name) {
            Some(raw) => self.check_own_put(raw).await?,
            None => self.reacquire("our lease is gone").await?,
        }
        let outcome = self.peers.reset(&raws);
        if !self.emit(outcome).await {
            return Ok(None);
        }
        let snapshot = self.peers.peers().cloned().collect();
        Ok(self
            .tx
            .send(ManagerEvent::Snapshot(snapshot))
            .await
            .is_ok()
            .then_some(rev))
    }

    /// Runs until the event receiver is dropped. Errors from etcd are retried here;
    /// only a failure to re-acquire a lost lease ends the loop.
    pub async fn run(mut self) -> Result<(), ManagerError> {
        let mut backoff = Backoff::new();
        let mut next_rev = loop {
            match self.relist().await {
                Ok(Some(rev)) => break rev + 1,
                Ok(None) => return Ok(()),
                Err(ManagerError::Etcd(e)) => {
                    warn!(error = %e, "listing leases failed, retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e),
            }
        };
        let mut resync = tokio::time::interval_at(
            Instant::now() + jittered(RESYNC_PERIOD),
            jittered(RESYNC_PERIOD),
        );
        loop {
            let mut watch = match self.reg.watch_subnets(next_rev).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, revision = next_rev, "starting the lease watch failed, retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            debug!(revision = next_rev, "watching leases");
            loop {
                let renew_at = self.own.renew_at;
                tokio::select! {
                    r = watch.next() => match r {
                        Ok(events) => {
                            backoff.reset();
                            for ev in events {
                                if !self.apply(ev).await? {
                                    return Ok(());
                                }
                            }
                            next_rev = watch.next_revision();
                        }
                        Err(EtcdError::Compacted { from, compact }) => {
                            warn!(from, compact, "lease watch compacted, re-listing");
                            match self.relist().await {
                                Ok(Some(rev)) => next_rev = rev + 1,
                                Ok(None) => return Ok(()),
                                Err(ManagerError::Etcd(e)) => {
                                    warn!(error = %e, "re-listing leases failed, retrying");
                                    backoff.wait().await;
                                }
                                Err(e) => return Err(e),
                            }
                            break;
                        }
                        Err(e) => {
                            next_rev = watch.next_revision();
                            warn!(error = %e, revision = next_rev, "lease watch broke, resuming");
                            backoff.wait().await;
                            break;
                        }
                    },
                    () = sleep_until_opt(renew_at) => {
                        if let Err(e) = self.renew().await {
                            warn!(error = %e, "renewing our lease failed, retrying in 1 min");
                            self.own.renew_at = Some(Instant::now() + Duration::from_secs(60));
                        }
                    }
                    _ = resync.tick() => {
                        match self.resync().await {
                            Ok(Some(rev)) => { next_rev = rev + 1; break; }
                            Ok(None) => {}
                            Err(e) => warn!(error = %e, "periodic lease resync failed"),
                        }
                    }
                    () = self.tx.closed() => return Ok(()),
                }
            }
        }
    }

    /// Compares a keys-only listing with what the watch delivered; re-lists on any
    /// difference. Returns the new revision if it re-listed.
    async fn resync(&mut self) -> Result<Option<i64>, ManagerError> {
        let (keys, _) = self.reg.list_subnet_revisions().await?;
        let same =
            keys.len() == self.seen.len() && keys.iter().all(|(k, r)| self.seen.get(k) == Some(r));
        if same {
            return Ok(None);
        }
        info!("lease list differs from the watch, re-listing");
        self.relist().await
    }

    /// Applies one watch event. Returns false when the daemon has gone away.
    async fn apply(&mut self, ev: WatchEvent) -> Result<bool, ManagerError> {
        let own_name = self.own.lease.key.to_string();
        match ev {
            WatchEvent::Put(raw) => {
                self.seen.insert(raw.name.clone(), raw.mod_revision);
                if raw.name == own_name {
                    self.check_own_put(&raw).await?;
                    return Ok(true);
                }
                let outcome = self.peers.put(&raw);
                Ok(self.emit(outcome).await)
            }
            WatchEvent::Delete { name, .. } => {
                self.seen.remove(&name);
                if name == own_name {
                    self.reacquire("our lease was deleted").await?;
                    return Ok(true);
                }
                let outcome = self.peers.delete(&name);
                Ok(self.emit(outcome).await)
            }
        }
    }

    /// Our key was written: by us (nothing to do), by an administrator turning it into
    /// a reservation (adopt), or by another node (we lost it).
    async fn check_own_put(&mut self, raw: &RawLease) -> Result<(), ManagerError> {
        if raw.mod_revision == self.own.lease.mod_revision {
            return Ok(());
        }
        match LeaseAttrs::parse(&raw.value) {
            Ok(attrs) if attrs.public_ip == self.spec.public_ip() => {
                let was_reservation = self.own.lease.is_reservation();
                let Some(lease) = raw_to_lease(raw, attrs) else {
                    return Ok(());
                };
                if lease.is_reservation() && !was_reservation {
                    info!(subnet = %lease.subnet(), "our lease became a reservation, it will not be renewed");
                }
                let value_matches = lease.attrs == self.spec.attrs;
                self.own = OwnLease::new(lease, &self.spec);
                if !value_matches {
                    // Someone rewrote our attrs (an old VtepMAC, say): put ours back.
                    self.write_own().await?;
                }
                Ok(())
            }
            Ok(attrs) => {
                let why = format!("our subnet now names another node ({})", attrs.public_ip);
                self.reacquire(&why).await
            }
            Err(e) => {
                warn!(error = %e, "our lease holds an invalid value, rewriting it");
                self.own.lease.mod_revision = raw.mod_revision;
                self.write_own().await
            }
        }
    }

    /// CAS-writes our value on our key, keeping a reservation without TTL.
    async fn write_own(&mut self) -> Result<(), ManagerError> {
        let name = self.own.lease.key.to_string();
        let old_lease = self.own.lease.etcd_lease;
        let ttl = (!self.own.lease.is_reservation()).then(|| self.spec.ttl_secs());
        match self
            .reg
            .swap_subnet(
                &name,
                self.own.lease.mod_revision,
                &self.spec.attrs.to_json(),
                ttl,
            )
            .await?
        {
            Written::Ok {
                mod_revision,
                etcd_lease,
            } => {
                let mut lease = self.own.lease.clone();
                lease.attrs = self.spec.attrs.clone();
                lease.mod_revision = mod_revision;
                lease.etcd_lease = etcd_lease;
                self.own = OwnLease::new(lease, &self.spec);
                if old_lease != etcd_lease {
                    self.reg.revoke(old_lease).await;
                }
                Ok(())
            }
            Written::Conflict => self.reacquire("our lease changed under us").await,
        }
    }

    async fn renew(&mut self) -> Result<(), ManagerError> {
        self.write_own().await?;
        info!(subnet = %self.own.subnet(), ttl_secs = self.spec.ttl_secs(), "lease renewed");
        Ok(())
    }

    /// Our key is gone or someone else's: take the same subnet back if it is free,
    /// else acquire a new one. Never overwrites another node's key.
    async fn reacquire(&mut self, why: &str) -> Result<(), ManagerError> {
        let old = self.own.lease.clone();
        let name = old.key.to_string();
        warn!(subnet = %old.subnet(), reason = why, "lost our lease, re-acquiring");
        let mut backoff = Backoff::new();
        let lease = loop {
            let r = match self
                .reg
                .create_subnet(
                    &name,
                    &self.spec.attrs.to_json(),
                    Some(self.spec.ttl_secs()),
                )
                .await
            {
                Ok(Written::Ok {
                    mod_revision,
                    etcd_lease,
                }) => Ok(Lease {
                    key: old.key,
                    attrs: self.spec.attrs.clone(),
                    etcd_lease,
                    mod_revision,
                }),
                Ok(Written::Conflict) => {
                    let spec = LeaseSpec {
                        previous: None,
                        ..self.spec.clone()
                    };
                    acquire(&self.reg, &spec).await
                }
                Err(e) => Err(e.into()),
            };
            match r {
                Ok(l) => break l,
                Err(ManagerError::Etcd(e)) => {
                    warn!(error = %e, "re-acquiring our lease failed, retrying");
                    backoff.wait().await;
                }
                Err(e) => {
                    error!(error = %e, "cannot re-acquire a lease");
                    return Err(e);
                }
            }
        };
        if lease.subnet() == old.subnet() {
            info!(subnet = %lease.subnet(), "re-acquired our subnet");
        } else {
            error!(old = %old.subnet(), new = %lease.subnet(), "our subnet was taken by another node; moved to a new subnet, containers on the old one must be restarted");
        }
        self.seen.insert(name, lease.mod_revision);
        let outcome = self.peers.set_own(Some(lease.subnet()));
        self.own = OwnLease::new(lease.clone(), &self.spec);
        self.emit(outcome).await;
        let _ = self.tx.send(ManagerEvent::OwnLease(lease)).await;
        Ok(())
    }
}

fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64; // minutes, far below u64::MAX
    Duration::from_millis(ms - ms / 10 + rand::random_range(0..=ms / 5))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
