"""Phalanx against PyTorch DDP on the same workload: the driver (run it through bench/run.sh).

What it does, in order:

1. Checks torch's BLAS (OpenBLAS expected; it says which library it found) and the Python port
   of Phalanx's seeded shuffles (`workload.self_check`).
2. Writes the workload both sides read: the winequality CSV (from the linfa-datasets crate
   Phalanx ships, `quality` as the target), seeded initial weights per model size
   (safetensors), the batch plan (every step's rows, as Phalanx derives them) and the Phalanx
   job files (MLP, SGD lr 0.05, global batch 64, seed 42, no checkpoints; 8 partitions for 1 and 2
   workers, 12 for 3: `partitions_for`).
3. Step time: for every size, worker count and repeat (interleaved: each repeat runs every
   configuration once), a short and a long run of each system; ms/step = (wall_long −
   wall_short) / (steps_long − steps_short), which cancels start-up. CPU time of the whole
   process tree (wait4) the same way. Every run sits in its own network namespace, so the
   namespace's loopback counters (/proc/net/dev, `lo` tx bytes) count only that run's traffic.
4. Fairness: every Phalanx run's loss curve (`history.csv`) must match the DDP run's (the
   ranks' loss sums over the step's rows) within the tolerance, step by step; otherwise the
   harness stops with an error naming the run and the step.
5. Cost of fault tolerance without faults: Phalanx with its default checkpoint cadence against
   none (the exactly-once ledger cannot be switched off and is on in both), in pairs of runs
   of about 4 s side by side (which one goes first alternates), many pairs interleaved over the
   configurations; a pair's figure is its in-run ms/step with checkpoints over its in-run
   ms/step without, minus one, and the overhead is the median over the pairs. (A pair of runs
   on this kind of shared machine differs by several per cent with nothing changed, so a
   handful of pairs cannot tell a 2 % cost from a 10 % one.)
6. Recovery: SIGKILL of worker node 1 in `phalanx local --nodes 3` against SIGKILL of rank 1
   under `torchrun --max_restarts=1` resuming from its checkpoint: time from the kill to the
   next completed step, and steps redone.
7. Writes OUT/latest.json and the Markdown report.
"""

import argparse
import csv
import glob
import gzip
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import workload  # noqa: E402

SEED = 42
LR = 0.05
# The learning rate scales as 1 / width above LR_WIDTH units: in this (standard) parameterisation
# a step moves the outputs by about lr × hidden, and with 0.05 the wide models diverge into chaos,
# where rounding differences between any two implementations grow until the loss curves share
# nothing and the fairness check could not tell a fair race from an unfair one. The step time
# does not depend on the value.
LR_WIDTH = 64


def lr_for(hidden):
    return LR * min(1.0, LR_WIDTH / hidden)

BATCH = 64
# Partitions: at least MIN_PARTITIONS, and T × 2^k for T workers, so that each trainer's
# contiguous share is one whole subtree of Phalanx's reduction tree and it sends one partial sum a
# step (8 for 1 and 2 workers, 12 for 3; with 8 partitions on 3 trainers the shares 3, 3, 2 send 5
# sums, 1.84 × the model per node instead of 1.38: docs/ARCHITECTURE.md, "Bytes per node"). The
# DDP ranks own the same partitions; the global batch stays 64 rows whatever P is.
MIN_PARTITIONS = 8


def partitions_for(workers):
    p = max(1, workers)
    while p < MIN_PARTITIONS:
        p *= 2
    return p

TEST_FRACTION = 0.2
CHECKPOINT_EVERY = 20  # Phalanx's default cadence; the torchrun side uses the same
INPUTS, CLASSES = 11, 6  # winequality-red: 11 features, quality 3..8
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Loss curves: the same θ_0 and rows give the same first loss up to f32 rounding in the two
# BLAS kernels; later steps drift apart by rounding only.
FIRST_STEP_TOLERANCE = 1e-5
EPOCH1_TOLERANCE_REL = 1e-4
CURVE_TOLERANCE_REL = 1e-2

PROFILES = {
    "full": {
        "sizes": [64, 4096, 65536],
        "workers": [1, 2, 3],
        "repeats": 5,
        # (short, long) epochs of 20 steps: the long run adds several seconds of steps for the
        # slower system at every size, well above the start-up noise of a loaded 2-core machine.
        # At hidden 65536 DDP's start-up (torch import, gloo rendezvous) swings by a second or
        # more between runs: with 100 extra steps (1, 6) its two-length figure ranged 14–35 ms
        # over the repeats of one run, and its median fell below its CPU time / 2 cores, which
        # no run can do; 300 extra steps put 7–10 s of DDP's steps against that swing. With 3
        # workers they still did not always (2026-12-05 at df44dc2: DDP's two-length figure
        # 15.6–23.0 ms over 5 repeats, its minimum again below its CPU time / 2 cores, while its
        # in-run clock said 19.0–20.1), so 600 extra steps: 10–12 s of DDP's steps.
        "epochs": {64: (5, 205), 4096: (2, 52), 65536: (1, 31)},
        "ft_workers": [1, 3],
        # Pairs of runs (checkpoints on, off) per configuration: the median of 10 pair figures
        # moves by about a per cent where one pair moves by five.
        "ft_pairs": 10,
        # Seconds of steps in each run of a pair: 4 s, so that a burst of the shared machine's
        # other load (pairs of 0.2 s runs at hidden 64 on one worker differed by ±25 %) is a
        # small part of a run, and the cadence's 500 ms floor still lets every run take several
        # checkpoints. The epochs follow from the step time this run's speed runs measured
        # (`Bench.ft_epochs`): a fixed table of epochs had shrunk to 1.1–1.5 s runs as the steps
        # got faster, and at hidden 64 on one worker the pair figures spread from -3 to +17 %.
        "ft_run_s": 4.0,
        "recovery_hidden": 64,
        "recovery_epochs": 100,
        "kill_step": 250,
        "phalanx_kills": 20,
        "torchrun_kills": 3,
    },
    "smoke": {
        "sizes": [8],
        # 3 workers: 12 partitions, the other batch plan.
        "workers": [1, 2, 3],
        "repeats": 1,
        "epochs": {8: (1, 3)},
        "ft_workers": [1],
        "ft_pairs": 1,
        "recovery_hidden": 8,
        "recovery_epochs": 20,
        "kill_step": 30,
        "phalanx_kills": 1,
        "torchrun_kills": 1,
    },
}


class BenchError(Exception):
    """A failure the harness reports and stops on."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def params_of(hidden):
    return INPUTS * hidden + hidden + hidden * CLASSES + CLASSES


# ---------------------------------------------------------------------------------------------
# Running one measured command


def netns_works():
    try:
        r = subprocess.run(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && cat /proc/net/dev"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "lo:" in r.stdout


def lo_tx_bytes(text):
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    raise BenchError("no `lo` line in /proc/net/dev")


class Runner:
    def __init__(self, work, use_netns):
        self.work = work
        self.use_netns = use_netns
        self.seq = 0

    def run(self, cmd, log_path, env=None, stdout_pipe=False, on_line=None, timeout_s=1800):
        """Runs `cmd` (in a fresh network namespace when possible); returns wall s, CPU s of the
        whole process tree, loopback bytes sent and the exit code."""
        self.seq += 1
        netdev = os.path.join(self.work, f"netdev-{self.seq}.txt")
        full_env = dict(os.environ, **THREAD_ENV, **(env or {}), NETDEV_OUT=netdev)
        if self.use_netns:
            inner = 'ip link set lo up || exit 97; "$@"; rc=$?; cat /proc/net/dev > "$NETDEV_OUT"; exit $rc'
            full = ["unshare", "--net", "--", "sh", "-c", inner, "sh"] + cmd
            before = 0
        else:
            full = cmd
            with open("/proc/net/dev") as f:
                before = lo_tx_bytes(f.read())
        with open(log_path, "ab") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, stdout=subprocess.PIPE if stdout_pipe else logf,
                                    stderr=logf, env=full_env, start_new_session=True)
            if stdout_pipe:
                for raw in proc.stdout:
                    logf.write(raw)
                    if on_line:
                        on_line(raw.decode(errors="replace").strip(), proc)
            deadline = t0 + timeout_s
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    os.wait4(proc.pid, 0)
                    raise BenchError(f"{' '.join(cmd)}: no end after {timeout_s} s (log {log_path})")
                time.sleep(0.005)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        if self.use_netns:
            try:
                with open(netdev) as f:
                    tx = lo_tx_bytes(f.read())
                os.remove(netdev)
            except FileNotFoundError:
                tx = None
        else:
            with open("/proc/net/dev") as f:
                tx = lo_tx_bytes(f.read()) - before
        return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "lo_tx_bytes": tx, "rc": proc.returncode}


# ---------------------------------------------------------------------------------------------
# The workload files


def find_winequality():
    """winequality-red.csv.gz of the linfa-datasets crate the workspace locks."""
    try:
        r = subprocess.run([os.environ.get("CARGO", "cargo"), "metadata", "--format-version", "1", "--locked"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            for pkg in json.loads(r.stdout)["packages"]:
                if pkg["name"] == "linfa-datasets":
                    path = os.path.join(os.path.dirname(pkg["manifest_path"]), "data", "winequality-red.csv.gz")
                    if os.path.exists(path):
                        return path
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError):
        pass
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = sorted(glob.glob(os.path.join(home, "registry/src/*/linfa-datasets-*/data/winequality-red.csv.gz")))
    if not found:
        raise BenchError("winequality-red.csv.gz not found: build Phalanx first (cargo fetches linfa-datasets)")
    return found[-1]


class Workload:
    def __init__(self, work, max_epochs, worker_counts):
        self.work = work
        src = find_winequality()
        self.csv = os.path.join(work, "winequality-red.csv")
        with gzip.open(src, "rt", newline="") as f, open(self.csv, "w", newline="") as out:
            out.write(f.read())
        self.source = src
        feats, labels, classes, _ = workload.read_csv(self.csv, "quality")
        if len(feats[0]) != INPUTS or len(classes) != CLASSES:
            raise BenchError(f"{self.csv}: {len(feats[0])} features and {len(classes)} classes, expected 11 and 6")
        x, _ = workload.prepare(feats, labels, SEED, TEST_FRACTION)
        self.n_train = len(x)
        # One batch plan per partition count (every step's rows as Phalanx derives them for it).
        self.plans, self.rows = {}, {}
        steps_per_epoch = set()
        for P in sorted({partitions_for(w) for w in worker_counts}):
            parts = workload.Partitions(self.n_train, P, BATCH, SEED)
            S = parts.steps_per_epoch
            steps_per_epoch.add(S)
            self.plans[P] = os.path.join(work, f"plan-p{P}.bin")
            t = time.time()
            workload.write_plan(self.plans[P], parts, max_epochs)
            # Rows per step over all partitions (the DDP side divides its loss sums by them): chunk k
            # of a partition of m rows has (k+1)·m/S − k·m/S rows, whatever the epoch's shuffle.
            sizes = [len(rows) for rows in parts.indices]
            epoch_rows = [sum((k + 1) * m // S - k * m // S for m in sizes) for k in range(S)]
            self.rows[P] = epoch_rows * max_epochs
            log(f"workload: {self.n_train} training rows, {P} partitions, {S} steps/epoch, "
                f"plan of {max_epochs} epochs in {time.time() - t:.1f} s")
        if len(steps_per_epoch) != 1:
            raise BenchError(f"the partition counts give different epochs: {sorted(steps_per_epoch)} steps")
        self.steps_per_epoch = steps_per_epoch.pop()
        self.inits = {}
        self.jobs = {}

    def plan(self, workers):
        return self.plans[partitions_for(workers)]

    def rows_per_step(self, workers):
        return self.rows[partitions_for(workers)]

    def init(self, hidden):
        if hidden not in self.inits:
            path = os.path.join(self.work, f"init-h{hidden}.safetensors")
            workload.write_init(path, INPUTS, hidden, CLASSES, SEED + hidden)
            self.inits[hidden] = path
        return self.inits[hidden]

    def job(self, hidden, workers, checkpoint_every):
        P = partitions_for(workers)
        key = (hidden, P, checkpoint_every)
        if key not in self.jobs:
            path = os.path.join(self.work, f"job-h{hidden}-p{P}-ck{checkpoint_every}.toml")
            with open(path, "w") as f:
                f.write(
                    f'model = "mlp"\ndataset = "csv:{self.csv}:quality"\nhidden = {hidden}\n'
                    f'init_params = "{self.init(hidden)}"\noptimizer = "sgd"\nlearning_rate = {lr_for(hidden)!r}\n'
                    f"batch_size = {BATCH}\npartitions = {P}\nseed = {SEED}\n"
                    f"test_fraction = {TEST_FRACTION}\ncheckpoint_every = {checkpoint_every}\n")
            self.jobs[key] = path
        return self.jobs[key]


# ---------------------------------------------------------------------------------------------
# The two systems


class Bench:
    def __init__(self, args, profile):
        self.args = args
        self.p = profile
        self.work = os.path.abspath(args.work)
        os.makedirs(self.work, exist_ok=True)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.use_netns = netns_works()
        if not self.use_netns:
            log("no network namespace here (needs root and unshare/ip): loopback bytes are host-wide")
        self.runner = Runner(self.work, self.use_netns)
        max_epochs = max([e for pair in profile["epochs"].values() for e in pair] + [profile["recovery_epochs"]])
        # The recovery runs have 3 workers.
        self.w = Workload(self.work, max_epochs, list(profile["workers"]) + [3])
        self.phalanx = os.path.abspath(args.phalanx)
        self.fairness = {"checks": 0, "max_first_step_diff": 0.0}
        self.runs = []
        self.retried = []

    def run_dir(self, tag):
        d = os.path.join(self.work, "runs", tag)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def run_once_more_on_failure(self, cmd, tag, out):
        """Runs a measured command; a run that fails is run once more and the failure recorded
        (`retried_runs` in the results): on a shared machine another job's stray signal can end
        a run. A second failure stops the harness."""
        log_path = os.path.join(self.logs, tag + ".log")
        m = self.runner.run(cmd, log_path)
        if m["rc"] == 0:
            return m
        with open(log_path, errors="replace") as f:
            tail = f.read()[-600:].strip().replace("\n", " | ")
        log(f"{tag} failed (exit {m['rc']}), running it once more: {tail}")
        self.retried.append({"tag": tag, "exit": m["rc"], "log_tail": tail})
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        m = self.runner.run(cmd, log_path)
        if m["rc"] != 0:
            raise BenchError(f"{tag} failed twice (exit {m['rc']}); log {log_path}")
        return m

    def phalanx_run(self, hidden, workers, epochs, checkpoint_every, tag, kill=None):
        out = self.run_dir(tag)
        job = self.w.job(hidden, workers, checkpoint_every)
        if workers == 1 and kill is None:
            cmd = [self.phalanx, "train", "--config", job, "--trainers", "1", "--epochs", str(epochs), "--out", out]
        else:
            cmd = [self.phalanx, "local", "--nodes", str(workers), "--trainers", str(workers), "--config", job,
                   "--epochs", str(epochs), "--out", out]
            # The default: one range of θ per node, range r on node r (spread); `coordinator`
            # puts every range beside the job's supervisor.
            cmd += ["--aggregator-placement", self.args.aggregator_placement]
            if kill is not None:
                cmd += ["--kill", kill]
        m = self.run_once_more_on_failure(cmd, tag, out)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        steps = epochs * self.w.steps_per_epoch
        if summary["steps"] != steps or not summary["samples_applied"]["exactly_once"]:
            raise BenchError(f"phalanx run {tag}: {summary['steps']} steps (expected {steps}), "
                             f"exactly_once {summary['samples_applied']['exactly_once']}")
        rows = []
        with open(os.path.join(out, "history.csv")) as f:
            for r in csv.DictReader(f):
                rows.append((int(r["step"]), float(r["loss"]), int(r["t_ms"])))
        # Steady state inside the run (a cross-check of the two-length figure): from the first
        # step's completion to the last's, in the history's Unix ms.
        inrun = (rows[-1][2] - rows[0][2]) / (len(rows) - 1) if len(rows) > 1 else None
        m.update(system="phalanx", hidden=hidden, workers=workers, epochs=epochs, steps=steps,
                 checkpoint_every=checkpoint_every, tag=tag, inrun_ms_per_step=inrun)
        return m, summary, rows

    def ddp_cmd(self, mode, hidden, workers, steps, out, extra=()):
        return [sys.executable, os.path.join(HERE, "ddp.py"), mode, *extra, "--csv", self.w.csv, "--init",
                self.w.init(hidden), "--plan", self.w.plan(workers), "--hidden", str(hidden), "--steps", str(steps),
                "--lr", repr(lr_for(hidden)), "--seed", str(SEED), "--test-fraction", str(TEST_FRACTION), "--out", out]

    def ddp_run(self, hidden, workers, epochs, tag):
        out = self.run_dir(tag)
        steps = epochs * self.w.steps_per_epoch
        port = ["--port", "29500"] if self.use_netns else ["--port", str(free_port())]
        cmd = self.ddp_cmd("launch", hidden, workers, steps, out, ["--world", str(workers)] + port)
        m = self.run_once_more_on_failure(cmd, tag, out)
        sums = [0.0] * steps
        for r in range(workers):
            with open(os.path.join(out, f"losses-rank{r}.json")) as f:
                rank = json.load(f)
            for i, v in enumerate(rank["loss_sums"]):
                sums[i] += v
            if r == 0:
                # Steady state inside the run: rank 0's first step start to its last step's end.
                inrun = (rank["last_step_unix"] - rank["first_step_unix"]) * 1000 / steps
        losses = [s / n for s, n in zip(sums, self.w.rows_per_step(workers))]
        m.update(system="ddp", hidden=hidden, workers=workers, epochs=epochs, steps=steps, checkpoint_every=0, tag=tag,
                 inrun_ms_per_step=inrun)
        return m, losses

    def check_fair(self, tag, phalanx_rows, ddp_losses):
        """The two loss curves, three ways (Phalanx's history row `step` is the loss at θ_{step-1},
        DDP's list index is step − 1):

        - step 1: the same θ_0 on the same rows gives the same loss up to f32 rounding;
        - every step of the first epoch: the same batches in the same order, the same update
          (a different learning rate, scaling or batch shows from step 2 on, at 1e-3 or more);
        - the mean loss of every epoch: rounding differences grow slowly once ReLU units flip
          (about 1e-3 per step after 200 epochs at hidden 64), so the long curves are compared
          per epoch, with room for that drift.
        """
        S = self.w.steps_per_epoch
        if len(phalanx_rows) != len(ddp_losses) or [r[0] for r in phalanx_rows] != list(range(1, len(ddp_losses) + 1)):
            raise BenchError(f"fairness {tag}: Phalanx logged {len(phalanx_rows)} steps, DDP {len(ddp_losses)}")
        ph = [r[1] for r in phalanx_rows]
        first = abs(ph[0] - ddp_losses[0])
        if first > FIRST_STEP_TOLERANCE:
            raise BenchError(
                f"UNFAIR RACE {tag}: step 1 loss Phalanx {ph[0]!r} vs DDP {ddp_losses[0]!r} (the same θ_0 on the same "
                f"rows must agree within {FIRST_STEP_TOLERANCE}): the two sides do not train the same workload")
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ph, ddp_losses)]
        epoch1 = max(rel[:S])
        if epoch1 > EPOCH1_TOLERANCE_REL:
            step = rel.index(epoch1) + 1
            raise BenchError(f"UNFAIR RACE {tag}: loss at step {step} Phalanx {ph[step - 1]!r} vs DDP "
                             f"{ddp_losses[step - 1]!r} ({epoch1:.2e} relative, first-epoch tolerance "
                             f"{EPOCH1_TOLERANCE_REL}): different batches or updates")
        worst_epoch, worst = 0, 0.0
        for e in range(len(ph) // S):
            a, b = sum(ph[e * S:(e + 1) * S]), sum(ddp_losses[e * S:(e + 1) * S])
            d = abs(a - b) / max(abs(b), 1e-12)
            if d > worst:
                worst_epoch, worst = e, d
        if worst > CURVE_TOLERANCE_REL:
            raise BenchError(f"UNFAIR RACE {tag}: mean loss of epoch {worst_epoch} differs by {worst:.2e} relative "
                             f"(tolerance {CURVE_TOLERANCE_REL})")
        f = self.fairness
        f["checks"] += 1
        f["max_first_step_diff"] = max(f["max_first_step_diff"], first)
        f["max_first_epoch_rel_diff"] = max(f.get("max_first_epoch_rel_diff", 0.0), epoch1)
        f["max_epoch_mean_rel_diff"] = max(f.get("max_epoch_mean_rel_diff", 0.0), worst)
        f["max_step_rel_diff"] = max(f.get("max_step_rel_diff", 0.0), max(rel))
        f.setdefault("final_loss", {})[tag] = [ph[-1], ddp_losses[-1]]

    # -----------------------------------------------------------------------------------------

    def speed(self):
        """Step-time runs, interleaved: every repeat runs every configuration once."""
        p = self.p
        for rep in range(p["repeats"]):
            for hidden in p["sizes"]:
                short, long_ = p["epochs"][hidden]
                for workers in p["workers"]:
                    curves = {}
                    # Alternate which system goes first, so neither always runs on a warmer machine.
                    order = ["phalanx", "ddp"] if (rep + workers + hidden) % 2 == 0 else ["ddp", "phalanx"]
                    for system in order:
                        for epochs, length in ((short, "short"), (long_, "long")):
                            tag = f"{system}-h{hidden}-w{workers}-{length}-r{rep}"
                            if system == "phalanx":
                                m, _, rows = self.phalanx_run(hidden, workers, epochs, 0, tag)
                            else:
                                m, rows = self.ddp_run(hidden, workers, epochs, tag)
                            curves[(system, length)] = rows
                            m.update(phase="speed", repeat=rep, length=length, ft=False)
                            self.runs.append(m)
                            log(f"{tag}: {m['wall_s']:.2f} s wall, {m['cpu_s']:.2f} s CPU, lo {m['lo_tx_bytes']} B")
                    for length in ("short", "long"):
                        self.check_fair(f"h{hidden}-w{workers}-{length}-r{rep}", curves[("phalanx", length)],
                                        curves[("ddp", length)])

    def ft_epochs(self, hidden, workers):
        """Epochs of a checkpoint pair's runs: about the profile's `ft_run_s` seconds of steps at
        Phalanx's median in-run step time in this run's long speed runs of the configuration,
        else (no `ft_run_s`, or no such runs) the long length."""
        long_ = self.p["epochs"][hidden][1]
        seconds = self.p.get("ft_run_s")
        measured = inrun_long_runs(self.runs, "phalanx", hidden, workers)
        if not seconds or not measured:
            return long_
        epoch_s = statistics.median(measured) * self.w.steps_per_epoch / 1000
        return max(1, math.ceil(seconds / epoch_s))

    def ft(self):
        """The cost of checkpoints without faults: pairs of Phalanx runs (`ft_epochs`),
        checkpoints on and off, back to back, every configuration's pair i before any
        configuration's pair i + 1."""
        p = self.p
        for pair in range(p["ft_pairs"]):
            for hidden in p["sizes"]:
                for workers in p["ft_workers"]:
                    epochs = self.ft_epochs(hidden, workers)
                    # Which run goes first alternates, so neither always runs on a warmer machine.
                    modes = (True, False) if (pair + workers + hidden) % 2 == 0 else (False, True)
                    curves = {}
                    for on in modes:
                        tag = f"phalanx-{'ft' if on else 'noft'}-h{hidden}-w{workers}-p{pair}"
                        m, _, rows = self.phalanx_run(hidden, workers, epochs, CHECKPOINT_EVERY if on else 0, tag)
                        curves[on] = rows
                        m.update(phase="ft", pair=pair, length="long", ft=on)
                        self.runs.append(m)
                        log(f"{tag}: {m['inrun_ms_per_step']:.4g} ms/step in the run, {m['wall_s']:.2f} s wall")
                    if [r[:2] for r in curves[True]] != [r[:2] for r in curves[False]]:
                        raise BenchError(f"phalanx-ft-h{hidden}-w{workers}-p{pair}: checkpoints changed the loss curve")

    def recovery(self):
        p = self.p
        hidden, epochs, kill = p["recovery_hidden"], p["recovery_epochs"], p["kill_step"]
        out = {"phalanx": [], "torchrun": []}
        i = 0
        while len(out["phalanx"]) < p["phalanx_kills"] or len(out["torchrun"]) < p["torchrun_kills"]:
            if len(out["phalanx"]) < p["phalanx_kills"]:
                out["phalanx"].append(self.phalanx_recovery(hidden, epochs, kill, i))
            if len(out["torchrun"]) < p["torchrun_kills"]:
                out["torchrun"].append(self.torchrun_recovery(hidden, epochs, kill, i))
            i += 1
        return out

    def phalanx_recovery(self, hidden, epochs, kill, i):
        tag = f"recovery-phalanx-{i}"
        m, summary, rows = self.phalanx_run(hidden, 3, epochs, CHECKPOINT_EVERY, tag, kill=f"1@{kill}")
        faults = summary.get("node_faults", [])
        if len(faults) != 1 or faults[0].get("recovery_ms") is None:
            raise BenchError(f"{tag}: expected one recovered kill in summary.json, got {faults}")
        seen, redone = set(), 0
        for step, _, _ in rows:
            redone += step in seen
            seen.add(step)
        r = {"recovery_ms": faults[0]["recovery_ms"], "detection_ms": faults[0]["detection_ms"],
             "kill_step": faults[0]["step"], "steps_redone": redone, "wall_s": m["wall_s"]}
        log(f"{tag}: recovered in {r['recovery_ms']} ms (detected in {r['detection_ms']} ms), {redone} steps redone")
        return r

    def torchrun_recovery(self, hidden, epochs, kill, i):
        tag = f"recovery-torchrun-{i}"
        out = self.run_dir(tag)
        steps = epochs * self.w.steps_per_epoch
        port = 29400 if self.use_netns else free_port()
        torchrun = [sys.executable, os.path.join(HERE, "torchrun_compat.py"), "--nnodes=1", "--nproc_per_node=3",
                    "--max_restarts=1", f"--monitor_interval={self.args.torchrun_monitor_interval}",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
        cmd = torchrun + self.ddp_cmd("elastic", hidden, 3, steps, out, ["--checkpoint-every", str(CHECKPOINT_EVERY)])[1:]
        st = {"pids": {}, "killed_at": None, "last_step_before": 0, "resumed": None, "first_after": None}

        def on_line(line, proc):
            parts = line.split()
            if not parts:
                return
            if parts[0] == "pid" and len(parts) == 4:
                st["pids"][(int(parts[1]), int(parts[3]))] = int(parts[2])
            elif parts[0] == "resumed" and len(parts) == 5:
                st["resumed"] = int(parts[2])
            elif parts[0] == "step" and len(parts) == 4:
                step, t, restart = int(parts[1]), float(parts[2]), int(parts[3])
                if restart == 0:
                    st["last_step_before"] = max(st["last_step_before"], step)
                    if step >= kill and st["killed_at"] is None and (1, 0) in st["pids"]:
                        os.kill(st["pids"][(1, 0)], signal.SIGKILL)
                        st["killed_at"] = time.time()
                elif st["first_after"] is None:
                    st["first_after"] = t

        m = self.runner.run(cmd, os.path.join(self.logs, tag + ".log"), stdout_pipe=True, on_line=on_line)
        if m["rc"] != 0:
            raise BenchError(f"{tag}: torchrun failed (exit {m['rc']}); log {os.path.join(self.logs, tag + '.log')}")
        if st["killed_at"] is None or st["first_after"] is None or st["resumed"] is None:
            raise BenchError(f"{tag}: no kill and resumed step seen ({st}); log {os.path.join(self.logs, tag + '.log')}")
        r = {"recovery_ms": round((st["first_after"] - st["killed_at"]) * 1000),
             "steps_redone": st["last_step_before"] - st["resumed"], "kill_step": kill,
             "resumed_from": st["resumed"], "wall_s": m["wall_s"]}
        log(f"{tag}: recovered in {r['recovery_ms']} ms, {r['steps_redone']} steps redone")
        return r


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Figures


def sig(x, digits=4):
    """`x` to `digits` significant digits (JSON figures, not false precision)."""
    return None if x is None else float(f"{x:.{digits}g}")


def pct(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def per_step(runs, key):
    """{(system, hidden, workers): [per-step figure of each repeat]} from the step-time phase's
    short/long pairs (without checkpoints)."""
    pairs = {}
    for r in runs:
        if r.get("ft", False) or r.get("phase", "speed") != "speed":
            continue
        pairs.setdefault((r["system"], r["hidden"], r["workers"], r["repeat"]), {})[r["length"]] = r
    out = {}
    for (system, hidden, workers, _rep), pair in sorted(pairs.items()):
        s, l_ = pair["short"], pair["long"]
        if s[key] is None or l_[key] is None:
            continue
        out.setdefault((system, hidden, workers), []).append((l_[key] - s[key]) / (l_["steps"] - s["steps"]))
    return out


def inrun_long_runs(runs, system, hidden, workers):
    """The in-run ms/step of `system`'s long speed runs (no checkpoints) of a configuration."""
    return [r["inrun_ms_per_step"] for r in runs if r.get("phase", "speed") == "speed" and not r.get("ft")
            and r["system"] == system and r["hidden"] == hidden and r["workers"] == workers
            and r["length"] == "long" and r.get("inrun_ms_per_step") is not None]


def ft_pairs(runs):
    """{(hidden, workers): (steps per run, [(on, off) in-run ms/step of each pair])} from the
    fault-tolerance phase's runs, pair by pair."""
    by = {}
    for r in runs:
        if r.get("phase") == "ft" and r.get("inrun_ms_per_step") is not None:
            by.setdefault((r["hidden"], r["workers"], r["pair"]), {})[r["ft"]] = r
    out = {}
    for (hidden, workers, _pair), pair in sorted(by.items()):
        if True in pair and False in pair:
            steps, pairs = out.setdefault((hidden, workers), (pair[True]["steps"], []))
            pairs.append((pair[True]["inrun_ms_per_step"], pair[False]["inrun_ms_per_step"]))
    return out


def summarise(bench, recovery):
    p = bench.p
    wall = per_step(bench.runs, "wall_s")
    cpu = per_step(bench.runs, "cpu_s")
    wire = per_step(bench.runs, "lo_tx_bytes")
    table = []
    by_size, worst = {}, None
    for hidden in p["sizes"]:
        entry = {"params": params_of(hidden), "worst": None, "workers": {}}
        for workers in p["workers"]:
            ph, dd = wall[("phalanx", hidden, workers)], wall[("ddp", hidden, workers)]
            ratio = statistics.median(ph) / statistics.median(dd)
            entry["workers"][str(workers)] = sig(ratio)
            entry["worst"] = sig(ratio if entry["worst"] is None else max(entry["worst"], ratio))
            worst = ratio if worst is None else max(worst, ratio)
            model_bytes = 4 * params_of(hidden)
            row = {"hidden": hidden, "params": params_of(hidden), "workers": workers, "phalanx_over_ddp": ratio}
            for system in ("phalanx", "ddp"):
                row[system] = {
                    "wall_ms_per_step": {k: v * 1000 for k, v in stats(wall[(system, hidden, workers)]).items() if k != "n"},
                    "cpu_ms_per_step": {k: v * 1000 for k, v in stats(cpu[(system, hidden, workers)]).items() if k != "n"},
                    "wire_bytes_per_node_step_over_model_bytes":
                        statistics.median(wire[(system, hidden, workers)]) / workers / model_bytes
                        if (system, hidden, workers) in wire else None,
                }
                inrun = inrun_long_runs(bench.runs, system, hidden, workers)
                row[system]["inrun_ms_per_step_long_runs"] = stats(inrun) if inrun else None
            row["repeats"] = len(ph)
            table.append(row)
        by_size[str(hidden)] = entry
    biggest = max(p["sizes"])
    multi = [w for w in p["workers"] if w > 1]

    def wire_at(system, hidden, w):
        v = wire.get((system, hidden, w))
        return None if v is None else sig(statistics.median(v) / w / (4 * params_of(hidden)))

    wire_json = {
        "hidden": biggest,
        "params": params_of(biggest),
        "phalanx": {str(w): wire_at("phalanx", biggest, w) for w in multi},
        "ddp": {str(w): wire_at("ddp", biggest, w) for w in multi},
        "ring_allreduce": {str(w): round(2 * (w - 1) / w, 4) for w in multi},
        "by_size": {str(h): {s: {str(w): wire_at(s, h, w) for w in multi} for s in ("phalanx", "ddp")}
                    for h in p["sizes"]},
        "source": "loopback tx bytes of the run's own network namespace (/proc/net/dev), per node = / workers"
        if bench.use_netns else "host-wide loopback tx bytes (/proc/net/dev; other traffic included)",
    }
    ft_by_size, ft_worst = {}, None
    for (hidden, workers), (steps, pairs) in sorted(ft_pairs(bench.runs).items()):
        ratios = [on / off - 1 for on, off in pairs]
        overhead = statistics.median(ratios)
        ft_by_size.setdefault(str(hidden), {})[str(workers)] = {
            "overhead": sig(overhead),
            "on_ms_per_step": sig(statistics.median(on for on, _ in pairs)),
            "off_ms_per_step": sig(statistics.median(off for _, off in pairs)),
            "pairs": len(pairs),
            "steps_per_run": steps,
            "pairs_slower_with_checkpoints": sum(1 for x in ratios if x > 0),
            "overhead_min": sig(min(ratios)), "overhead_max": sig(max(ratios)),
            "overhead_by_pair": [sig(x) for x in ratios],
            "method": "median over pairs of back-to-back runs of in-run ms/step on / off - 1"}
        ft_worst = overhead if ft_worst is None else max(ft_worst, overhead)
    ph_ms = [r["recovery_ms"] for r in recovery["phalanx"]]
    tr_ms = [r["recovery_ms"] for r in recovery["torchrun"]]

    def side(runs, ms, detector):
        if not runs:
            return {"runs": [], "recovery_ms_p50": None, "recovery_ms_p99": None, "steps_redone_median": None,
                    "detector": detector}
        return {"runs": runs, "recovery_ms_p50": pct(ms, 50), "recovery_ms_p99": pct(ms, 99),
                "steps_redone_median": statistics.median(r["steps_redone"] for r in runs), "detector": detector}

    rec = {
        "hidden": p["recovery_hidden"], "workers": 3, "kill_step": p["kill_step"],
        "checkpoint_every": CHECKPOINT_EVERY,
        "phalanx": side(recovery["phalanx"], ph_ms,
                        "phalanx defaults: heartbeat every 100 ms, a node is down after 450 ms of silence, or "
                        "after 200 ms if its host refuses a probe of its address (a dead process on a live host)"),
        "torchrun": side(recovery["torchrun"], tr_ms,
                         f"torchrun --monitor_interval={bench.args.torchrun_monitor_interval:g} s (its default: 5 s), "
                         "--max_restarts=1, c10d rendezvous"),
    }
    speedup = sig(statistics.median(tr_ms) / max(statistics.median(ph_ms), 1)) if ph_ms and tr_ms else None
    return {
        "phalanx_over_ddp": sig(worst),
        "phalanx_over_ddp_by_size": by_size,
        "recovery_speedup_vs_torchrun": speedup,
        "wire_bytes_per_node_step_over_model_bytes": wire_json,
        "ft_overhead_no_faults": sig(ft_worst),
        "ft_overhead_no_faults_by_size": ft_by_size,
        "recovery_ms_p99": pct(ph_ms, 99) if ph_ms else None,
        "recovery": rec,
        "fairness": dict(bench.fairness, passed=True, first_step_tolerance=FIRST_STEP_TOLERANCE,
                         first_epoch_tolerance_rel=EPOCH1_TOLERANCE_REL, epoch_mean_tolerance_rel=CURVE_TOLERANCE_REL),
        "step_time": table,
        "retried_runs": bench.retried,
    }


# ---------------------------------------------------------------------------------------------
# Environment


def sh(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
    debian = open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(), "debian": debian,
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def versions(phalanx, blas):
    pkgs = sh(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "python3-torch", "libopenblas0-pthread"])
    return {"phalanx": sh([phalanx, "--version"]), "rustc": sh(["rustc", "--version"]),
            "python": platform.python_version(), "torch": blas["torch"], "blas": blas["blas"],
            "blas_libraries": blas["blas_libraries"], "debian_packages": pkgs.splitlines() if pkgs else None,
            "git_commit": sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])}


def check_blas(allow_other):
    r = subprocess.run([sys.executable, os.path.join(HERE, "ddp.py"), "blas"], capture_output=True, text=True,
                       env=dict(os.environ, **THREAD_ENV))
    if r.returncode != 0:
        raise BenchError(f"torch does not run under {sys.executable}: {r.stderr.strip()[-800:]}")
    blas = json.loads(r.stdout)
    log(f"torch {blas['torch']} runs on {blas['blas']}: {', '.join(blas['blas_libraries']) or 'no BLAS library mapped'}")
    if blas["blas"] != "openblas" and not allow_other:
        raise BenchError(f"torch runs on {blas['blas']} ({blas['blas_libraries']}), not OpenBLAS: install "
                         "libopenblas0-pthread (the reference BLAS is 2-5x slower and would flatter Phalanx)")
    return blas


# ---------------------------------------------------------------------------------------------
# Report


def fmt_stat(s):
    if s["max"] - s["min"] < 0.005 * max(abs(s["median"]), 1e-9):
        return f"{s['median']:.3g}"
    return f"{s['median']:.3g} ({s['min']:.3g}–{s['max']:.3g})"


def summary_lines(result):
    """What the tables say, in a few sentences computed from them."""
    rows = result["step_time"]
    faster = [r for r in rows if r["phalanx_over_ddp"] < 1]
    worst = max(rows, key=lambda r: r["phalanx_over_ddp"])
    best = min(rows, key=lambda r: r["phalanx_over_ddp"])
    out = [
        f"- **Step time:** Phalanx is faster than DDP in {len(faster)} of {len(rows)} configurations"
        + (f" (all at {', '.join(sorted({format(r['params'], ',') for r in faster}))} parameters)" if faster else "")
        + f"; best ratio {best['phalanx_over_ddp']:.2f} ({best['params']:,} parameters, {best['workers']} workers), "
        f"worst {worst['phalanx_over_ddp']:.2f} ({worst['params']:,} parameters, {worst['workers']} workers).",
    ]
    w = result["wire_bytes_per_node_step_over_model_bytes"]
    parts = [f"{w['phalanx'][k]:.2f} × the model per node and step on {k} workers (DDP {_num(w['ddp'][k])}, "
             f"a ring all-reduce {w['ring_allreduce'][k]:.2f})" for k in w["phalanx"] if w["phalanx"][k] is not None]
    if parts:
        out.append(f"- **Wire:** at {w['params']:,} parameters Phalanx sends " + "; ".join(parts) + ".")
    cells = [(h, wk, e) for h, by in result["ft_overhead_no_faults_by_size"].items() for wk, e in by.items()]
    if cells:
        h, wk, e = max(cells, key=lambda c: c[2]["overhead"])
        spread = (f"; {e['pairs_slower_with_checkpoints']} of {e['pairs']} pairs slower with checkpoints, "
                  f"pair figures {e['overhead_min'] * 100:+.1f} to {e['overhead_max'] * 100:+.1f} %") if "pairs" in e else ""
        out.append(f"- **Checkpoints without faults:** worst median cost {e['overhead'] * 100:+.1f} % "
                   f"({params_of(int(h)):,} parameters, {wk} worker(s){spread}).")
    rec = result["recovery"]
    if rec["phalanx"]["runs"] and rec["torchrun"]["runs"]:
        out.append(f"- **Recovery:** Phalanx {rec['phalanx']['recovery_ms_p50']} ms p50 / "
                   f"{rec['phalanx']['recovery_ms_p99']} ms p99 over {len(rec['phalanx']['runs'])} kills, "
                   f"{rec['phalanx']['steps_redone_median']:g} steps redone; torchrun {rec['torchrun']['recovery_ms_p50']} ms "
                   f"p50 over {len(rec['torchrun']['runs'])} kills, {rec['torchrun']['steps_redone_median']:g} steps redone "
                   f"({result['recovery_speedup_vs_torchrun']:.1f} × faster).")
    return out


def markdown(result):
    m, v, p = result["meta"], result["meta"]["versions"], result["meta"]["profile"]
    fair = result["fairness"]
    lines = [
        "# Benchmarks: Phalanx against PyTorch DDP",
        "",
        f"Measured {m['date']} by `{m['command']}` ({m['profile_name']} profile, {m['duration_s'] / 60:.1f} min).",
        "",
    ]
    if m["profile_name"] == "smoke":
        lines += ["**A smoke run:** tiny model, few steps, one repeat. It proves the harness works end to end; "
                  "its timings are start-up noise, not measurements.", ""]
    lines += [
        f"- **Machine:** {m['machine']['cpu']}, {m['machine']['cores']} cores, {m['machine']['memory']}, "
        f"Linux {m['machine']['kernel']}, Debian {m['machine']['debian']}; load average at start "
        f"{' '.join(m['machine']['loadavg_start'])}, at end {' '.join(m['machine']['loadavg_end'])} "
        "(the machine is shared: other jobs ran at the same time, which the interleaved repeats spread over both systems).",
        f"- **Versions:** {v['phalanx']} (commit {v['git_commit']}), {v['rustc']}; PyTorch {v['torch']} on "
        f"{v['blas']} ({', '.join(v['blas_libraries'])}), Python {v['python']}; packages: "
        f"{', '.join(v['debian_packages'] or [])}.",
        f"- **Workload (both sides):** winequality-red CSV (1,599 rows, 11 features, 6 classes; the file of the "
        f"linfa-datasets crate), 20 % held out, features standardised on the training rows; MLP 11 → hidden → 6 "
        f"(ReLU, softmax cross-entropy); initial weights from one safetensors file per size that both read; "
        f"partitions: " + ", ".join(f"{partitions_for(w)} for {w} worker{'s' if w > 1 else ''}" for w in p["workers"])
        + " (T × 2^k for T workers, at least 8: each trainer's share is one whole subtree of Phalanx's reduction "
        "tree, one partial sum a step; the DDP ranks own the same partitions), "
        f"global batch {BATCH}, the same rows in the same order at every step "
        f"(Phalanx's seeded shuffles, ported to `bench/workload.py` and pinned against its tests); plain SGD, "
        f"lr {LR} up to hidden {LR_WIDTH}, {LR} × {LR_WIDTH} / hidden above (with 0.05 the wide models "
        "diverge into chaos, where rounding differences grow until no two implementations' loss curves can be "
        f"compared; the step time does not depend on it), f32; seed {SEED}.",
        "- **Processes:** Phalanx: `phalanx train --trainers 1` for 1 worker, `phalanx local --nodes N --trainers N` "
        f"for N (aggregator placement `{m.get('aggregator_placement', 'coordinator')}`: "
        + ("one range of θ per node, range r on node r" if m.get("aggregator_placement") == "spread"
           else "node 0 hosts every aggregator")
        + "); DDP: N processes, `torch.distributed` gloo, "
        "`DistributedDataParallel`, rank r owning the partitions ⌊rP/N⌋ .. ⌊(r+1)P/N⌋ as Phalanx's trainers do. "
        "One compute thread per process (`torch.set_num_threads(1)`, `OMP/OPENBLAS_NUM_THREADS=1`; Phalanx's "
        "maths is single-threaded (its own fixed-order kernels, AVX-512 or AVX2 where the CPU has them), its tokio runtime has "
        "one worker thread per core for messages, and each node process of `phalanx local` cores / N of them, "
        "at least 1).",
        f"- **Method:** ms/step = (wall of the long run − wall of the short run) / (extra steps), which cancels "
        f"start-up; CPU ms/step the same from the whole process tree's user+system time (wait4). "
        f"{p['repeats']} interleaved repeats (each repeat runs every configuration once, alternating which "
        f"system goes first); median (min–max). Epochs (short, long) of {result['steps_per_epoch']} steps: "
        + ", ".join(f"hidden {h}: {e[0]}/{e[1]}" for h, e in p["epochs"].items()) + ". No checkpoints in the "
        "step-time runs. CPU ms/step sums every process of the run (so it can exceed wall time). The last "
        "column is a cross-check from inside the long runs (Phalanx: the history's timestamps from the first "
        "step's end to the last's; DDP: rank 0's clock around its loop), which leaves start-up out by "
        "construction but also the end of the run.",
        f"- **Fairness check:** passed — {fair['checks']} pairs of loss curves (every run of both systems) compared: "
        f"step-1 losses differ by at most {fair['max_first_step_diff']:.1e} (tolerance {FIRST_STEP_TOLERANCE}: the "
        f"same θ₀ on the same rows), first-epoch steps by at most {fair['max_first_epoch_rel_diff']:.1e} relative "
        f"(tolerance {EPOCH1_TOLERANCE_REL}: the same batches and updates), epoch means by at most "
        f"{fair['max_epoch_mean_rel_diff']:.1e} (tolerance {CURVE_TOLERANCE_REL}: f32 rounding differences grow "
        f"slowly once ReLU units flip; the largest single-step difference was {fair['max_step_rel_diff']:.1e}).",
        "- **Failed runs:** " + ("none." if not result["retried_runs"] else
                                 f"{len(result['retried_runs'])} run(s) failed and were run once more (the failures "
                                 "are in `retried_runs` of the JSON): "
                                 + "; ".join(f"`{r['tag']}` (exit {r['exit']})" for r in result["retried_runs"]) + "."),
        "",
        "## In short",
        "",
        *summary_lines(result),
        "",
        "## Step time",
        "",
        "| parameters | workers | Phalanx ms/step | DDP ms/step | Phalanx / DDP | Phalanx CPU ms/step | DDP CPU ms/step "
        "| in-run ms/step, Phalanx / DDP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["step_time"]:
        ph, dd = r["phalanx"], r["ddp"]
        lines.append(
            f"| {r['params']:,} (hidden {r['hidden']}) | {r['workers']} | {fmt_stat(ph['wall_ms_per_step'])} | "
            f"{fmt_stat(dd['wall_ms_per_step'])} | **{r['phalanx_over_ddp']:.2f}** | "
            f"{fmt_stat(ph['cpu_ms_per_step'])} | {fmt_stat(dd['cpu_ms_per_step'])} | "
            f"{_inrun(ph)} / {_inrun(dd)} |")
    w = result["wire_bytes_per_node_step_over_model_bytes"]
    lines += [
        "",
        f"Worst ratio (`phalanx_over_ddp`): **{result['phalanx_over_ddp']:.2f}**.",
        "",
        "## Bytes on the wire per node and step, over the model's bytes",
        "",
        f"Source: {w['source']}; IP/UDP/TCP headers included; (long − short) / extra steps / workers / (4 × parameters).",
        "",
        "| parameters | workers | Phalanx | DDP | ring all-reduce |",
        "|---|---|---|---|---|",
    ]
    for h, by in w["by_size"].items():
        for wk in by["phalanx"]:
            ring = w["ring_allreduce"][wk]
            lines.append(f"| {params_of(int(h)):,} | {wk} | {_num(by['phalanx'][wk])} | {_num(by['ddp'][wk])} | {ring:.2f} |")
    lines += [
        "",
        "## Cost of fault tolerance without faults (Phalanx)",
        "",
        f"Checkpoints with Phalanx's default cadence — every {CHECKPOINT_EVERY} steps, at most one per 500 ms of "
        "training (`checkpoint_min_interval_ms`), written in the background; on a cluster each is also copied to "
        "a replica — against none (only the final state). The exactly-once ledger has no off switch: it is on "
        "in both.",
        "",
        "Measured in pairs of runs (about 4 s of steps each: the steps column), one with checkpoints and one "
        "without, back to back (which goes "
        "first alternates), each configuration's pair i before any configuration's pair i + 1. A pair's "
        "figure is the in-run ms/step (first to last step of `history.csv`) with checkpoints over the one "
        "without, minus one; the overhead is the median over the pairs. Two runs of the same configuration "
        "on this shared machine differ by several per cent with nothing changed (the spread column), so "
        "one pair says little; the median of many does.",
        "",
        "| parameters | workers | steps per run | off ms/step | on ms/step | pairs (slower with checkpoints) | pair figures min to max | overhead (median of the pairs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h, by in result["ft_overhead_no_faults_by_size"].items():
        for wk, e in by.items():
            if "pairs" in e:
                pairs = f"{e['pairs']} ({e['pairs_slower_with_checkpoints']})"
                spread = f"{e['overhead_min'] * 100:+.1f} to {e['overhead_max'] * 100:+.1f} %"
            else:  # a result of the earlier method (two-length runs per repeat)
                pairs, spread = "–", "–"
            lines.append(f"| {params_of(int(h)):,} | {wk} | {e.get('steps_per_run', '–')} | {e['off_ms_per_step']:.3g} "
                         f"| {e['on_ms_per_step']:.3g} "
                         f"| {pairs} | {spread} | {e['overhead'] * 100:+.1f} % |")
    rec = result["recovery"]
    ph, tr = rec["phalanx"], rec["torchrun"]
    lines += [
        "",
        (f"Worst (`ft_overhead_no_faults`): {result['ft_overhead_no_faults'] * 100:+.1f} %."
         if result["ft_overhead_no_faults"] is not None
         else "Worst (`ft_overhead_no_faults`): not measured (no configuration of this run has checkpoint runs)."),
        "",
        "## Recovery after SIGKILL of one worker",
        "",
    ]
    if not ph["runs"] and not tr["runs"]:
        lines += ["Not measured in this run (`--skip-recovery`).", ""]
    else:
        lines += [
            f"Hidden {rec['hidden']}, 3 workers ({partitions_for(3)} partitions), SIGKILL of worker 1 at step {rec['kill_step']}, checkpoints every "
            f"{rec['checkpoint_every']} steps on both sides. Time from the kill to the next step completed by the "
            "recovered deployment (Phalanx: `node_faults[].recovery_ms` of its summary, the first step applied after "
            "the node was declared down; torchrun: the first step the restarted ranks complete); steps redone = steps "
            "completed before the kill that were computed again"
            + (" (with one range of θ per node, worker 1 also hosts range 1: every range rolls back to the newest "
               "checkpoint, at the stride of the checkpoint cadence, so Phalanx redoes steps too; with "
               "`--aggregator-placement coordinator` it replays only the lost partitions and redoes none)."
               if m.get("aggregator_placement") == "spread" else "."),
            "",
            "| system | kills | recovery ms p50 | p99 | each kill (ms) | steps redone (median) | detector |",
            "|---|---|---|---|---|---|---|",
            f"| Phalanx (`phalanx local --nodes 3 --kill 1@{rec['kill_step']}`) | {len(ph['runs'])} | "
            f"{ph['recovery_ms_p50']} | {ph['recovery_ms_p99']} | {', '.join(str(r['recovery_ms']) for r in ph['runs'])} | "
            f"{ph['steps_redone_median']:g} | {ph['detector']} |",
            f"| torchrun (`--max_restarts=1`, resumes from its checkpoint) | {len(tr['runs'])} | {tr['recovery_ms_p50']} | "
            f"{tr['recovery_ms_p99']} | {', '.join(str(r['recovery_ms']) for r in tr['runs'])} | "
            f"{tr['steps_redone_median']:g} | {tr['detector']} |",
            "",
            f"`recovery_speedup_vs_torchrun` (median torchrun / median Phalanx): **{_num(result['recovery_speedup_vs_torchrun'], 1)}**; "
            f"`recovery_ms_p99` (Phalanx): {result['recovery_ms_p99']}.",
            "",
        ]
    lines += [
        f"Raw figures: `{m['out']}/latest.json`. Reproduce: `{m['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def _inrun(side):
    s = side.get("inrun_ms_per_step_long_runs")
    return "–" if s is None else f"{s['median']:.3g}"


def _num(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------


def command_line():
    """How this run was started, as `bench/run.sh ...` (without the binary run.sh passes)."""
    argv, shown, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--phalanx":
            skip = True
        elif not a.startswith("--phalanx="):
            shown.append(a)
    return " ".join(["bench/run.sh"] + [shlex.quote(a) for a in shown])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and steps, one repeat: seconds, for CI")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="where latest.json goes")
    ap.add_argument("--markdown", help="the report (default: BENCHMARKS.md at the repository root for a full "
                                       "run into bench/results, else OUT/BENCHMARKS.md)")
    ap.add_argument("--phalanx", required=True, help="the phalanx binary")
    ap.add_argument("--work", help="scratch directory (default: OUT/work)")
    ap.add_argument("--repeats", type=int, help="override the profile's repeats")
    ap.add_argument("--sizes", help="override the profile's hidden sizes, comma-separated (each needs --epochs "
                                    "unless the profile has it)")
    ap.add_argument("--workers", help="override the profile's worker counts, comma-separated")
    ap.add_argument("--epochs", help="SHORT,LONG epochs for every size (overrides the profile's)")
    ap.add_argument("--skip-recovery", action="store_true", help="no recovery runs (no recovery figures)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from OUT/latest.json without running anything")
    ap.add_argument("--ft-pairs", type=int, help="override the profile's pairs of checkpoint runs (on, off) per "
                                                 "configuration")
    ap.add_argument("--kills", help="PHALANX,TORCHRUN: how many kills of each (overrides the profile's)")
    ap.add_argument("--torchrun-monitor-interval", type=float, default=5.0,
                    help="torchrun --monitor_interval in s (default 5, torchrun's own default)")
    ap.add_argument("--allow-other-blas", action="store_true", help="do not stop when torch is not on OpenBLAS")
    ap.add_argument("--aggregator-placement", choices=["coordinator", "spread"], default="spread",
                    help="Phalanx on N nodes: one range of the parameters per node (spread, Phalanx's default), "
                         "or every range on the coordinator")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    started = time.time()
    name = "smoke" if args.smoke else "full"
    profile = dict(PROFILES[name])
    if args.repeats:
        profile["repeats"] = args.repeats
    if args.workers:
        profile["workers"] = [int(w) for w in args.workers.split(",")]
        profile["ft_workers"] = [w for w in profile["ft_workers"] if w in profile["workers"]]
    if args.sizes:
        profile["sizes"] = [int(h) for h in args.sizes.split(",")]
    if args.epochs:
        short, long_ = (int(e) for e in args.epochs.split(","))
        profile["epochs"] = {h: (short, long_) for h in profile["sizes"]}
        profile.pop("ft_run_s", None)  # the checkpoint pairs run the long length too
    if args.ft_pairs is not None:
        profile["ft_pairs"] = args.ft_pairs
    if args.kills:
        profile["phalanx_kills"], profile["torchrun_kills"] = (int(k) for k in args.kills.split(","))
    missing = [h for h in profile["sizes"] if h not in profile["epochs"]]
    if missing:
        ap.error(f"no epochs for hidden sizes {missing}: give --epochs SHORT,LONG")
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    args.work = args.work or os.path.join(args.out, "work")
    if args.markdown is None:
        default_out = os.path.abspath(os.path.join(HERE, "results"))
        args.markdown = os.path.join(REPO, "BENCHMARKS.md") if (args.out == default_out and not args.smoke) \
            else os.path.join(args.out, "BENCHMARKS.md")
    if args.report_only:
        with open(os.path.join(args.out, "latest.json")) as f:
            result = json.load(f)
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
        log(f"wrote {args.markdown} from {os.path.join(args.out, 'latest.json')}")
        return 0
    try:
        workload.self_check()
        blas = check_blas(args.allow_other_blas)
        mach = machine()
        bench = Bench(args, profile)
        log(f"profile {name}: sizes {profile['sizes']}, workers {profile['workers']}, {profile['repeats']} repeats")
        bench.speed()
        bench.ft()
        recovery = {"phalanx": [], "torchrun": []} if args.skip_recovery else bench.recovery()
        result = summarise(bench, recovery)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    mach["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result = {
        **result,
        "steps_per_epoch": bench.w.steps_per_epoch,
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": command_line(),
            "profile_name": name,
            "aggregator_placement": args.aggregator_placement,
            "partitions_by_workers": {str(w): partitions_for(w) for w in sorted(set(profile["workers"]) | {3})},
            "out": os.path.relpath(args.out, REPO) if args.out.startswith(REPO) else args.out,
            "profile": {k: (v if k != "epochs" else {str(h): e for h, e in v.items()}) for k, v in profile.items()},
            "duration_s": round(time.time() - started, 1),
            "machine": mach,
            "versions": versions(bench.phalanx, blas),
            "data": {"csv_source": bench.w.source, "train_rows": bench.w.n_train},
            "runs": [{k: v for k, v in r.items()} for r in bench.runs],
        },
    }
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(args.markdown, "w") as f:
        f.write(markdown(result))
    if not args.keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    log(f"wrote {os.path.join(args.out, 'latest.json')} and {args.markdown} in {time.time() - started:.0f} s: "
        f"phalanx_over_ddp {result['phalanx_over_ddp']}, recovery_speedup_vs_torchrun "
        f"{result['recovery_speedup_vs_torchrun']}, ft_overhead_no_faults {result['ft_overhead_no_faults']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
