//! The ZooKeeper backend (the `zookeeper-client` crate: async, maintained, speaks the 3.6+
//! protocol with persistent recursive watches; the older `zookeeper` crate has no async API
//! and no persistent watches).
//!
//! A session is one ZooKeeper session. The member is the ephemeral znode
//! `CHROOT/members/ID` (a second live process with the same id finds it and is refused). The
//! election is the classic recipe: every candidate creates an ephemeral sequential znode under
//! `CHROOT/election`; the lowest one holds the role, and its creation zxid — which only grows
//! in an ensemble — is the fencing token. A coordinator's writes are multi-operations that
//! first check its election znode still exists (the znode goes with the session, and no lower
//! one can appear after it). One persistent recursive watch on the chroot feeds the observer,
//! which reads the state again after every notification.

use phalanx_actors::clock;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Mutex};
use zookeeper_client as zk;

use super::{
    decode, deliver, member_id, Common, CoordinationError, Leader, Member, Observed, Published, ServiceTls, Settings,
    Snapshot,
};
use super::{Holder, FIRST_RETRY, MAX_MEMBERS, MAX_RETRY, OBSERVED_QUEUE, VIEW_KEY};

/// This node's place in the election: its znode's path and creation zxid.
#[derive(Clone)]
struct Candidacy {
    path: String,
    czxid: u64,
}

/// A node's session with ZooKeeper.
pub struct ZkSession {
    pub(super) common: Common,
    me: Member,
    client: zk::Client,
    candidacy: Mutex<Option<Candidacy>>,
}

/// The client's TLS to ZooKeeper: the CA that signed the servers' certificates and, for a server
/// that checks its clients (`ssl.clientAuth=need`), this node's certificate and key. The
/// client's rustls config takes the process default crypto provider, and with ring and aws-lc-rs
/// both compiled in there is none unless one is installed: ring, as everywhere in Phalanx (as for
/// etcd, [`super::etcd::tls_config`]).
fn tls_options(service: &str, tls: &ServiceTls) -> Result<zk::TlsOptions, CoordinationError> {
    phalanx_transport::tls::install_default_provider();
    let bad = |what: &str, e: zk::Error| CoordinationError::BadSpec {
        spec: service.to_string(),
        reason: format!("--coordination-certs: {what}: {e}"),
    };
    let text = |bytes: &[u8], what: &str| {
        std::str::from_utf8(bytes).map(str::to_string).map_err(|e| CoordinationError::BadSpec {
            spec: service.to_string(),
            reason: format!("--coordination-certs: {what} is not PEM text: {e}"),
        })
    };
    let mut options = zk::TlsOptions::new().with_pem_ca(&text(&tls.ca_pem, "ca.pem")?).map_err(|e| bad("ca.pem", e))?;
    if let Some((cert, key)) = &tls.identity {
        options = options
            .with_pem_identity(&text(cert, "client.pem")?, &text(key, "client.key")?)
            .map_err(|e| bad("client.pem / client.key", e))?;
    }
    Ok(options)
}

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

impl ZkSession {
    /// See [`super::Session::join`].
    pub async fn join(
        hosts: &[String],
        chroot: &str,
        me: Member,
        settings: Settings,
    ) -> Result<(Self, mpsc::Receiver<Observed>), CoordinationError> {
        let service = format!("zk://{}{chroot}", hosts.join(","));
        let tls = match &settings.tls {
            Some(tls) => Some(tls_options(&service, tls)?),
            None => None,
        };
        let unreachable = |reason: String| CoordinationError::Unreachable { service: service.clone(), reason };
        let deadline = clock::now() + settings.join_timeout;
        let mut retry = FIRST_RETRY;
        let root = loop {
            let connector = zk::Client::connector()
                .with_session_timeout(settings.ttl)
                .with_connection_timeout(settings.ttl.min(settings.join_timeout));
            let connect = match &tls {
                // Every server over TLS (`secure_connect`: bare hosts mean TLS).
                Some(options) => connector.with_tls(options.clone()).secure_connect(&hosts.join(",")).await,
                None => connector.connect(&hosts.join(",")).await,
            };
            match connect {
                Ok(client) => break client,
                Err(e) if clock::now() + retry < deadline => {
                    tracing::debug!(%service, error = %e, "ZooKeeper not answering yet");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
                Err(e) => return Err(unreachable(format!("no session within {:?}: {e}", settings.join_timeout))),
            }
        };
        let sent = clock::now();
        root.mkdir(chroot, &persistent()).await.map_err(|e| unreachable(format!("creating {chroot}: {e}")))?;
        let client = root.chroot(chroot.to_string()).map_err(|_| unreachable(format!("bad chroot {chroot}")))?;
        for dir in ["/members", "/election"] {
            match client.create(dir, &[], &persistent()).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(unreachable(format!("creating {chroot}{dir}: {e}"))),
            }
        }
        let (valid_tx, valid) = watch::channel(Some(sent + client.session_timeout()));
        let mut session = ZkSession {
            common: Common { service: service.clone(), valid, tasks: Vec::new() },
            me,
            client: client.clone(),
            candidacy: Mutex::new(None),
        };
        session.register(settings.ttl, deadline).await?;
        let (events_tx, events) = mpsc::channel(OBSERVED_QUEUE);
        session.common.tasks.push(tokio::spawn(keep_alive(client.clone(), valid_tx, events_tx.clone())));
        session.common.tasks.push(tokio::spawn(observe(client, events_tx, service)));
        Ok((session, events))
    }

    fn failed(&self, op: &str, e: impl std::fmt::Display) -> CoordinationError {
        CoordinationError::Request { service: self.common.service.clone(), op: op.to_string(), reason: e.to_string() }
    }

    /// Create the ephemeral `members/ID` unless another session holds it; wait (until the
    /// join timeout) for the znode of a previous incarnation to go with its session.
    async fn register(&self, ttl: Duration, deadline: Instant) -> Result<(), CoordinationError> {
        let path = format!("/members/{}", self.me.id);
        let value = serde_json::to_vec(&self.me).expect("a member serialises");
        let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        loop {
            match self.client.create(&path, &value, &ephemeral).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(self.failed("register", e)),
            }
            let holder = match self.client.get_data(&path).await {
                Ok((bytes, _)) => decode::<Member>(&self.common.service, &path[1..], &bytes)?,
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(self.failed("register", e)),
            };
            self.common.wait_for_predecessor(&self.me, holder, ttl, deadline).await?;
        }
    }

    /// See [`super::Session::campaign`]: enters the election once; the role comes when every
    /// lower candidate is gone (the observer reports it).
    pub async fn campaign(&self) -> Result<Option<u64>, CoordinationError> {
        let mut candidacy = self.candidacy.lock().await;
        if candidacy.is_none() {
            let value = serde_json::to_vec(&Holder { node: self.me.id, incarnation: self.me.incarnation })
                .expect("a holder serialises");
            let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
            let (stat, sequence) =
                self.client.create("/election/n_", &value, &options).await.map_err(|e| self.failed("campaign", e))?;
            *candidacy = Some(Candidacy { path: format!("/election/n_{sequence}"), czxid: stat.czxid as u64 });
        }
        let mine = candidacy.clone().expect("set above");
        let children = self.client.list_children("/election").await.map_err(|e| self.failed("campaign", e))?;
        let lowest = children.iter().min_by_key(|name| sequence_of(name));
        Ok((lowest.map(|name| format!("/election/{name}")) == Some(mine.path)).then_some(mine.czxid))
    }

    /// See [`super::Session::put_fenced`].
    pub async fn put_fenced(&self, token: u64, rel: &str, value: &[u8]) -> Result<bool, CoordinationError> {
        let Some(mine) = self.candidacy.lock().await.clone().filter(|c| c.czxid == token) else { return Ok(false) };
        let path = format!("/{rel}");
        if let Some((parent, _)) = path.rsplit_once('/').filter(|(parent, _)| !parent.is_empty()) {
            // Directories are harmless to create unfenced: they hold no state.
            self.client.mkdir(parent, &persistent()).await.map_err(|e| self.failed(&format!("put {rel}"), e))?;
        }
        for create in [false, true] {
            let mut writer = self.client.new_check_writer(&mine.path, None).map_err(|e| self.failed("put", e))?;
            let added = if create {
                writer.add_create(&path, value, &persistent())
            } else {
                writer.add_set_data(&path, value, None)
            };
            added.map_err(|e| self.failed(&format!("put {rel}"), e))?;
            match writer.commit().await {
                Ok(_) => return Ok(true),
                Err(zk::CheckWriteError::CheckFailed { .. }) => return Ok(false),
                // Set on a missing znode: create it; create of one that just appeared: set it.
                Err(zk::CheckWriteError::OperationFailed {
                    source: zk::Error::NoNode | zk::Error::NodeExists, ..
                }) => continue,
                Err(e) => return Err(self.failed(&format!("put {rel}"), e)),
            }
        }
        Err(self.failed(&format!("put {rel}"), "created and deleted by another writer meanwhile"))
    }

    /// See [`super::Session::delete_fenced`].
    pub async fn delete_fenced(&self, token: u64, rel: &str) -> Result<bool, CoordinationError> {
        let Some(mine) = self.candidacy.lock().await.clone().filter(|c| c.czxid == token) else { return Ok(false) };
        let mut writer = self.client.new_check_writer(&mine.path, None).map_err(|e| self.failed("delete", e))?;
        writer.add_delete(&format!("/{rel}"), None).map_err(|e| self.failed(&format!("delete {rel}"), e))?;
        match writer.commit().await {
            Ok(_) | Err(zk::CheckWriteError::OperationFailed { source: zk::Error::NoNode, .. }) => Ok(true),
            Err(zk::CheckWriteError::CheckFailed { .. }) => Ok(false),
            Err(e) => Err(self.failed(&format!("delete {rel}"), e)),
        }
    }

    /// See [`super::Session::list`].
    pub async fn list(&self, dir: &str, most: usize) -> Result<Vec<(String, Vec<u8>)>, CoordinationError> {
        let children = match self.client.list_children(&format!("/{dir}")).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => return Err(self.failed(&format!("list {dir}"), e)),
        };
        if children.len() > most {
            return Err(self.failed(&format!("list {dir}"), format!("{} keys, more than {most}", children.len())));
        }
        let mut out = Vec::with_capacity(children.len());
        for child in children {
            match self.client.get_data(&format!("/{dir}/{child}")).await {
                Ok((bytes, _)) => out.push((child, bytes)),
                // Deleted between the two reads.
                Err(zk::Error::NoNode) => {}
                Err(e) => return Err(self.failed(&format!("list {dir}"), e)),
            }
        }
        Ok(out)
    }

    /// See [`super::Session::get`].
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, CoordinationError> {
        match self.client.get_data(&format!("/{rel}")).await {
            Ok((bytes, _)) => Ok(Some(bytes)),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(self.failed(&format!("get {rel}"), e)),
        }
    }

    /// See [`super::Session::leave`].
    pub async fn leave(&self) -> Result<(), CoordinationError> {
        if let Some(mine) = self.candidacy.lock().await.take() {
            match self.client.delete(&mine.path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(self.failed("resign", e)),
            }
        }
        match self.client.delete(&format!("/members/{}", self.me.id), None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(self.failed("leave", e)),
        }
    }
}

/// The sequence number of an election znode (`n_0000000012` → 12); names of other shapes
/// sort last.
fn sequence_of(name: &str) -> i64 {
    name.strip_prefix("n_").and_then(|s| s.parse().ok()).unwrap_or(i64::MAX)
}

/// Touch the ensemble every quarter of the session timeout; publish until when the session
/// surely holds (the server expires it a timeout after the last request it received, and
/// this one was sent before it arrived). Reports the session's end.
async fn keep_alive(client: zk::Client, valid: watch::Sender<Option<Instant>>, events: mpsc::Sender<Observed>) {
    let timeout = client.session_timeout();
    let period = (timeout / 4).max(Duration::from_millis(50));
    let mut states = client.state_watcher();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            state = states.changed() => {
                if state.is_terminated() {
                    valid.send_replace(None);
                    let _ = events.send(Observed::Expired { reason: format!("session {state:?}") }).await;
                    return;
                }
            }
            _ = tick.tick() => {
                let sent = clock::now();
                if let Ok(Ok(_)) = tokio::time::timeout(period, client.check_stat("/")).await {
                    valid.send_replace(Some(sent + timeout));
                }
            }
        }
    }
}

/// Watch the chroot (persistent, recursive), then read it; read it again after every
/// notification.
async fn observe(client: zk::Client, events: mpsc::Sender<Observed>, service: String) {
    let mut seen = Snapshot::default();
    let mut watcher = loop {
        match client.watch("/", zk::AddWatchMode::PersistentRecursive).await {
            Ok(w) => break w,
            Err(zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed) => return,
            Err(e) => {
                tracing::debug!(%service, error = %e, "watch refused; retrying");
                tokio::time::sleep(FIRST_RETRY).await;
            }
        }
    };
    loop {
        match read(&client, &service).await {
            Ok(now) => {
                if !deliver(&events, seen.changes_to(&now)).await {
                    return;
                }
                seen = now;
            }
            Err(e) => {
                tracing::debug!(%service, error = %e, "reading the chroot failed; reading again on the next change")
            }
        }
        // The job registry's keys change nothing an observer reports: wait for another change.
        loop {
            let event = watcher.changed().await;
            if event.event_type == zk::EventType::Session && event.session_state.is_terminated() {
                return;
            }
            if event.event_type == zk::EventType::Session || !is_registry_path(&event.path) {
                break;
            }
        }
    }
}

/// A path (relative to the chroot) of the job registry or a job's record.
fn is_registry_path(path: &str) -> bool {
    use crate::cluster::registry::{RECORD_DIRS, STORE_DIR};
    std::iter::once(STORE_DIR).chain(RECORD_DIRS).any(|dir| {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(dir))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The members, the lowest candidate and the view, as ZooKeeper has them now.
async fn read(client: &zk::Client, service: &str) -> Result<Snapshot, zk::Error> {
    let mut snapshot = Snapshot::default();
    let mut names = client.list_children("/members").await?;
    names.sort();
    names.truncate(MAX_MEMBERS);
    for name in names {
        let id = match member_id(service, &name) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "ignored a znode under the cluster's chroot");
                continue;
            }
        };
        let bytes = match client.get_data(&format!("/members/{name}")).await {
            Ok((bytes, _)) => bytes,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(e),
        };
        match decode::<Member>(service, &format!("members/{name}"), &bytes) {
            Ok(member) if member.id == id => {
                snapshot.members.insert(id, member);
            }
            Ok(member) => {
                tracing::warn!(key = %format!("members/{name}"), names = member.id, "ignored a member znode naming another node")
            }
            Err(e) => tracing::warn!(error = %e, "ignored a znode under the cluster's chroot"),
        }
    }
    let candidates = client.list_children("/election").await?;
    if let Some(lowest) = candidates.iter().min_by_key(|name| sequence_of(name)) {
        match client.get_data(&format!("/election/{lowest}")).await {
            Ok((bytes, stat)) => match decode::<Holder>(service, &format!("election/{lowest}"), &bytes) {
                Ok(holder) => {
                    snapshot.leader =
                        Some(Leader { node: holder.node, incarnation: holder.incarnation, token: stat.czxid as u64 })
                }
                Err(e) => tracing::warn!(error = %e, "ignored a znode under the cluster's chroot"),
            },
            // Gone between the two reads: the next notification tells who follows.
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(e),
        }
    }
    match client.get_data(&format!("/{VIEW_KEY}")).await {
        Ok((bytes, _)) => match decode::<Published>(service, VIEW_KEY, &bytes) {
            Ok(view) => snapshot.view = Some(view),
            Err(e) => tracing::warn!(error = %e, "ignored a znode under the cluster's chroot"),
        },
        Err(zk::Error::NoNode) => {}
        Err(e) => return Err(e),
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::is_registry_path;

    #[test]
    fn the_registry_paths_are_told_apart_from_the_membership_paths() {
        for path in ["/jobs", "/jobs/12", "/checkpoints/3", "/assignments/3"] {
            assert!(is_registry_path(path), "{path}");
        }
        for path in ["/members/1", "/election/n_0000000001", "/view", "/jobsx", "/", ""] {
            assert!(!is_registry_path(path), "{path}");
        }
    }
}
