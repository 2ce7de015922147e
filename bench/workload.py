"""The benchmark's workload, computed exactly as Phalanx computes it (stdlib only).

Both sides of the race read the same CSV and the same initial weights. Phalanx derives the
held-out split, the standardisation, the partitions and every batch from the job seed; this
module reproduces those derivations bit for bit so that PyTorch DDP trains on the same rows in
the same order:

    CSV ──parse f32──▶ table ──shuffle(derive_seed("phx.test", [seed]))──▶ test | train
    train ──standardise (f64 mean / population std of the train rows)──▶ f32 features
    train rows ──shuffle(derive_seed("phx.part", [seed]))──▶ P contiguous partitions
    partition p, epoch e ──shuffle(derive_seed("phx.epch", [seed, p, e]))──▶ S chunks, one a step

The shuffles are Fisher-Yates driven by ChaCha8 (rand_chacha 0.9, seeded with rand_core's
`seed_from_u64`), written out as in `actors/src/data/mod.rs`. `self_check()` pins the stream
against the value the Rust tests pin.
"""

import csv
import json
import math
import struct
from array import array

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

SPLIT_DOMAIN = int.from_bytes(b"phx.test", "big")
ASSIGN_DOMAIN = int.from_bytes(b"phx.part", "big")
EPOCH_DOMAIN = int.from_bytes(b"phx.epch", "big")


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_seed(domain, values):
    h = splitmix64(domain)
    for v in values:
        h = splitmix64(h ^ v)
    return h


def _rotl(v, c):
    return ((v << c) & MASK32) | (v >> (32 - c))


class ChaCha8:
    """rand_chacha 0.9's ChaCha8Rng: 64-bit block counter, stream 0, `next_u64` = two words."""

    CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)

    def __init__(self, seed_u64):
        # rand_core 0.9 `seed_from_u64`: PCG32 fills the 32-byte key, 4 bytes at a time.
        state = seed_u64 & MASK64
        key = []
        for _ in range(8):
            state = (state * 6364136223846793005 + 11634580027462260723) & MASK64
            xorshifted = (((state >> 18) ^ state) >> 27) & MASK32
            rot = state >> 59
            key.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & MASK32)
        self.key = key
        self.counter = 0
        self.words = []
        self.index = 0

    def _block(self):
        c = self.counter
        inp = list(self.CONSTANTS) + self.key + [c & MASK32, c >> 32, 0, 0]
        x = inp[:]
        for _ in range(4):  # 8 rounds = 4 double rounds
            for a, b, cc, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                                (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
                x[a] = (x[a] + x[b]) & MASK32
                x[d] = _rotl(x[d] ^ x[a], 16)
                x[cc] = (x[cc] + x[d]) & MASK32
                x[b] = _rotl(x[b] ^ x[cc], 12)
                x[a] = (x[a] + x[b]) & MASK32
                x[d] = _rotl(x[d] ^ x[a], 8)
                x[cc] = (x[cc] + x[d]) & MASK32
                x[b] = _rotl(x[b] ^ x[cc], 7)
        self.counter = (c + 1) & MASK64
        return [(x[i] + inp[i]) & MASK32 for i in range(16)]

    def next_u64(self):
        # Words are consumed in pairs from 16-word blocks, so a pair never straddles two.
        if self.index >= len(self.words):
            self.words = self._block()
            self.index = 0
        lo, hi = self.words[self.index], self.words[self.index + 1]
        self.index += 2
        return lo | (hi << 32)


def uniform_below(rng, bound):
    threshold = ((-bound) & MASK64) % bound
    while True:
        wide = rng.next_u64() * bound
        if (wide & MASK64) >= threshold:
            return wide >> 64


def seeded_shuffle(seed, items):
    rng = ChaCha8(seed)
    for i in range(len(items) - 1, 0, -1):
        j = uniform_below(rng, i + 1)
        items[i], items[j] = items[j], items[i]


def self_check():
    """The values the Rust unit tests pin (`seeded_shuffle_is_pinned`, `splitmix64_matches…`)."""
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    v = list(range(10))
    seeded_shuffle(0, v)
    if v != [6, 1, 8, 3, 2, 9, 0, 5, 4, 7]:
        raise AssertionError(f"seeded_shuffle(0, 0..10) = {v}: the Python port disagrees with Phalanx")


def f32(v):
    """Round a Python float (f64) to the nearest f32, as `as f32` does."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def read_csv(path, target):
    """Features as f32 (per row) and class labels (sorted distinct integer values → 0..K)."""
    with open(path, newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f)]
    header, body = rows[0], [r for r in rows[1:] if r]
    t = header.index(target)
    feats = [[f32(float(c)) for i, c in enumerate(r) if i != t] for r in body]
    values = [int(float(r[t])) for r in body]
    classes = sorted(set(values))
    index = {v: i for i, v in enumerate(classes)}
    labels = [index[v] for v in values]
    names = [h for i, h in enumerate(header) if i != t]
    return feats, labels, [str(c) for c in classes], names


def split_sizes(rows, test_fraction):
    if test_fraction == 0.0:
        test = 0
    else:
        # f64::round: half away from zero (Python's round() would round half to even).
        test = min(max(int(math.floor(rows * test_fraction + 0.5)), 1), max(rows, 1))
    return rows - test, test


def _standard_scale(column):
    first = column[0]
    if all(v == first for v in column):
        return first, 1.0
    n = float(len(column))
    s = 0.0
    for v in column:
        s += v
    mean = s / n
    var = 0.0
    for v in column:
        d = v - mean
        var += d * d
    std = math.sqrt(var / n)
    return (mean, std) if math.isfinite(std) and std > 0 else (mean, 1.0)


def prepare(feats, labels, seed, test_fraction):
    """The training rows (standardised f32 features, labels) in Phalanx's order."""
    n = len(feats)
    _, test_rows = split_sizes(n, test_fraction)
    order = list(range(n))
    seeded_shuffle(derive_seed(SPLIT_DOMAIN, [seed]), order)
    train_idx = order[test_rows:]
    x = [feats[i] for i in train_idx]
    y = [labels[i] for i in train_idx]
    cols = len(x[0])
    for j in range(cols):
        mean, std = _standard_scale([r[j] for r in x])
        for r in x:
            r[j] = f32((r[j] - mean) / std)
    return x, y


class Partitions:
    """`actors/src/data/partition.rs`: fixed partitions, a seeded shuffle per epoch."""

    def __init__(self, n_train, partitions, batch_size, seed):
        order = list(range(n_train))
        seeded_shuffle(derive_seed(ASSIGN_DOMAIN, [seed]), order)
        self.seed = seed
        self.indices = [order[p * n_train // partitions:(p + 1) * n_train // partitions]
                        for p in range(partitions)]
        self.steps_per_epoch = min(-(-n_train // batch_size), n_train // partitions)

    def epoch_batches(self, p, epoch):
        perm = list(self.indices[p])
        seeded_shuffle(derive_seed(EPOCH_DOMAIN, [self.seed, p, epoch]), perm)
        m, s = len(perm), self.steps_per_epoch
        return [perm[k * m // s:(k + 1) * m // s] for k in range(s)]


def write_plan(path, parts, epochs):
    """Every step's rows, partition by partition: the DDP ranks read it instead of shuffling.

    Layout: one JSON header line (`partitions`, `steps`, `steps_per_epoch`), then int32 little
    endian: for each step, P counts, then the rows of partitions 0..P-1 in order.
    """
    P = len(parts.indices)
    S = parts.steps_per_epoch
    out = array("i")
    for e in range(epochs):
        per_p = [parts.epoch_batches(p, e) for p in range(P)]
        for k in range(S):
            out.extend(len(per_p[p][k]) for p in range(P))
            for p in range(P):
                out.extend(per_p[p][k])
    if out.itemsize != 4:
        raise RuntimeError("array('i') is not 32-bit here")
    with open(path, "wb") as f:
        f.write((json.dumps({"partitions": P, "steps": epochs * S, "steps_per_epoch": S}) + "\n").encode())
        if struct.pack("=i", 1) != struct.pack("<i", 1):
            out.byteswap()
        out.tofile(f)


def owned_partitions(partitions, workers, rank):
    """The partitions Phalanx's trainer `rank` of `workers` owns (`JobPlan::contiguous`):
    ceil(rank*P/T) .. ceil((rank+1)*P/T) with T = min(workers, P), so whole subtrees of the
    reduction tree stay with one worker (larger shares first)."""
    t = max(1, min(workers, max(partitions, 1)))
    if rank >= t:
        return []
    return list(range(-(-rank * partitions // t), -(-(rank + 1) * partitions // t)))


def mlp_layout(inputs, hidden, outputs):
    """Phalanx's MLP tensors in flat order: name, shape (row-major)."""
    return [("w1", [inputs, hidden]), ("b1", [hidden]), ("w2", [hidden, outputs]), ("b2", [outputs])]


def write_init(path, inputs, hidden, outputs, seed):
    """Seeded initial weights as safetensors (F32, the MLP's layout): He-uniform w1,
    Xavier-uniform w2, zero biases, drawn with the stdlib's seeded `random` (any fixed draw
    works: both sides read the file)."""
    import random

    rng = random.Random(seed)
    tensors = []
    for name, shape in mlp_layout(inputs, hidden, outputs):
        n = 1
        for d in shape:
            n *= d
        if name == "w1":
            lim = math.sqrt(6.0 / inputs)
        elif name == "w2":
            lim = math.sqrt(6.0 / (hidden + outputs))
        else:
            lim = 0.0
        values = array("f", (rng.uniform(-lim, lim) for _ in range(n)) if lim else bytes(4 * n))
        tensors.append((name, shape, values))
    write_safetensors(path, tensors)


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, shape, values in tensors:
        data = values.tobytes() if struct.pack("=f", 1.0) == struct.pack("<f", 1.0) else _le(values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def _le(values):
    v = array("f", values)
    v.byteswap()
    return v.tobytes()


def read_safetensors(path):
    """{name: (shape, bytes)} of an F32 safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        out[name] = (meta["shape"], body[a:b])
    return out


if __name__ == "__main__":
    self_check()
    print("workload self-check passed")
