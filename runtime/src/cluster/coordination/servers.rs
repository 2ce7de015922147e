//! Coordination servers started as child processes on loopback ports, each with its own
//! temporary data directory: one etcd, a 3-member etcd cluster, a standalone ZooKeeper. What
//! `phalanx local --coordination etcd|zookeeper` and the tests run against.
//!
//! The servers come from Debian's packages `etcd-server` and `zookeeperd`; when a binary is
//! missing, [`install`] installs its package with apt-get (as root; the error says what to run
//! otherwise). The servers' own output goes to a log file in their directory; an error while
//! starting one quotes its end.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcdv3client::pb;

use super::Coordination;

/// How long a server may take to answer after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A package is missing and could not be installed.
    #[error("{package} is not installed and could not be installed: {reason}")]
    Install {
        /// The Debian package.
        package: String,
        /// Why.
        reason: String,
    },
    /// The process did not start.
    #[error("cannot start {what}: {reason}")]
    Spawn {
        /// The server.
        what: String,
        /// Why.
        reason: String,
    },
    /// The process started but did not answer in time (or exited).
    #[error("{what} did not answer within {waited:?}; the end of its log ({log}):\n{tail}")]
    NotReady {
        /// The server.
        what: String,
        /// How long it was given.
        waited: Duration,
        /// Its log file.
        log: String,
        /// The end of it.
        tail: String,
    },
}

/// Install the Debian `package` with apt-get unless every file of `probes` exists already.
pub fn install(package: &str, probes: &[&Path]) -> Result<(), ServerError> {
    // Servers of one process start concurrently (tests); apt-get takes one at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(probe) = probes.iter().find(|p| !p.exists()) else { return Ok(()) };
    let fail = |reason: String| ServerError::Install { package: package.to_string(), reason };
    if Command::new("apt-get").arg("--version").stdout(Stdio::null()).status().is_err() {
        return Err(fail(format!(
            "no {} and no apt-get here: install {package} (or its upstream release)",
            probe.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(fail(format!("apt-get needs root: sudo apt-get install -y {package}")));
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            // Another apt (of this machine, not ours) may hold the lock for a while.
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(e.to_string()))
    };
    let mut out = apt(&["install", "-y", "-q", "--no-install-recommends", package])?;
    if !out.status.success() {
        // A fresh machine may have no package lists yet.
        apt(&["update", "-q"])?;
        out = apt(&["install", "-y", "-q", "--no-install-recommends", package])?;
    }
    if !out.status.success() || probes.iter().any(|p| !p.exists()) {
        return Err(fail(format!("apt-get install {package}: {}", tail_of(&String::from_utf8_lossy(&out.stderr)))));
    }
    Ok(())
}

/// `n` loopback ports free right now (the OS picks them; they are released for the child).
fn free_ports(n: usize) -> Result<Vec<u16>, ServerError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Spawn { what: "a server".into(), reason: format!("no free port: {e}") })?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| ServerError::Spawn { what: "a server".into(), reason: e.to_string() })
}

/// `dir`, created; or a fresh temporary directory (`phalanx-WHAT-…`), removed with the value
/// returned beside it.
fn data_dir(dir: Option<&Path>, what: &str) -> Result<(PathBuf, Option<tempfile::TempDir>), ServerError> {
    let fail = |e: std::io::Error| ServerError::Spawn { what: what.to_string(), reason: e.to_string() };
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(fail)?;
            Ok((d.to_path_buf(), None))
        }
        None => {
            let t = tempfile::Builder::new().prefix(&format!("phalanx-{what}-")).tempdir().map_err(fail)?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// One child process, its log, and whether it is stopped (SIGSTOP).
struct Process {
    what: String,
    child: Option<Child>,
    log: PathBuf,
    command: Command,
}

impl Process {
    fn spawn(what: String, mut command: Command, log: PathBuf) -> Result<Self, ServerError> {
        let mut process = Process { what, child: None, log, command: Command::new("true") };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&process.log).map_err(|e| {
            ServerError::Spawn { what: process.what.clone(), reason: format!("{}: {e}", process.log.display()) }
        })?;
        let err =
            file.try_clone().map_err(|e| ServerError::Spawn { what: process.what.clone(), reason: e.to_string() })?;
        command.stdin(Stdio::null()).stdout(file).stderr(err);
        process.child = Some(
            command.spawn().map_err(|e| ServerError::Spawn { what: process.what.clone(), reason: e.to_string() })?,
        );
        process.command = command;
        Ok(process)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal(libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the same command again (after a kill), appending to the same log.
    fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .map_err(|e| ServerError::Spawn { what: self.what.clone(), reason: e.to_string() })?;
        let err =
            file.try_clone().map_err(|e| ServerError::Spawn { what: self.what.clone(), reason: e.to_string() })?;
        self.command.stdout(file).stderr(err);
        self.child = Some(
            self.command.spawn().map_err(|e| ServerError::Spawn { what: self.what.clone(), reason: e.to_string() })?,
        );
        Ok(())
    }

    /// Exited on its own (a crash while starting)?
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn not_ready(&self, waited: Duration) -> ServerError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        ServerError::NotReady {
            what: self.what.clone(),
            waited,
            log: self.log.display().to_string(),
            tail: tail_of(&log),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd cluster of child processes on loopback.
pub struct LocalEtcd {
    members: Vec<Process>,
    client_ports: Vec<u16>,
    tls: Option<EtcdServerTls>,
    _dir: Option<tempfile::TempDir>,
}

/// What a local server needs to serve its clients over TLS and check their certificates: PEM
/// files, as `phalanx certs` writes them.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate (naming `127.0.0.1`).
    pub cert: PathBuf,
    /// Its key (PKCS#8).
    pub key: PathBuf,
    /// The CA that signs the clients' certificates.
    pub client_ca: PathBuf,
}

impl ServerTls {
    /// Node `node`'s certificate and key in a directory `phalanx certs` wrote, and its CA.
    pub fn of_node(certs: &Path, node: u32) -> Self {
        let dir = certs.join(format!("node-{node}"));
        ServerTls { cert: dir.join("node.pem"), key: dir.join("node.key"), client_ca: certs.join("ca.pem") }
    }
}

/// TLS for a [`LocalEtcd`]: what its members serve, and what the harness itself presents when
/// it asks them who leads.
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// The members' side.
    pub server: ServerTls,
    /// The harness's side.
    pub harness: std::sync::Arc<super::ServiceTls>,
}

/// The etcd binary of Debian's `etcd-server`.
pub const ETCD: &str = "/usr/bin/etcd";

impl LocalEtcd {
    /// Start `size` members (1 or 3, say) in `dir` (a fresh temporary directory when `None`,
    /// removed with this value) and wait until the cluster has a leader.
    pub async fn start(size: usize, dir: Option<&Path>) -> Result<Self, ServerError> {
        Self::start_with(size, dir, None).await
    }

    /// [`LocalEtcd::start`] serving its clients over TLS (and checking their certificates).
    pub async fn start_with(size: usize, dir: Option<&Path>, tls: Option<EtcdServerTls>) -> Result<Self, ServerError> {
        install("etcd-server", &[Path::new(ETCD)])?;
        let (dir, owned) = data_dir(dir, "etcd")?;
        let ports = free_ports(2 * size)?;
        let (client_ports, peer_ports) = ports.split_at(size);
        let initial: Vec<String> =
            peer_ports.iter().enumerate().map(|(i, p)| format!("etcd{i}=http://127.0.0.1:{p}")).collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            let data = dir.join(format!("etcd{i}"));
            let mut command = Command::new(ETCD);
            command
                .arg("--name")
                .arg(format!("etcd{i}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("{scheme}://127.0.0.1:{}", client_ports[i]))
                .arg("--advertise-client-urls")
                .arg(format!("{scheme}://127.0.0.1:{}", client_ports[i]))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{}", peer_ports[i]))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{}", peer_ports[i]))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("phalanx-{}", std::process::id()))
                // Loopback: a leader change within a few hundred milliseconds.
                .arg("--heartbeat-interval")
                .arg("50")
                .arg("--election-timeout")
                .arg("500")
                .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
            if let Some(EtcdServerTls { server: tls, .. }) = &tls {
                command
                    .arg("--cert-file")
                    .arg(&tls.cert)
                    .arg("--key-file")
                    .arg(&tls.key)
                    .arg("--trusted-ca-file")
                    .arg(&tls.client_ca)
                    .arg("--client-cert-auth");
            }
            members.push(Process::spawn(format!("etcd member {i}"), command, dir.join(format!("etcd{i}.log")))?);
        }
        let cluster = LocalEtcd { members, client_ports: client_ports.to_vec(), tls, _dir: owned };
        cluster.wait_leader(Instant::now() + START_TIMEOUT).await
    }

    async fn wait_leader(mut self, deadline: Instant) -> Result<Self, ServerError> {
        loop {
            if self.leader().await.is_some() {
                return Ok(self);
            }
            for member in &mut self.members {
                if member.exited().is_some() || Instant::now() >= deadline {
                    return Err(member.not_ready(START_TIMEOUT));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `HOST:PORT` of each member's client port.
    pub fn endpoints(&self) -> Vec<String> {
        self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// The spec a node joins with (`etcd://…/PREFIX`).
    pub fn spec(&self, prefix: &str) -> Coordination {
        Coordination::Etcd { endpoints: self.endpoints(), prefix: prefix.to_string() }
    }

    /// The member that leads the cluster now, as the running members report it.
    pub async fn leader(&self) -> Option<usize> {
        for (i, port) in self.client_ports.iter().enumerate() {
            if self.members[i].child.is_none() {
                continue;
            }
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}")) else {
                continue;
            };
            let mut endpoint = endpoint.connect_timeout(Duration::from_millis(300)).timeout(Duration::from_millis(500));
            if let Some(tls) = &self.tls {
                let Ok(with_tls) = endpoint.tls_config(super::etcd::tls_config(&tls.harness)) else { continue };
                endpoint = with_tls;
            }
            let Ok(channel) = endpoint.connect().await else { continue };
            let mut client = pb::maintenance_client::MaintenanceClient::new(channel);
            let Ok(status) = client.status(pb::StatusRequest {}).await else { continue };
            let status = status.into_inner();
            if status.leader == 0 {
                continue;
            }
            if status.header.as_ref().is_some_and(|h| h.member_id == status.leader) {
                return Some(i);
            }
        }
        None
    }

    /// How many members it has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// [`LocalEtcd::leader`] from synchronous code (a thread with its own runtime).
    pub fn leader_blocking(&self) -> Option<usize> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                    runtime.block_on(self.leader())
                })
                .join()
                .ok()
                .flatten()
        })
    }

    /// The process id of member `i` (while it runs).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].pid()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// SIGSTOP member `i` (it answers nothing until [`LocalEtcd::resume`]).
    pub fn pause(&self, i: usize) {
        self.members[i].signal(libc::SIGSTOP);
    }

    /// SIGCONT member `i`.
    pub fn resume(&self, i: usize) {
        self.members[i].signal(libc::SIGCONT);
    }

    /// Start member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> Result<(), ServerError> {
        self.members[i].restart()
    }
}

/// A standalone ZooKeeper server, a child process on loopback.
pub struct LocalZooKeeper {
    server: Process,
    port: u16,
    /// The TLS port, when the server speaks TLS to its clients.
    secure_port: Option<u16>,
    _dir: Option<tempfile::TempDir>,
}

/// Netty, which ZooKeeper's TLS runs on (Debian's `libnetty-java`, a dependency of `zookeeperd`).
pub const NETTY_JARS: [&str; 6] = [
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-handler.jar",
    "/usr/share/java/netty-transport.jar",
    "/usr/share/java/netty-buffer.jar",
    "/usr/share/java/netty-common.jar",
    "/usr/share/java/netty-resolver.jar",
];

/// The jar of Debian's `zookeeper` (pulled in by `zookeeperd`).
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// The Java runtime ZooKeeper runs on (Debian's `default-jre-headless`, a dependency of
/// `zookeeperd`).
pub const JAVA: &str = "/usr/bin/java";

/// ZooKeeper's tick on loopback: sessions may last 2–100 ticks (0.4–20 s) and expire within
/// a tick of their timeout.
pub const ZOOKEEPER_TICK_MS: u64 = 200;

impl LocalZooKeeper {
    /// Start a standalone server in `dir` (a fresh temporary directory when `None`) and wait
    /// until it answers.
    pub async fn start(dir: Option<&Path>) -> Result<Self, ServerError> {
        Self::start_with(dir, None).await
    }

    /// [`LocalZooKeeper::start`] also serving its clients over TLS, on a second port, and
    /// requiring a certificate signed by `tls.client_ca` there ([`spec`](Self::spec) names it).
    pub async fn start_with(dir: Option<&Path>, tls: Option<ServerTls>) -> Result<Self, ServerError> {
        // The server's jar and a Java runtime (zookeeperd depends on both).
        install("zookeeperd", &[Path::new(ZOOKEEPER_JAR), Path::new(JAVA)])?;
        let (dir, owned) = data_dir(dir, "zookeeper")?;
        let ports = free_ports(2)?;
        let port = ports[0];
        let spawn_error = |path: &Path, e: std::io::Error| ServerError::Spawn {
            what: "ZooKeeper".into(),
            reason: format!("{}: {e}", path.display()),
        };
        let config = dir.join("zoo.cfg");
        let mut text = format!(
            "tickTime={ZOOKEEPER_TICK_MS}\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
             maxSessionTimeout={}\nadmin.enableServer=false\n4lw.commands.whitelist=srvr,ruok\n",
            dir.join("data").display(),
            100 * ZOOKEEPER_TICK_MS
        );
        let mut classpath = format!("/etc/zookeeper/conf:{ZOOKEEPER_JAR}");
        let secure_port = match &tls {
            None => None,
            Some(tls) => {
                // The key store is one PEM file: the key, then the certificate.
                let store = dir.join("server-keystore.pem");
                let mut pem = std::fs::read(&tls.key).map_err(|e| spawn_error(&tls.key, e))?;
                pem.extend(std::fs::read(&tls.cert).map_err(|e| spawn_error(&tls.cert, e))?);
                std::fs::write(&store, pem).map_err(|e| spawn_error(&store, e))?;
                text.push_str(&format!(
                    "secureClientPort={}\nsecureClientPortAddress=127.0.0.1\n\
                     serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                     ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
                     ssl.trustStore.location={}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n",
                    ports[1],
                    store.display(),
                    tls.client_ca.display()
                ));
                for jar in NETTY_JARS {
                    classpath.push(':');
                    classpath.push_str(jar);
                }
                Some(ports[1])
            }
        };
        std::fs::write(&config, text).map_err(|e| spawn_error(&config, e))?;
        let mut command = Command::new(JAVA);
        command
            .arg("-cp")
            .arg(classpath)
            .arg("-Xmx256m")
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(&config);
        let mut server = Process::spawn("ZooKeeper".into(), command, dir.join("zookeeper.log"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !answers(port) {
            if server.exited().is_some() || Instant::now() >= deadline {
                return Err(server.not_ready(START_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(LocalZooKeeper { server, port, secure_port, _dir: owned })
    }

    /// `HOST:PORT` of the server: its TLS port when it speaks TLS.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.secure_port.unwrap_or(self.port))
    }

    /// `HOST:PORT` of the server's plain TCP port (also open when it speaks TLS).
    pub fn plain_host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The spec a node joins with (`zk://…/CHROOT`).
    pub fn spec(&self, chroot: &str) -> Coordination {
        Coordination::ZooKeeper { hosts: vec![self.host()], chroot: chroot.to_string() }
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Start the server again on its data directory.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.server.restart()
    }

    /// SIGSTOP the server (it answers nothing until [`LocalZooKeeper::resume`]).
    pub fn pause(&self) {
        self.server.signal(libc::SIGSTOP);
    }

    /// SIGCONT the server.
    pub fn resume(&self) {
        self.server.signal(libc::SIGCONT);
    }
}

/// Does a ZooKeeper server answer `srvr` on `port`?
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"srvr").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("Mode:")
}
