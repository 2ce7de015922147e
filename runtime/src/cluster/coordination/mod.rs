//! Coordination backends: where a cluster keeps its membership, its coordinator election, its
//! job registry and its partition assignment.
//!
//! The default is `embedded` — the heartbeat membership of [`super::membership`], which needs
//! nothing else. Clusters that already run a coordination service can put these on it
//! instead:
//!
//! | | etcd (v3 API) | ZooKeeper |
//! |---|---|---|
//! | live member | key `PREFIX/members/ID` on the node's **lease** | ephemeral znode `CHROOT/members/ID` of the node's **session** |
//! | coordinator | key `PREFIX/coordinator`, created only if absent | lowest ephemeral sequential znode under `CHROOT/election` |
//! | fencing token | that key's create revision | that znode's creation zxid (`czxid`) |
//! | fenced write | transaction: compare the create revision, then put | multi: check the election znode, then set |
//! | observing | one watch on the prefix | a persistent recursive watch on the chroot |
//!
//! Both give the same [`Observed`] events to the same sans-IO [`core`] (which turns them into
//! the membership commands the node loop already carries out), and the same promises: every
//! write a coordinator makes carries its token and fails once another holds the role; a node
//! whose lease or session is gone hears [`Observed::Expired`] (it stops its actors and rejoins
//! as a new incarnation); [`Session::valid_until`] is the moment after which the service may
//! already have handed the role to another — a coordinator stops committing before it. The
//! service never carries tensors: the data plane stays on QUIC.
//!
//! ```text
//!  Coordination::from_str("etcd://127.0.0.1:2379/phalanx")
//!      └─▶ Session::join(member) ──▶ (Session, Receiver<Observed>)
//!             campaign() ─▶ Some(token) | None        put_fenced(token, key, value) ─▶ bool
//!             Observed::{Members, Leader, View, Expired} ─▶ core::Coordinated ─▶ commands
//! ```

pub mod core;
pub mod etcd;
pub mod servers;
pub mod shell;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::membership::View;

/// How many [`Observed`] events may wait for the node loop before a backend's observer
/// waits for it: a node that falls behind slows its own observer, never the service.
pub const OBSERVED_QUEUE: usize = 64;

/// Pause before a backend tries again to reach the service (joining, reading again after a
/// broken watch), doubled up to [`MAX_RETRY`] while it keeps failing.
const FIRST_RETRY: Duration = Duration::from_millis(50);
/// See [`FIRST_RETRY`].
const MAX_RETRY: Duration = Duration::from_secs(1);

/// What the coordinator role's key (etcd) or a candidate's znode (ZooKeeper) holds.
#[derive(Serialize, Deserialize)]
struct Holder {
    node: u32,
    incarnation: u64,
}

/// The most members a cluster on a coordination service may register (member ids are
/// `u32`, but the observer keeps the member set in memory and sends it whole on change).
pub const MAX_MEMBERS: usize = 4096;

/// The largest value the backends write or accept under their prefix (a view, a member, a
/// job's record). etcd's default request limit is 1.5 MiB and ZooKeeper's `jute.maxbuffer` 1 MiB;
/// anything larger than this is refused before it reaches the service.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Where a cluster coordinates. In a node's config (and on its command line) it is the text
/// [`Coordination::from_str`] reads: `embedded` (the default),
/// `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` or `zk://HOST:PORT[,…]/CHROOT`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Coordination {
    /// Heartbeats over QUIC between the nodes ([`super::membership`]); needs nothing else.
    #[default]
    Embedded,
    /// An etcd cluster, v3 API.
    Etcd {
        /// `HOST:PORT` of each member the client may talk to.
        endpoints: Vec<String>,
        /// The key prefix this cluster owns (starts with `/`, no trailing `/`).
        prefix: String,
    },
    /// A ZooKeeper ensemble.
    ZooKeeper {
        /// `HOST:PORT` of each server.
        hosts: Vec<String>,
        /// The chroot this cluster owns (starts with `/`, no trailing `/`).
        chroot: String,
    },
}

impl Coordination {
    /// The same service reached through other endpoints (a relay's), in order.
    pub fn through(&self, endpoints: Vec<String>) -> Coordination {
        match self {
            Coordination::Embedded => Coordination::Embedded,
            Coordination::Etcd { prefix, .. } => Coordination::Etcd { endpoints, prefix: prefix.clone() },
            Coordination::ZooKeeper { chroot, .. } => {
                Coordination::ZooKeeper { hosts: endpoints, chroot: chroot.clone() }
            }
        }
    }

    /// The `HOST:PORT` endpoints (none for the embedded membership).
    pub fn endpoints(&self) -> &[String] {
        match self {
            Coordination::Embedded => &[],
            Coordination::Etcd { endpoints, .. } => endpoints,
            Coordination::ZooKeeper { hosts, .. } => hosts,
        }
    }
}

impl Serialize for Coordination {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Coordination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Coordination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Coordination::Embedded => f.write_str("embedded"),
            Coordination::Etcd { endpoints, prefix } => write!(f, "etcd://{}{prefix}", endpoints.join(",")),
            Coordination::ZooKeeper { hosts, chroot } => write!(f, "zk://{}{chroot}", hosts.join(",")),
        }
    }
}

impl FromStr for Coordination {
    type Err = CoordinationError;

    /// `embedded`, `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` or `zk://HOST:PORT[,…]/CHROOT`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| CoordinationError::BadSpec { spec: text.to_string(), reason };
        if text == "embedded" {
            return Ok(Coordination::Embedded);
        }
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            bad("expected `embedded`, `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` or `zk://HOST:PORT[,…]/CHROOT`".into())
        })?;
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(bad(format!("no {} after the hosts (e.g. `/phalanx`)", path_word(scheme)))),
        };
        let hosts: Vec<String> = hosts.split(',').map(str::to_string).collect();
        for host in &hosts {
            check_host(host).map_err(bad)?;
        }
        let path = path.trim_end_matches('/');
        check_path(path).map_err(|reason| bad(format!("{} {path:?}: {reason}", path_word(scheme))))?;
        match scheme {
            "etcd" => Ok(Coordination::Etcd { endpoints: hosts, prefix: path.to_string() }),
            "zk" | "zookeeper" => Ok(Coordination::ZooKeeper { hosts, chroot: path.to_string() }),
            other => Err(bad(format!("unknown scheme {other:?} (expected `etcd` or `zk`)"))),
        }
    }
}

fn path_word(scheme: &str) -> &'static str {
    if scheme == "etcd" {
        "prefix"
    } else {
        "chroot"
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = host.rsplit_once(':').ok_or_else(|| format!("host {host:?} has no port (HOST:PORT)"))?;
    if name.is_empty() {
        return Err(format!("host {host:?} has no name"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("host {host:?}: port {port:?} is not 1–65535"))?;
    Ok(())
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty: name one (e.g. `/phalanx`); the cluster owns everything under it".into());
    }
    if path.split('/').skip(1).any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("has an empty, `.` or `..` part".into());
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("has the character {c:?}"));
    }
    Ok(())
}

/// Timing of a session with the service, and its TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// etcd: the lease's TTL (whole seconds; etcd's minimum with its default election timeout
    /// is 2 s). ZooKeeper: the session timeout (the server clamps it to 2–20 × its tick).
    pub ttl: Duration,
    /// How long to try to reach the service when joining, and how long a member registered
    /// under this node's id by another process may stay before joining fails as a duplicate.
    pub join_timeout: Duration,
    /// TLS to the service (`--coordination-certs`); none: plain TCP.
    pub tls: Option<std::sync::Arc<ServiceTls>>,
}

/// What a node presents to, and trusts, a coordination service over TLS: the files of a
/// directory (`--coordination-certs DIR`) — `ca.pem`, the CA that signed the service's
/// certificate, and, for a service that checks its clients, `client.pem` and `client.key` (the
/// layout of `phalanx certs`' `client/` directory).
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceTls {
    /// PEM of the CA certificates to trust the service by.
    pub ca_pem: Vec<u8>,
    /// PEM of this node's client certificate and key, if it has them.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ServiceTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ServiceTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl ServiceTls {
    /// Read `dir/ca.pem` and, if present, `dir/client.pem` with `dir/client.key`.
    pub fn load(dir: &std::path::Path) -> Result<Self, CoordinationError> {
        let bad = |file: &std::path::Path, reason: String| CoordinationError::BadSpec {
            spec: format!("--coordination-certs {}", dir.display()),
            reason: format!("{}: {reason}", file.display()),
        };
        let read = |name: &str| {
            let file = dir.join(name);
            std::fs::read(&file).map_err(|e| bad(&file, e.to_string())).and_then(|bytes| {
                if String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                    Ok(bytes)
                } else {
                    Err(bad(&file, "not a PEM file".into()))
                }
            })
        };
        let ca_pem = read("ca.pem")?;
        let identity = match (dir.join("client.pem").exists(), dir.join("client.key").exists()) {
            (false, false) => None,
            (true, true) => Some((read("client.pem")?, read("client.key")?)),
            (true, false) => return Err(bad(&dir.join("client.key"), "missing (client.pem needs its key)".into())),
            (false, true) => {
                return Err(bad(&dir.join("client.pem"), "missing (client.key needs its certificate)".into()))
            }
        };
        Ok(Self { ca_pem, identity })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(2), join_timeout: Duration::from_secs(10), tls: None }
    }
}

/// A member as registered with the service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id.
    pub id: u32,
    /// Which start of that node (a new one each time the process starts or rejoins).
    pub incarnation: u64,
    /// Where its QUIC endpoint listens.
    pub addr: String,
}

/// Who holds the coordinator role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The node.
    pub node: u32,
    /// Which start of that node took the role (a previous incarnation's role lingers until
    /// its lease or session runs out).
    pub incarnation: u64,
    /// Its fencing token: larger for every later holder.
    pub token: u64,
}

/// A view as a coordinator published it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The token of the coordinator that wrote it.
    pub token: u64,
    /// The view.
    pub view: View,
}

/// What a session observes of the service, in the order the service applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The registered members, all of them, after a change.
    Members(BTreeMap<u32, Member>),
    /// The coordinator role changed hands (or is free).
    Leader(Option<Leader>),
    /// A coordinator published a view.
    View(Published),
    /// This node's lease or session is gone, and with it its registration and any role.
    Expired {
        /// What the service or the client said.
        reason: String,
    },
}

/// What can go wrong with a coordination service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoordinationError {
    /// `--coordination` does not parse.
    #[error("invalid value for `coordination` ({spec:?}): {reason}")]
    BadSpec {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The service did not answer.
    #[error("{service} unreachable: {reason}")]
    Unreachable {
        /// The service (`etcd://…`, `zk://…`).
        service: String,
        /// What the client said.
        reason: String,
    },
    /// Another live process is registered under this node's id.
    #[error("node {node} is already a live member of {service} (incarnation {incarnation} at {addr}): a second process with the same id is refused; stop the other one or use another id")]
    DuplicateMember {
        /// The id.
        node: u32,
        /// The service.
        service: String,
        /// The other process's incarnation.
        incarnation: u64,
        /// Its address.
        addr: String,
    },
    /// This node's lease or session is gone.
    #[error("node {node}'s {what} with {service} expired: {reason}")]
    Expired {
        /// The node.
        node: u32,
        /// `lease` or `session`.
        what: &'static str,
        /// The service.
        service: String,
        /// What the service said.
        reason: String,
    },
    /// A request failed.
    #[error("{service}: {op} failed: {reason}")]
    Request {
        /// The service.
        service: String,
        /// What was asked (`put jobs/x`, `campaign`…).
        op: String,
        /// What the service said.
        reason: String,
    },
    /// A value under the cluster's prefix is not what Phalanx writes there.
    #[error("{service}: {key}: {reason}")]
    BadValue {
        /// The service.
        service: String,
        /// The key or path.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A node's session with a coordination service: its registration, its lease, its watch.
/// Dropping it stops the session's tasks; [`Session::leave`] also gives the registration up
/// at once (instead of when the lease or session runs out).
pub enum Session {
    /// On etcd.
    Etcd(Box<etcd::EtcdSession>),
    /// On ZooKeeper.
    ZooKeeper(Box<zookeeper::ZkSession>),
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("service", &self.service()).field("valid_until", &self.valid_until()).finish()
    }
}

impl Session {
    /// Register `me` with the service named by `spec` and start observing it. The first events
    /// are the state as it is (members, leader, view). Fails with
    /// [`CoordinationError::DuplicateMember`] while another live process holds `me.id`.
    pub async fn join(
        spec: &Coordination,
        me: Member,
        settings: Settings,
    ) -> Result<(Session, mpsc::Receiver<Observed>), CoordinationError> {
        match spec {
            Coordination::Embedded => Err(CoordinationError::BadSpec {
                spec: spec.to_string(),
                reason: "the embedded membership has no service to join".into(),
            }),
            Coordination::Etcd { endpoints, prefix } => {
                let (session, events) = etcd::EtcdSession::join(endpoints, prefix, me, settings).await?;
                Ok((Session::Etcd(Box::new(session)), events))
            }
            Coordination::ZooKeeper { hosts, chroot } => {
                let (session, events) = zookeeper::ZkSession::join(hosts, chroot, me, settings).await?;
                Ok((Session::ZooKeeper(Box::new(session)), events))
            }
        }
    }

    /// Try to take the coordinator role: `Some(token)` when this node holds it now (also when
    /// it already did), `None` when another does.
    pub async fn campaign(&self) -> Result<Option<u64>, CoordinationError> {
        match self {
            Session::Etcd(s) => s.campaign().await,
            Session::ZooKeeper(s) => s.campaign().await,
        }
    }

    /// Write `value` at `key` (relative to the prefix: `view`, `jobs/NAME`…) if the
    /// coordinator role is still held with `token`: `false` when it is not (nothing written).
    pub async fn put_fenced(&self, token: u64, key: &str, value: &[u8]) -> Result<bool, CoordinationError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(CoordinationError::BadValue {
                service: self.service(),
                key: key.to_string(),
                reason: format!("{} bytes, more than the {MAX_VALUE_BYTES} a value may have", value.len()),
            });
        }
        match self {
            Session::Etcd(s) => s.put_fenced(token, key, value).await,
            Session::ZooKeeper(s) => s.put_fenced(token, key, value).await,
        }
    }

    /// Delete `key` (relative to the prefix) if the coordinator role is still held with
    /// `token`: `false` when it is not (nothing deleted). A key already gone is deleted.
    pub async fn delete_fenced(&self, token: u64, key: &str) -> Result<bool, CoordinationError> {
        check_key(key)?;
        match self {
            Session::Etcd(s) => s.delete_fenced(token, key).await,
            Session::ZooKeeper(s) => s.delete_fenced(token, key).await,
        }
    }

    /// The keys directly under `dir` (relative to the prefix) and their values, named
    /// relative to `dir`; an error when there are more than `most`.
    pub async fn list(&self, dir: &str, most: usize) -> Result<Vec<(String, Vec<u8>)>, CoordinationError> {
        check_key(dir)?;
        let listed = match self {
            Session::Etcd(s) => s.list(dir, most).await?,
            Session::ZooKeeper(s) => s.list(dir, most).await?,
        };
        // etcd's range also holds deeper keys (`dir/a/b`): not directly under `dir`.
        Ok(listed.into_iter().filter(|(name, _)| !name.contains('/')).collect())
    }

    /// The value at `key` (relative to the prefix), if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CoordinationError> {
        check_key(key)?;
        match self {
            Session::Etcd(s) => s.get(key).await,
            Session::ZooKeeper(s) => s.get(key).await,
        }
    }

    /// Publish `view` as the coordinator holding `token` (`false`: fenced out).
    pub async fn publish_view(&self, token: u64, view: &View) -> Result<bool, CoordinationError> {
        let bytes = serde_json::to_vec(&Published { token, view: view.clone() }).expect("a view serialises");
        self.put_fenced(token, VIEW_KEY, &bytes).await
    }

    /// Until when this node's lease or session surely holds (the service cannot have expired
    /// it earlier: the moment counts from before the last renewal was sent). `None` once it
    /// is gone, or while it is not known to hold.
    pub fn valid_until(&self) -> Option<Instant> {
        *self.common().valid.borrow()
    }

    /// [`Session::valid_until`] as it changes (each renewal moves it on; `None` at the end).
    pub fn validity(&self) -> tokio::sync::watch::Receiver<Option<Instant>> {
        self.common().valid.clone()
    }

    /// The service, as `etcd://…` or `zk://…`.
    pub fn service(&self) -> String {
        self.common().service.clone()
    }

    /// Give the registration (and the coordinator role, if held) up now; the session's
    /// tasks stop (it observes and renews nothing more).
    pub async fn leave(&self) -> Result<(), CoordinationError> {
        self.common().stop();
        match self {
            Session::Etcd(s) => s.leave().await,
            Session::ZooKeeper(s) => s.leave().await,
        }
    }
}

/// What every backend's session has: the service's name, the moment its lease or session
/// surely holds until (renewed by one of its tasks), and those tasks (stopped with it).
struct Common {
    service: String,
    valid: tokio::sync::watch::Receiver<Option<Instant>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Common {
    /// `me.id` is registered by `holder`: past `deadline` that is a live duplicate; before it,
    /// wait a while for a dead predecessor's registration to go with its lease or session
    /// (within one TTL), then the caller tries again.
    async fn wait_for_predecessor(
        &self,
        me: &Member,
        holder: Member,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<(), CoordinationError> {
        if phalanx_actors::clock::now() >= deadline {
            return Err(CoordinationError::DuplicateMember {
                node: me.id,
                service: self.service.clone(),
                incarnation: holder.incarnation,
                addr: holder.addr,
            });
        }
        tracing::info!(service = %self.service, node = me.id, other = holder.incarnation,
            "node id still registered by another incarnation; waiting for its lease or session to run out");
        tokio::time::sleep((ttl / 4).max(Duration::from_millis(50))).await;
        Ok(())
    }

    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Common {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Session {
    fn common(&self) -> &Common {
        match self {
            Session::Etcd(s) => &s.common,
            Session::ZooKeeper(s) => &s.common,
        }
    }
}

/// Where the coordinator publishes its view, relative to the prefix.
pub const VIEW_KEY: &str = "view";

fn check_key(key: &str) -> Result<(), CoordinationError> {
    let bad = |reason: &str| CoordinationError::BadSpec { spec: key.to_string(), reason: reason.to_string() };
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(bad("a key is relative to the cluster's prefix: no leading or trailing `/`"));
    }
    let path = format!("/{key}");
    check_path(&path).map_err(|reason| bad(&reason))
}

/// Decode a JSON value read at `key`, naming the key when it is not what Phalanx writes.
fn decode<T: serde::de::DeserializeOwned>(service: &str, key: &str, bytes: &[u8]) -> Result<T, CoordinationError> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(CoordinationError::BadValue {
            service: service.to_string(),
            key: key.to_string(),
            reason: format!("{} bytes, more than the {MAX_VALUE_BYTES} a value may have", bytes.len()),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| CoordinationError::BadValue {
        service: service.to_string(),
        key: key.to_string(),
        reason: format!("not a value Phalanx wrote: {e}"),
    })
}

/// What an observer last saw of the service; both backends rebuild one after every change
/// they are told of and send what differs from the previous one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    members: BTreeMap<u32, Member>,
    leader: Option<Leader>,
    view: Option<Published>,
}

impl Snapshot {
    /// The events that take an observer from `self` to `newer`: members first (a view names
    /// members), then the role, then the view.
    fn changes_to(&self, newer: &Snapshot) -> Vec<Observed> {
        let mut out = Vec::new();
        if self.members != newer.members {
            out.push(Observed::Members(newer.members.clone()));
        }
        if self.leader != newer.leader {
            out.push(Observed::Leader(newer.leader));
        }
        if self.view != newer.view {
            if let Some(view) = &newer.view {
                out.push(Observed::View(view.clone()));
            }
        }
        out
    }
}

/// Send `events` to the node; `false` when nobody listens any more (the session was dropped).
async fn deliver(to: &mpsc::Sender<Observed>, events: Vec<Observed>) -> bool {
    for event in events {
        if to.send(event).await.is_err() {
            return false;
        }
    }
    true
}

/// The member id a `members/ID` key or znode names.
fn member_id(service: &str, name: &str) -> Result<u32, CoordinationError> {
    name.parse().map_err(|_| CoordinationError::BadValue {
        service: service.to_string(),
        key: format!("members/{name}"),
        reason: "not a node id".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for text in ["embedded", "etcd://127.0.0.1:2379/phalanx", "etcd://a:1,b:2,c:3/x/y", "zk://h:2181/phalanx"] {
            let spec: Coordination = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        let spec: Coordination = "zookeeper://h:2181/p/".parse().unwrap();
        assert_eq!(spec, Coordination::ZooKeeper { hosts: vec!["h:2181".into()], chroot: "/p".into() });
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (text, says) in [
            ("etcd", "expected `embedded`"),
            ("etcd://127.0.0.1:2379", "no prefix"),
            ("zk://h:2181", "no chroot"),
            ("etcd://127.0.0.1/p", "no port"),
            ("etcd://h:0/p", "port \"0\""),
            ("etcd://h:99999/p", "not 1–65535"),
            ("etcd://:1/p", "no name"),
            ("consul://h:1/p", "unknown scheme"),
            ("etcd://h:1//", "is empty"),
            ("etcd://h:1/a//b", "empty, `.` or `..`"),
            ("zk://h:1/a/../b", "empty, `.` or `..`"),
            ("zk://h:1/a b", "character"),
        ] {
            let err = text.parse::<Coordination>().unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains("coordination"), "{text}: {err}");
        }
    }

    #[test]
    fn keys_stay_under_the_prefix() {
        assert!(check_key("jobs/a").is_ok());
        for key in ["", "/jobs", "jobs/", "../x", "a/../../b"] {
            assert!(check_key(key).is_err(), "{key}");
        }
    }
}
