"""The PyTorch side of the race: the same MLP, data, batches and SGD as Phalanx, on DDP (gloo).

    ddp.py blas                       which BLAS torch runs on (JSON), after a matrix product
    ddp.py launch --world N ARGS      N rank processes (torch.distributed, gloo, env://), waited
    ddp.py run --rank R --world N ARGS   one rank (what `launch` starts)
    ddp.py elastic ARGS               one rank under torchrun: checkpoints every K steps and
                                      resumes from the newest one after a restart

Each rank owns the contiguous partitions ⌊rP/N⌋ .. ⌊(r+1)P/N⌋ (Phalanx's assignment), feeds
their rows of every step from the plan file (`workload.write_plan`, the batches Phalanx feeds),
sums the per-sample cross-entropy, scales it by N / (rows in the step) so that DDP's average
over ranks is Phalanx's gradient (sum over the global batch / its size), and applies plain SGD
in f32. One compute thread per process. The per-step loss sums go to `OUT/losses-rank{R}.json`;
the driver adds them up and compares the curve with Phalanx's `history.csv`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workload  # noqa: E402

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def blas_report():
    import torch

    a = torch.randn(256, 256)
    (a @ a).sum().item()
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            name = os.path.basename(path).lower()
            if any(k in name for k in ("blas", "lapack", "mkl", "atlas", "blis")):
                libs.add(os.path.realpath(path))
    libs = sorted(libs)
    kind = "openblas" if any("openblas" in p.lower() for p in libs) else (
        "mkl" if any("mkl" in p.lower() for p in libs) else ("reference" if libs else "none found"))
    return {
        "torch": torch.__version__,
        "blas": kind,
        "blas_libraries": libs,
        "torch_threads": torch.get_num_threads(),
    }


def add_common(p):
    p.add_argument("--csv", required=True)
    p.add_argument("--target", default="quality")
    p.add_argument("--init", required=True, help="initial weights (safetensors, Phalanx's MLP layout)")
    p.add_argument("--plan", required=True, help="batch plan (workload.write_plan)")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--port", type=int, default=29500)


class Plan:
    """Every step's rows per partition, from the plan file."""

    def __init__(self, path):
        import numpy as np

        with open(path, "rb") as f:
            header = json.loads(f.readline())
            data = np.frombuffer(f.read(), dtype="<i4")
        self.partitions = header["partitions"]
        self.steps = header["steps"]
        P = self.partitions
        self.data = data
        # Offsets of each step's record: P counts, then the rows.
        offsets = np.zeros(self.steps + 1, dtype=np.int64)
        pos = 0
        for s in range(self.steps):
            offsets[s] = pos
            pos += P + int(data[pos:pos + P].sum())
        offsets[self.steps] = pos
        self.offsets = offsets

    def rows(self, step, owned):
        """The rows the partitions in `owned` feed at `step`, in partition order, and the step's
        total row count."""
        import numpy as np

        P = self.partitions
        at = int(self.offsets[step])
        counts = self.data[at:at + P]
        starts = np.concatenate(([0], np.cumsum(counts)))
        base = at + P
        parts = [self.data[base + starts[p]:base + starts[p + 1]] for p in owned]
        return np.concatenate(parts), int(counts.sum())


def train(rank, world, args, elastic=False):
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if elastic:
        print(f"pid {rank} {os.getpid()} {restart}", flush=True)

    feats, labels, _, _ = workload.read_csv(args.csv, args.target)
    x, y = workload.prepare(feats, labels, args.seed, args.test_fraction)
    x = torch.tensor(np.array(x, dtype=np.float32))
    y = torch.tensor(np.array(y, dtype=np.int64))
    inputs, classes = x.shape[1], int(y.max().item()) + 1
    plan = Plan(args.plan)
    if plan.steps < args.steps:
        raise SystemExit(f"{args.plan}: {plan.steps} steps planned, {args.steps} asked")
    owned = workload.owned_partitions(plan.partitions, world, rank)

    tensors = workload.read_safetensors(args.init)
    params = {}
    for name, shape in workload.mlp_layout(inputs, args.hidden, classes):
        got_shape, data = tensors[name]
        if list(got_shape) != shape:
            raise SystemExit(f"{args.init}: tensor {name} is {got_shape}, the model needs {shape}")
        params[name] = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape).clone()

    class Mlp(torch.nn.Module):
        """relu(x·W1 + b1)·W2 + b2 with Phalanx's tensor shapes (W1: inputs × hidden)."""

        def __init__(self):
            super().__init__()
            for name, value in params.items():
                self.register_parameter(name, torch.nn.Parameter(value))

        def forward(self, xb):
            h = torch.relu(torch.addmm(self.b1, xb, self.w1))
            return torch.addmm(self.b2, h, self.w2)

    model = Mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    start = 0
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if elastic and os.path.exists(ckpt):
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resumed {rank} {start} {restart} {time.time():.6f}", flush=True)

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ddp = DDP(model)
    losses = []
    t_first = time.time()
    for step in range(start, args.steps):
        rows, n_step = plan.rows(step, owned)
        idx = torch.from_numpy(rows.astype(np.int64))
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(xb), yb, reduction="sum")
        (loss * (world / n_step)).backward()
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if elastic:
            if rank == 0:
                print(f"step {done} {time.time():.6f} {restart}", flush=True)
            if args.checkpoint_every and done % args.checkpoint_every == 0 and rank == 0:
                save_checkpoint(torch, ckpt, model, optimizer, done)
    t_last = time.time()
    with open(os.path.join(args.out, f"losses-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "start": start, "loss_sums": losses,
                   "first_step_unix": t_first, "last_step_unix": t_last,
                   "partitions": owned}, f)
    dist.destroy_process_group()


def save_checkpoint(torch, path, model, optimizer, step):
    """Atomic and durable, as Phalanx's: temporary file, fsync, rename, fsync of the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def forward_args(args):
    out = []
    for key, value in vars(args).items():
        if key in ("mode", "world", "rank"):
            continue
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def launch(args):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), **THREAD_ENV)
    procs = []
    for rank in range(args.world):
        cmd = [sys.executable, os.path.abspath(__file__), "run", "--rank", str(rank),
               "--world", str(args.world)] + forward_args(args)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    bad = [(r, c) for r, c in enumerate(codes) if c != 0]
    if bad:
        raise SystemExit(f"ddp ranks failed (rank, exit code): {bad}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("blas")
    p = sub.add_parser("launch")
    p.add_argument("--world", type=int, required=True)
    add_common(p)
    p = sub.add_parser("run")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    add_common(p)
    p = sub.add_parser("elastic")
    add_common(p)
    args = parser.parse_args()
    if args.mode == "blas":
        for k, v in THREAD_ENV.items():
            os.environ.setdefault(k, v)
        print(json.dumps(blas_report()))
    elif args.mode == "launch":
        launch(args)
    elif args.mode == "run":
        train(args.rank, args.world, args)
    else:
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, elastic=True)


if __name__ == "__main__":
    main()
