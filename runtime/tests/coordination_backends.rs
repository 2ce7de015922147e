//! The coordination backends against real servers, started here as child processes on
//! loopback ports with temporary data directories (installed with apt-get when missing):
//! one etcd, a 3-member etcd cluster, a standalone ZooKeeper. Every backend must give the same
//! answers: registration refuses a second live process with the same id, one coordinator at a
//! time, fencing tokens that only grow, writes fenced by them, and a session that ends is
//! heard by its own node and by the others — over TLS too, where the server checks the
//! client's certificate.

use std::collections::BTreeSet;
use std::time::Duration;

use phalanx::cluster::coordination::servers::{EtcdServerTls, LocalEtcd, LocalZooKeeper, ServerTls};
use phalanx::cluster::coordination::{
    Coordination, CoordinationError, Leader, Member, Observed, ServiceTls, Session, Settings,
};
use phalanx::cluster::membership::View;
use tokio::sync::mpsc::Receiver;

/// A bound on each wait for an event: far above what the service takes (the TTL is 2 s).
const WAIT: Duration = Duration::from_secs(20);

fn member(id: u32, incarnation: u64) -> Member {
    Member { id, incarnation, addr: format!("127.0.0.1:{}", 7000 + id) }
}

fn settings() -> Settings {
    Settings { ttl: Duration::from_secs(2), join_timeout: Duration::from_secs(10), tls: None }
}

/// The next event matching `want`, skipping others.
async fn until(events: &mut Receiver<Observed>, what: &str, want: impl Fn(&Observed) -> bool) -> Observed {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if want(&event) => return event,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session's events ended while waiting for {what}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

fn members_are(ids: &[u32]) -> impl Fn(&Observed) -> bool + '_ {
    move |e| matches!(e, Observed::Members(m) if m.keys().copied().collect::<Vec<_>>() == ids)
}

async fn leader_of(events: &mut Receiver<Observed>, node: u32) -> Leader {
    match until(
        events,
        &format!("node {node} as coordinator"),
        |e| matches!(e, Observed::Leader(Some(l)) if l.node == node),
    )
    .await
    {
        Observed::Leader(Some(leader)) => leader,
        _ => unreachable!(),
    }
}

fn view(epoch: u64, coordinator: u32, members: &[u32]) -> View {
    View { epoch, coordinator, members: members.iter().copied().collect::<BTreeSet<_>>() }
}

/// Everything one backend must do, on `spec`.
async fn contract(spec: Coordination) {
    contract_with(spec, settings()).await;
}

/// [`contract`] with these settings (TLS).
async fn contract_with(spec: Coordination, settings: Settings) {
    let settings = || settings.clone();
    let (a, mut a_events) = Session::join(&spec, member(0, 1), settings()).await.unwrap();
    until(&mut a_events, "members {0}", members_are(&[0])).await;
    let (b, mut b_events) = Session::join(&spec, member(1, 1), settings()).await.unwrap();
    until(&mut a_events, "members {0, 1} at node 0", members_are(&[0, 1])).await;
    until(&mut b_events, "members {0, 1} at node 1", members_are(&[0, 1])).await;

    // A second live process with node 0's id is refused, naming the live one.
    let quick = Settings { join_timeout: Duration::from_millis(500), ..settings() };
    match Session::join(&spec, member(0, 2), quick).await {
        Err(CoordinationError::DuplicateMember { node: 0, incarnation: 1, addr, .. }) => {
            assert_eq!(addr, "127.0.0.1:7000")
        }
        Err(other) => panic!("expected a duplicate member, got {other}"),
        Ok(_) => panic!("a second process with node 0's id joined"),
    }

    // One coordinator; a repeated campaign is idempotent; the other is not it.
    let first = a.campaign().await.unwrap().expect("the role is free: node 0 takes it");
    assert_eq!(a.campaign().await.unwrap(), Some(first));
    assert_eq!(b.campaign().await.unwrap(), None);
    assert_eq!(leader_of(&mut b_events, 0).await, Leader { node: 0, incarnation: 1, token: first });

    // The coordinator's writes land; nobody else's, not even with its token.
    assert!(a.publish_view(first, &view(1, 0, &[0, 1])).await.unwrap());
    let seen = until(&mut b_events, "the view", |e| matches!(e, Observed::View(_))).await;
    assert_eq!(
        seen,
        Observed::View(phalanx::cluster::coordination::Published { token: first, view: view(1, 0, &[0, 1]) })
    );
    assert!(!b.put_fenced(first, "jobs/j", b"forged").await.unwrap());
    assert!(a.put_fenced(first, "jobs/j", b"accepted").await.unwrap());
    assert!(a.put_fenced(first, "jobs/j", b"state 2").await.unwrap());
    assert_eq!(b.get("jobs/j").await.unwrap().as_deref(), Some(&b"state 2"[..]));
    assert_eq!(b.get("jobs/none").await.unwrap(), None);

    // The job registry's keys: listed by anyone, bounded, deleted only by the coordinator.
    assert!(a.put_fenced(first, "jobs/k", b"other").await.unwrap());
    let mut listed = b.list("jobs", 10).await.unwrap();
    listed.sort();
    assert_eq!(listed, vec![("j".to_string(), b"state 2".to_vec()), ("k".to_string(), b"other".to_vec())]);
    assert!(matches!(b.list("jobs", 1).await, Err(CoordinationError::Request { .. })), "more than asked for");
    assert!(!b.delete_fenced(first, "jobs/k").await.unwrap());
    assert!(a.delete_fenced(first, "jobs/k").await.unwrap());
    assert!(a.delete_fenced(first, "jobs/k").await.unwrap(), "deleting what is gone already");
    assert_eq!(b.list("jobs", 10).await.unwrap().len(), 1);
    assert_eq!(b.list("nothing", 10).await.unwrap(), Vec::new());

    // The coordinator's process dies (no goodbye): its registration and its role go with its
    // lease or session, and the role passes with a larger token.
    drop(a);
    drop(a_events);
    until(&mut b_events, "members {1} after node 0 died", members_are(&[1])).await;
    let second = match b.campaign().await.unwrap() {
        Some(token) => token,
        None => leader_of(&mut b_events, 1).await.token,
    };
    assert!(second > first, "tokens only grow: {first} then {second}");
    // The old token fences nothing in any more; the new one does.
    assert!(!b.put_fenced(first, "view", b"{}").await.unwrap());
    assert!(b.publish_view(second, &view(2, 1, &[1])).await.unwrap());

    // Node 0 comes back as a new incarnation once the old one is gone.
    let (a2, mut a2_events) = Session::join(&spec, member(0, 2), settings()).await.unwrap();
    until(&mut a2_events, "members {0, 1} after the rejoin", members_are(&[0, 1])).await;
    assert_eq!(leader_of(&mut a2_events, 1).await.token, second);
    assert!(a2.valid_until().is_some());

    // An orderly leave is seen at once (well before a TTL).
    b.leave().await.unwrap();
    until(&mut a2_events, "members {0} after node 1 left", members_are(&[0])).await;
    a2.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_keeps_the_contract() {
    let etcd = LocalEtcd::start(1, None).await.unwrap();
    contract(etcd.spec("/phalanx/one")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_etcds_keep_the_contract_and_survive_their_leader() {
    let mut etcd = LocalEtcd::start(3, None).await.unwrap();
    let spec = etcd.spec("/phalanx/three");
    contract(spec.clone()).await;

    // SIGKILL the etcd leader under a coordinator: its lease, its role and its writes carry on
    // on the two members left.
    // A 4 s lease: renewed every 1.3 s, it outlasts an etcd election (0.5–1 s here) even when
    // the last renewal came just before the kill.
    let long = Settings { ttl: Duration::from_secs(4), ..settings() };
    let (a, mut events) = Session::join(&spec, member(5, 1), long).await.unwrap();
    until(&mut events, "members {5}", members_are(&[5])).await;
    let token = a.campaign().await.unwrap().unwrap();
    let leader = etcd.leader().await.expect("a leader");
    etcd.kill(leader);
    let deadline = std::time::Instant::now() + WAIT;
    let written = loop {
        match a.put_fenced(token, "jobs/after", b"x").await {
            Ok(written) => break written,
            Err(e) if std::time::Instant::now() < deadline => eprintln!("while etcd elects a new leader: {e}"),
            Err(e) => panic!("no write after the etcd leader died: {e}"),
        }
    };
    assert!(written, "the coordinator kept its role through the etcd leader's death");
    let renewed_from = a.valid_until().unwrap();
    let mut validity = a.validity();
    tokio::time::timeout(WAIT, validity.wait_for(|until| until.is_some_and(|t| t > renewed_from)))
        .await
        .expect("the lease is renewed on the members left")
        .expect("the session runs");
    assert_ne!(etcd.leader().await, Some(leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zookeeper_keeps_the_contract() {
    let zookeeper = LocalZooKeeper::start(None).await.unwrap();
    contract(zookeeper.spec("/phalanx/zk")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_hears_its_own_session_end_when_the_service_stops_past_it() {
    // etcd: SIGSTOP past the lease's TTL: the node cannot renew and, once the moment its lease
    // surely held until has passed, reports it gone.
    let etcd = LocalEtcd::start(1, None).await.unwrap();
    let (a, mut events) = Session::join(&etcd.spec("/phalanx/pause"), member(0, 1), settings()).await.unwrap();
    until(&mut events, "members {0}", members_are(&[0])).await;
    etcd.pause(0);
    let expired = until(&mut events, "the lease's end", |e| matches!(e, Observed::Expired { .. })).await;
    assert!(a.valid_until().is_none(), "{expired:?}");
    etcd.resume(0);

    // ZooKeeper: SIGSTOP past the session timeout, then SIGCONT: the server expires the
    // session when it runs again, and the node hears it.
    let zookeeper = LocalZooKeeper::start(None).await.unwrap();
    let (z, mut events) = Session::join(&zookeeper.spec("/phalanx/pause"), member(0, 1), settings()).await.unwrap();
    until(&mut events, "members {0}", members_are(&[0])).await;
    zookeeper.pause();
    // The client sees the server silent well before the session timeout; stay paused past it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    zookeeper.resume();
    until(&mut events, "the session's end", |e| matches!(e, Observed::Expired { .. })).await;
    assert!(z.valid_until().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_over_tls_keeps_the_contract_and_refuses_whoever_it_cannot_trust() {
    // The etcd serves node 0's certificate and accepts clients the CA signed.
    let (certs, client) = cluster_ca();
    let server = EtcdServerTls { server: ServerTls::of_node(certs.path(), 0), harness: client.clone() };
    let etcd = LocalEtcd::start_with(1, None, Some(server)).await.unwrap();
    let spec = etcd.spec("/phalanx/tls");
    contract_with(spec.clone(), Settings { tls: Some(client), ..settings() }).await;

    refuses_whoever_it_cannot_trust(&spec, certs.path()).await;
    // A directory without the CA: a clear error naming the file.
    let err = ServiceTls::load(certs.path().join("node-0").join("missing").as_path()).unwrap_err().to_string();
    assert!(err.contains("ca.pem") && err.contains("--coordination-certs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zookeeper_over_tls_keeps_the_contract_and_refuses_whoever_it_cannot_trust() {
    // The ZooKeeper serves node 0's certificate on its TLS port and requires a client
    // certificate the CA signed (`ssl.clientAuth=need`).
    let (certs, client) = cluster_ca();
    let zookeeper = LocalZooKeeper::start_with(None, Some(ServerTls::of_node(certs.path(), 0))).await.unwrap();
    let spec = zookeeper.spec("/phalanx/tls");
    contract_with(spec.clone(), Settings { tls: Some(client), ..settings() }).await;

    refuses_whoever_it_cannot_trust(&spec, certs.path()).await;
}

/// A cluster CA from `phalanx certs` whose node 0 certificate names 127.0.0.1 (a local server
/// serves it), and the `client/` identity the nodes present.
fn cluster_ca() -> (tempfile::TempDir, std::sync::Arc<ServiceTls>) {
    let certs = tempfile::tempdir().unwrap();
    let names = std::collections::BTreeMap::from([(0, vec!["127.0.0.1".to_string()])]);
    phalanx_transport::certs::generate_named(certs.path(), 1, &names).unwrap();
    let client = std::sync::Arc::new(ServiceTls::load(&certs.path().join("client")).unwrap());
    (certs, client)
}

/// A service speaking TLS with the CA in `certs` refuses plain TCP, a client that trusts the CA
/// but has no certificate, and a client of another cluster's CA: no session for any of them.
async fn refuses_whoever_it_cannot_trust(spec: &Coordination, certs: &std::path::Path) {
    let quick = Settings { join_timeout: Duration::from_millis(1500), ..settings() };
    let ca_only = tempfile::tempdir().unwrap();
    std::fs::copy(certs.join("ca.pem"), ca_only.path().join("ca.pem")).unwrap();
    let stranger = tempfile::tempdir().unwrap();
    phalanx_transport::certs::generate(stranger.path(), 1).unwrap();
    let load = |dir: &std::path::Path| Some(std::sync::Arc::new(ServiceTls::load(dir).unwrap()));
    for (who, tls) in [
        ("plain TCP", None),
        ("no client certificate", load(ca_only.path())),
        ("another CA's client", load(&stranger.path().join("client"))),
    ] {
        match Session::join(spec, member(7, 1), Settings { tls, ..quick.clone() }).await {
            Err(CoordinationError::Unreachable { .. }) => {}
            other => panic!("{who} to {spec}: {other:?}"),
        }
    }
}
