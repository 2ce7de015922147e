#!/usr/bin/env python3
"""Figures per coordination backend: failure detection, recovery, coordinator election, and the
control traffic a membership change adds on the coordination service.

    python3 bench/coordination.py [--repeats 5] [--out bench/results/coordination.json]

Builds `phalanx` (release), starts one etcd and one standalone ZooKeeper as child processes on
loopback ports (Debian's `etcd-server` and `zookeeperd`: `phalanx local --coordination` installs
them when missing, so this runs one such job first), and for each backend (embedded, etcd,
ZooKeeper) runs the same 3-node job `--repeats` times without a fault and with the coordinator's
node SIGKILLed at step 300 (`phalanx local --kill 0@300`):

- detection: from the SIGKILL to the first `down` event (the lease TTL or session timeout on a
  service; the failure timeout embedded), as `phalanx local` reports it;
- recovery: from the SIGKILL to the first step applied after it;
- election: from the first `down` event to the new coordinator's `coordinating` event;
- service bytes: what the service received and sent during a fault-free run (joins, watches,
  the views, keep-alives), and how many more during the run with the kill — one more membership
  change, plus the keep-alives of the seconds the survivors waited for the lease or session to
  run out (an upper bound of the change's own traffic) (etcd: its gRPC byte counters from
  /metrics; ZooKeeper: `mntr`'s received and response bytes).

Prints a table and writes JSON. Timings are wall clock on this machine; the TTL and session
timeout are Phalanx's default, 2000 ms.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHALANX = os.path.join(ROOT, "target", "release", "phalanx")
JOB = ["--model", "mlp", "--dataset", "winequality", "--epochs", "30", "--trainers", "3"]
TTL_MS = 2000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    sys.exit(f"coordination bench: {what} did not answer within {timeout} s")


class Server:
    """A server process for the run, its log in the work directory; ready once `bytes` answers."""

    def start(self, name, work, command):
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        wait_for(name, lambda: self.bytes() is not None)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Etcd(Server):
    def __init__(self, work):
        self.port, peer = free_port(), free_port()
        self.start("etcd", work, [
            "etcd", "--data-dir", os.path.join(work, "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{self.port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}",
             "--heartbeat-interval", "50", "--election-timeout", "500"])

    def spec(self, prefix):
        return f"etcd://127.0.0.1:{self.port}/{prefix}"

    def bytes(self):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1).read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith(("etcd_network_client_grpc_received_bytes_total",
                                "etcd_network_client_grpc_sent_bytes_total")):
                total += float(line.split()[-1])
        return total


class ZooKeeper(Server):
    def __init__(self, work):
        self.port = free_port()
        config = os.path.join(work, "zoo.cfg")
        with open(config, "w") as f:
            f.write(f"tickTime=200\ndataDir={os.path.join(work, 'zk')}\nclientPort={self.port}\n"
                    "clientPortAddress=127.0.0.1\nmaxSessionTimeout=20000\nadmin.enableServer=false\n"
                    "4lw.commands.whitelist=srvr,mntr\n")
        self.start("zookeeper", work, [
            "java", "-cp", "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar", "-Xmx256m",
            "org.apache.zookeeper.server.ZooKeeperServerMain", config])

    def spec(self, prefix):
        return f"zk://127.0.0.1:{self.port}/{prefix}"

    def bytes(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"mntr")
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
        except OSError:
            return None
        fields = dict(line.split("\t", 1) for line in reply.decode().splitlines() if "\t" in line)
        if "zk_bytes_received_count" not in fields:
            return None
        return float(fields["zk_bytes_received_count"]) + float(fields.get("zk_response_bytes", 0))


def run(spec, kill, out):
    args = [PHALANX, "local", "--nodes", "3", "--out", out] + JOB
    if spec:
        args += ["--coordination", spec]
    if kill:
        args += ["--kill", "0@300"]
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"coordination bench: {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    events = [json.loads(line) for line in open(os.path.join(out, "events.jsonl")) if line.strip()]
    return summary, events, seconds


def fault_figures(summary, events):
    fault = summary["node_faults"][0]
    down = min((e["t_ms"] for e in events if e.get("event") == "down" and e.get("peer") == 0), default=None)
    # The survivor that takes over (node 0 may have issued later views itself before the kill).
    took = [e["t_ms"] for e in events if e.get("event") == "coordinating" and e.get("node") != 0]
    election = min(took) - down if down is not None and took else None
    return fault.get("detection_ms"), fault.get("recovery_ms"), election


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "coordination.json"))
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-p", "phalanx"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="phalanx-coordination-bench-")
    # `phalanx local` installs the servers' packages when they are missing.
    if not shutil.which("etcd") or not os.path.exists("/usr/share/java/zookeeper.jar"):
        for backend in ("etcd", "zookeeper"):
            run(backend, False, os.path.join(work, f"install-{backend}"))
    etcd, zookeeper = Etcd(work), ZooKeeper(work)
    results = {}
    try:
        for name, service in (("embedded", None), ("etcd", etcd), ("zookeeper", zookeeper)):
            rows = []
            for r in range(args.repeats):
                spec = service.spec(f"bench-{r}") if service else None
                before = service.bytes() if service else None
                _, _, quiet_s = run(spec, False, os.path.join(work, f"{name}-quiet-{r}"))
                middle = service.bytes() if service else None
                summary, events, kill_s = run(spec and service.spec(f"bench-kill-{r}"), True,
                                              os.path.join(work, f"{name}-kill-{r}"))
                after = service.bytes() if service else None
                detection, recovery, election = fault_figures(summary, events)
                quiet = (middle - before) if service else None
                extra = ((after - middle) - quiet) if service else None
                rows.append({"detection_ms": detection, "recovery_ms": recovery, "election_ms": election,
                             "service_bytes_fault_free_run": quiet,
                             "extra_service_bytes_with_the_change": extra,
                             "seconds_fault_free": quiet_s, "seconds_with_kill": kill_s})
                print(f"{name} #{r}: {rows[-1]}", file=sys.stderr)
            results[name] = {
                "runs": rows,
                **{k: median([row[k] for row in rows]) for k in rows[0]},
            }
    finally:
        etcd.stop()
        zookeeper.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "ttl_ms": TTL_MS,
        "job": " ".join(JOB),
        "fault": "--kill 0@300 (the coordinator's node) on 3 nodes",
        "repeats": args.repeats,
        "backends": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    cell = lambda v: "-" if v is None else f"{v:.0f}"
    lines = [
        f"Coordination backends, {report['date']}: `python3 bench/coordination.py --repeats {args.repeats}`; "
        f"3 nodes, `{report['job']}`, {report['fault']}; medians of {args.repeats}; lease TTL and session "
        f"timeout {TTL_MS} ms (embedded: heartbeat 100 ms, failure timeout 450 ms).",
        "",
        "| backend | detection ms | recovery ms | election ms | service bytes, fault-free run | more with one membership change |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {cell(r['detection_ms'])} | {cell(r['recovery_ms'])} | {cell(r['election_ms'])} | "
                     f"{cell(r['service_bytes_fault_free_run'])} | {cell(r['extra_service_bytes_with_the_change'])} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")


if __name__ == "__main__":
    main()
