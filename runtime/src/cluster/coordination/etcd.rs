//! The etcd backend (v3 API over gRPC).
//!
//! A session is one lease. The member key `PREFIX/members/ID` is created on it only if absent
//! (a transaction), so a second live process with the same id is refused; the coordinator key
//! `PREFIX/coordinator` likewise, and its create revision — which only grows in an etcd
//! cluster — is the fencing token. Every write a coordinator makes is a transaction comparing
//! that create revision with its token. One watch on the prefix feeds the observer; after a
//! compaction or a lost stream it reads the prefix again and watches on from there.
//!
//! The gRPC stubs are those of etcd's `rpc.proto` as shipped by the `etcdv3client` crate: the
//! `etcd-client` crate generates them at build time, which would make `protoc` a requirement
//! of every machine that builds Phalanx.

use phalanx_actors::clock;
use std::time::{Duration, Instant};

use etcdv3client::pb;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{
    decode, deliver, member_id, Common, CoordinationError, Leader, Member, Observed, Published, Settings, Snapshot,
};
use super::{Holder, FIRST_RETRY, MAX_MEMBERS, MAX_RETRY, OBSERVED_QUEUE, VIEW_KEY};

/// How long one request may take before the client gives up on it (and retries, or fails).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for a TCP connection to an etcd member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A node's session with etcd.
pub struct EtcdSession {
    pub(super) common: Common,
    prefix: String,
    me: Member,
    kv: KvClient<Channel>,
    leases: LeaseClient<Channel>,
    lease: i64,
}

impl EtcdSession {
    /// See [`super::Session::join`].
    pub async fn join(
        endpoints: &[String],
        prefix: &str,
        me: Member,
        settings: Settings,
    ) -> Result<(Self, mpsc::Receiver<Observed>), CoordinationError> {
        let service = format!("etcd://{}{prefix}", endpoints.join(","));
        let unreachable = |reason: String| CoordinationError::Unreachable { service: service.clone(), reason };
        let tls = settings.tls.as_deref().map(tls_config);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut list = Vec::with_capacity(endpoints.len());
        for host in endpoints {
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}"))
                .map_err(|e| unreachable(format!("{host}: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| unreachable(format!("{host}: TLS: {e}")))?;
            }
            list.push(endpoint);
        }
        let channel = Channel::balance_list(list.into_iter());
        let kv = KvClient::new(channel.clone());
        let mut leases = LeaseClient::new(channel.clone());
        let deadline = clock::now() + settings.join_timeout;

        // The service may still be starting: try until the join timeout.
        let ttl_s = settings.ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut retry = FIRST_RETRY;
        let (lease, valid_until) = loop {
            let sent = clock::now();
            match request(leases.lease_grant(pb::LeaseGrantRequest { ttl: ttl_s, id: 0 })).await {
                Ok(r) if r.error.is_empty() && r.ttl > 0 => break (r.id, sent + Duration::from_secs(r.ttl as u64)),
                Ok(r) => return Err(unreachable(format!("lease grant refused: {} (ttl {})", r.error, r.ttl))),
                Err(reason) if clock::now() + retry < deadline => {
                    tracing::debug!(%service, %reason, "etcd not answering yet");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
                Err(reason) => {
                    return Err(unreachable(format!("no answer within {:?}: {reason}", settings.join_timeout)))
                }
            }
        };
        let (valid_tx, valid) = watch::channel(Some(valid_until));
        let session = EtcdSession {
            common: Common { service: service.clone(), valid, tasks: Vec::new() },
            prefix: prefix.to_string(),
            me: me.clone(),
            kv,
            leases: leases.clone(),
            lease,
        };
        let (events_tx, events) = mpsc::channel(OBSERVED_QUEUE);
        let mut session = session;
        session.common.tasks.push(tokio::spawn(keep_alive(
            leases,
            lease,
            settings.ttl,
            valid_tx,
            events_tx.clone(),
            service.clone(),
        )));
        if let Err(e) = session.register(settings.ttl, deadline).await {
            let _ = request(session.leases.lease_revoke(pb::LeaseRevokeRequest { id: lease })).await;
            return Err(e);
        }
        session.common.tasks.push(tokio::spawn(observe(
            session.kv.clone(),
            WatchClient::new(channel),
            session.prefix.clone(),
            events_tx,
            service,
        )));
        Ok((session, events))
    }

    fn key(&self, rel: &str) -> Vec<u8> {
        format!("{}/{rel}", self.prefix).into_bytes()
    }

    fn failed(&self, op: &str, reason: String) -> CoordinationError {
        CoordinationError::Request { service: self.common.service.clone(), op: op.to_string(), reason }
    }

    /// Create `members/ID` on the lease unless another process holds it; wait (until the join
    /// timeout) for the registration of a previous incarnation to run out with its lease.
    async fn register(&self, ttl: Duration, deadline: Instant) -> Result<(), CoordinationError> {
        let key = self.key(&format!("members/{}", self.me.id));
        let value = serde_json::to_vec(&self.me).expect("a member serialises");
        let mut kv = self.kv.clone();
        loop {
            let txn = pb::TxnRequest {
                compare: vec![create_revision_is(&key, 0)],
                success: vec![put(&key, value.clone(), self.lease)],
                failure: vec![range(&key)],
            };
            let r = request(kv.txn(txn)).await.map_err(|e| self.failed("register", e))?;
            if r.succeeded {
                return Ok(());
            }
            let holder = first_kv(&r.responses)
                .map(|kv| decode::<Member>(&self.common.service, &format!("members/{}", self.me.id), &kv.value))
                .transpose()?;
            let Some(holder) = holder else { continue };
            self.common.wait_for_predecessor(&self.me, holder, ttl, deadline).await?;
        }
    }

    /// See [`super::Session::campaign`].
    pub async fn campaign(&self) -> Result<Option<u64>, CoordinationError> {
        let key = self.key("coordinator");
        let value = serde_json::to_vec(&Holder { node: self.me.id, incarnation: self.me.incarnation })
            .expect("a holder serialises");
        let txn = pb::TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put(&key, value, self.lease)],
            failure: vec![range(&key)],
        };
        let r = request(self.kv.clone().txn(txn)).await.map_err(|e| self.failed("campaign", e))?;
        if r.succeeded {
            let revision = r.header.map(|h| h.revision).unwrap_or(0);
            return Ok(u64::try_from(revision).ok().filter(|t| *t > 0));
        }
        // Held already: by this session (a retried campaign) or by another.
        Ok(first_kv(&r.responses)
            .filter(|kv| kv.lease == self.lease)
            .and_then(|kv| u64::try_from(kv.create_revision).ok()))
    }

    /// See [`super::Session::put_fenced`].
    pub async fn put_fenced(&self, token: u64, rel: &str, value: &[u8]) -> Result<bool, CoordinationError> {
        self.fenced(token, &format!("put {rel}"), put(&self.key(rel), value.to_vec(), 0)).await
    }

    /// See [`super::Session::delete_fenced`].
    pub async fn delete_fenced(&self, token: u64, rel: &str) -> Result<bool, CoordinationError> {
        let delete = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: self.key(rel),
                ..Default::default()
            })),
        };
        self.fenced(token, &format!("delete {rel}"), delete).await
    }

    /// Carry `op` out in a transaction that first checks the role is held with `token` — and
    /// by this session: another node knowing the token does not make it the coordinator.
    async fn fenced(&self, token: u64, what: &str, op: pb::RequestOp) -> Result<bool, CoordinationError> {
        let token = i64::try_from(token).map_err(|_| self.failed(what, format!("token {token} out of range")))?;
        let txn = pb::TxnRequest {
            compare: vec![
                create_revision_is(&self.key("coordinator"), token),
                lease_is(&self.key("coordinator"), self.lease),
            ],
            success: vec![op],
            failure: vec![],
        };
        let r = request(self.kv.clone().txn(txn)).await.map_err(|e| self.failed(what, e))?;
        Ok(r.succeeded)
    }

    /// See [`super::Session::list`].
    pub async fn list(&self, dir: &str, most: usize) -> Result<Vec<(String, Vec<u8>)>, CoordinationError> {
        let from = self.key(&format!("{dir}/"));
        // Every key that starts with `dir/`: up to `dir0` (`0` follows `/`).
        let mut to = from.clone();
        *to.last_mut().expect("a key ends with `/`") += 1;
        let limit = i64::try_from(most).unwrap_or(i64::MAX);
        let r = request(self.kv.clone().range(pb::RangeRequest {
            key: from.clone(),
            range_end: to,
            limit,
            ..Default::default()
        }))
        .await
        .map_err(|e| self.failed(&format!("list {dir}"), e))?;
        if r.more {
            return Err(self.failed(&format!("list {dir}"), format!("more than {most} keys")));
        }
        Ok(r.kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key[from.len()..]).into_owned(), kv.value))
            .collect())
    }

    /// See [`super::Session::get`].
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, CoordinationError> {
        let key = self.key(rel);
        let r = request(self.kv.clone().range(pb::RangeRequest { key, ..Default::default() }))
            .await
            .map_err(|e| self.failed(&format!("get {rel}"), e))?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// See [`super::Session::leave`].
    pub async fn leave(&self) -> Result<(), CoordinationError> {
        request(self.leases.clone().lease_revoke(pb::LeaseRevokeRequest { id: self.lease }))
            .await
            .map_err(|e| self.failed("revoke the lease", e))?;
        Ok(())
    }
}

/// The TLS of a connection to etcd: the CA of its certificate, and this client's certificate for
/// an etcd that checks its clients. tonic's rustls config takes the process default crypto
/// provider, and with ring and aws-lc-rs both compiled in (zookeeper-client brings the latter)
/// there is none unless one is installed: ring, as everywhere in Phalanx.
pub(super) fn tls_config(tls: &super::ServiceTls) -> ClientTlsConfig {
    phalanx_transport::tls::install_default_provider();
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    match &tls.identity {
        Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
        None => config,
    }
}

/// A unary request with [`REQUEST_TIMEOUT`]; the error as text.
async fn request<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

fn create_revision_is(key: &[u8], revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(pb::compare::TargetUnion::CreateRevision(revision)),
    }
}

fn lease_is(key: &[u8], lease: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Lease as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(pb::compare::TargetUnion::Lease(lease)),
    }
}

fn put(key: &[u8], value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn range(key: &[u8]) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

fn first_kv(responses: &[pb::ResponseOp]) -> Option<&pb::KeyValue> {
    responses.iter().find_map(|r| match &r.response {
        Some(pb::response_op::Response::ResponseRange(range)) => range.kvs.first(),
        _ => None,
    })
}

/// Renew the lease every third of its TTL; publish until when it surely holds. The lease is
/// reported expired when etcd says so (TTL 0) or when it could not be renewed before that
/// moment passed — then nothing this node does under it can be trusted any more.
async fn keep_alive(
    mut leases: LeaseClient<Channel>,
    lease: i64,
    ttl: Duration,
    valid: watch::Sender<Option<Instant>>,
    events: mpsc::Sender<Observed>,
    service: String,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let expired = |reason: String| {
        valid.send_replace(None);
        let events = events.clone();
        async move {
            let _ = events.send(Observed::Expired { reason }).await;
        }
    };
    loop {
        // etcd answers the stream's headers with its first renewal: send it before opening.
        let (requests, rx) = mpsc::channel(1);
        let mut sent = clock::now();
        requests.send(pb::LeaseKeepAliveRequest { id: lease }).await.expect("the receiver is here");
        let opened = tokio::time::timeout(
            REQUEST_TIMEOUT,
            leases.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream.into_inner(),
            Ok(Err(status)) => {
                tracing::debug!(%service, lease, %status, "lease keep-alive stream refused");
                if !still_valid(&valid) {
                    return expired(format!("lease {lease} not renewed in time: {}", status.message())).await;
                }
                tokio::time::sleep(FIRST_RETRY).await;
                continue;
            }
            Err(_) => {
                if !still_valid(&valid) {
                    return expired(format!("lease {lease} not renewed in time: no answer")).await;
                }
                continue;
            }
        };
        loop {
            match tokio::time::timeout(period, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl > 0 => {
                    valid.send_replace(Some(sent + Duration::from_secs(r.ttl as u64)));
                }
                Ok(Ok(Some(_))) => return expired(format!("etcd has no lease {lease} any more (it expired)")).await,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    if !still_valid(&valid) {
                        return expired(format!("lease {lease} not renewed in time")).await;
                    }
                    break;
                }
            }
            tokio::time::sleep_until((sent + period).into()).await;
            sent = clock::now();
            if requests.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err() {
                break;
            }
        }
    }
}

fn still_valid(valid: &watch::Sender<Option<Instant>>) -> bool {
    valid.borrow().is_some_and(|until| clock::now() < until)
}

/// Read the prefix, then watch it from the revision read; on any break read it again.
async fn observe(
    mut kv: KvClient<Channel>,
    mut watcher: WatchClient<Channel>,
    prefix: String,
    events: mpsc::Sender<Observed>,
    service: String,
) {
    let start = format!("{prefix}/").into_bytes();
    // The end of the range: the prefix with `/` bumped to `0`.
    let end = format!("{prefix}0").into_bytes();
    let mut seen = Snapshot::default();
    let mut retry = FIRST_RETRY;
    loop {
        let read =
            request(kv.range(pb::RangeRequest { key: start.clone(), range_end: end.clone(), ..Default::default() }))
                .await;
        let (mut state, revision) = match read {
            Ok(r) => {
                let mut state = Snapshot::default();
                for item in r.kvs {
                    state.put_kv(&service, &prefix, item);
                }
                (state, r.header.map(|h| h.revision).unwrap_or(0))
            }
            Err(reason) => {
                tracing::debug!(%service, %reason, "reading the prefix failed; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        if !deliver(&events, seen.changes_to(&state)).await {
            return;
        }
        seen = state.clone();

        let (requests, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: start.clone(),
                range_end: end.clone(),
                start_revision: revision + 1,
                ..Default::default()
            })),
        };
        requests.send(create).await.expect("the receiver is here");
        let mut stream = match request(watcher.watch(tokio_stream::wrappers::ReceiverStream::new(rx))).await {
            Ok(stream) => stream,
            Err(reason) => {
                tracing::debug!(%service, %reason, "watch refused; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        retry = FIRST_RETRY;
        loop {
            match stream.message().await {
                Ok(Some(r)) if r.canceled || r.compact_revision > 0 => {
                    tracing::debug!(%service, reason = %r.cancel_reason, compacted = r.compact_revision, "watch cancelled; reading again");
                    break;
                }
                Ok(Some(r)) => {
                    for event in r.events {
                        let Some(item) = event.kv else { continue };
                        if event.r#type == pb::event::EventType::Delete as i32 {
                            state.delete_key(&prefix, &item.key);
                        } else {
                            state.put_kv(&service, &prefix, item);
                        }
                    }
                    if !deliver(&events, seen.changes_to(&state)).await {
                        return;
                    }
                    seen = state.clone();
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(%service, "watch stream ended; reading again");
                    break;
                }
            }
        }
        drop(requests);
    }
}

/// The observer's snapshot kept up to date from the prefix's keys, as read or told.
impl Snapshot {
    fn put_kv(&mut self, service: &str, prefix: &str, item: pb::KeyValue) {
        let key = String::from_utf8_lossy(&item.key);
        let Some(rel) = key.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')) else { return };
        let parsed = match rel {
            "coordinator" => decode::<Holder>(service, rel, &item.value).map(|h| {
                self.leader = u64::try_from(item.create_revision).ok().map(|token| Leader {
                    node: h.node,
                    incarnation: h.incarnation,
                    token,
                });
            }),
            VIEW_KEY => decode::<Published>(service, rel, &item.value).map(|p| self.view = Some(p)),
            _ => match rel.strip_prefix("members/") {
                Some(id) => member_id(service, id).and_then(|id| {
                    let member = decode::<Member>(service, rel, &item.value)?;
                    if member.id != id {
                        return Err(CoordinationError::BadValue {
                            service: service.to_string(),
                            key: rel.to_string(),
                            reason: format!("names node {}", member.id),
                        });
                    }
                    if self.members.len() >= MAX_MEMBERS && !self.members.contains_key(&id) {
                        return Err(CoordinationError::BadValue {
                            service: service.to_string(),
                            key: rel.to_string(),
                            reason: format!("more than {MAX_MEMBERS} members"),
                        });
                    }
                    self.members.insert(id, member);
                    Ok(())
                }),
                None => Ok(()),
            },
        };
        if let Err(e) = parsed {
            tracing::warn!(error = %e, "ignored a value under the cluster's prefix");
        }
    }

    fn delete_key(&mut self, prefix: &str, key: &[u8]) {
        let key = String::from_utf8_lossy(key);
        let Some(rel) = key.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')) else { return };
        match rel {
            "coordinator" => self.leader = None,
            VIEW_KEY => self.view = None,
            _ => {
                if let Some(id) = rel.strip_prefix("members/").and_then(|id| id.parse::<u32>().ok()) {
                    self.members.remove(&id);
                }
            }
        }
    }
}
