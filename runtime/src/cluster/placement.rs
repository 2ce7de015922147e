//! Where each actor of a job runs, given the live members (a pure function).
//!
//! * The job supervisor runs on the coordinator (node 0 at start). When the job
//!   spreads the aggregators (`aggregator_placement = "spread"`, the default,
//!   with one range per member unless the job says otherwise), range `r`
//!   runs on node `r mod N`, else on the next live node of the ring, so each
//!   node applies and sends its own share of θ instead of the coordinator's
//!   node carrying all of it. A range stays where it runs until it fails (a
//!   node coming back does not move it: moving a range is a rollback); a new
//!   coordinator places every range afresh. The coordinator always hosts one
//!   range at least (range `coordinator mod ranges` if none is its by the
//!   ring), so some range always commits under its lease. With
//!   `aggregator_placement = "coordinator"` every range runs beside the
//!   supervisor (so killing node 0 at start is the aggregators' failover).
//! * Trainers, by [`Policy`]: with `Ring` (the embedded membership's), trainer
//!   `i` prefers node `i mod N` (N configured members) and, when that node is
//!   down, moves to the next live node on the ring. With `Hash` (on a
//!   coordination service, as the classic ZooKeeper designs assign partitions),
//!   each trainer's home is chosen by rendezvous hashing with bounded loads over
//!   the configured members (every node gets ⌈T/N⌉ at most), and the trainers
//!   of a down node go each to the least loaded live node, ties broken by the
//!   same hash — so they spread over the survivors instead of doubling one
//!   node's work. Either way a node's failure moves only the trainers it
//!   hosted, and its return moves them back, and every node computes the same
//!   placement from the view alone.
//! * A shard runs beside the trainer owning its partition (its batches then
//!   never cross the network).
//! * Checkpoints are copied to `replicas` nodes: the lowest live nodes other
//!   than the coordinator. The first of them is the node the membership rules
//!   elect if the coordinator dies (the lowest live id), so the successor
//!   holds a copy; the others cover the successor dying with it.

use std::collections::{BTreeMap, BTreeSet};

use phalanx_actors::protocol::{ActorKey, Role};
use serde::{Deserialize, Serialize};

/// Actor → node, for one view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The membership epoch this placement belongs to.
    pub epoch: u64,
    /// Node running the aggregators and the job supervisor.
    pub coordinator: u32,
    /// Nodes keeping a copy of every checkpoint, successor first (none in a
    /// one-node cluster; fewer than asked when fewer nodes are live).
    pub replicas: Vec<u32>,
    /// Node of every actor.
    pub nodes: BTreeMap<ActorKey, u32>,
}

/// How trainers (and the shards beside them) are spread over the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Trainer `i` on node `i mod N`, else the next live node on the ring.
    #[default]
    Ring,
    /// Rendezvous hashing with bounded loads; a down node's trainers spread over the live ones.
    Hash,
}

/// What is placed, and on a cluster of how many configured members.
#[derive(Clone, Copy, Debug)]
pub struct Shape<'a> {
    /// How trainers are spread.
    pub policy: Policy,
    /// Configured members (ids `0..configured`).
    pub configured: u32,
    /// Trainers of the job.
    pub trainers: u32,
    /// Partition → trainer.
    pub assignment: &'a [u32],
    /// Aggregator ranges.
    pub aggregators: u32,
    /// Ranges over the nodes (`r mod N`) instead of all on the coordinator.
    pub spread: bool,
    /// Checkpoint copies wanted on other nodes.
    pub replicas: u32,
}

/// The default number of checkpoint replicas of a cluster of `configured`
/// members: two from five members on (a coordinator and its successor can
/// die together and a majority is still live), else one.
pub fn default_replicas(configured: u32) -> u32 {
    if configured >= 5 {
        2
    } else {
        1
    }
}

impl Placement {
    /// Place `shape` on the live `members`, coordinated by `coordinator`.
    pub fn compute(epoch: u64, coordinator: u32, members: &BTreeSet<u32>, shape: &Shape<'_>) -> Option<Self> {
        let Shape { policy, configured, trainers, assignment, aggregators, spread, replicas } = *shape;
        if !members.contains(&coordinator) {
            return None;
        }
        let ring_next = |preferred: u32| -> u32 {
            (0..configured.max(1))
                .map(|k| (preferred + k) % configured.max(1))
                .find(|n| members.contains(n))
                .unwrap_or(coordinator)
        };
        let mut nodes = BTreeMap::new();
        for r in 0..aggregators {
            let node = if spread { ring_next(r % configured.max(1)) } else { coordinator };
            nodes.insert(ActorKey::aggregator(r), node);
        }
        // The coordinator hosts a range at least: its ranges commit under its lease, and no
        // hosted range can apply a step their θ was not published for.
        if spread && aggregators > 0 && !nodes.values().any(|n| *n == coordinator) {
            nodes.insert(ActorKey::aggregator(coordinator % aggregators), coordinator);
        }
        match policy {
            Policy::Ring => {
                for t in 0..trainers {
                    nodes.insert(ActorKey::trainer(t), ring_next(t % configured.max(1)));
                }
            }
            Policy::Hash => {
                for (t, node) in hashed(configured, trainers, members).into_iter().enumerate() {
                    nodes.insert(ActorKey::trainer(t as u32), node.unwrap_or(coordinator));
                }
            }
        }
        for (p, t) in assignment.iter().enumerate() {
            let node = nodes[&ActorKey::trainer(*t)];
            nodes.insert(ActorKey::shard(p as u32), node);
        }
        let replicas = members.iter().copied().filter(|m| *m != coordinator).take(replicas as usize).collect();
        Some(Self { epoch, coordinator, replicas, nodes })
    }

    /// The node of `key`.
    pub fn node_of(&self, key: ActorKey) -> Option<u32> {
        self.nodes.get(&key).copied()
    }

    /// The nodes a checkpoint file written on `writer` is copied to: the coordinator (it
    /// restores from them) and the replicas (its successor is the first), but not `writer`.
    pub fn checkpoint_keepers(&self, writer: u32) -> Vec<u32> {
        std::iter::once(self.coordinator).chain(self.replicas.iter().copied()).filter(|n| *n != writer).collect()
    }

    /// How many nodes keep a copy of each checkpoint file of aggregator `range` (written by
    /// its host; a range not placed is the coordinator's).
    pub fn checkpoint_copies(&self, range: u32) -> u32 {
        let host = self.node_of(ActorKey::aggregator(range)).unwrap_or(self.coordinator);
        self.checkpoint_keepers(host).len() as u32
    }

    /// Actors placed on `node`.
    pub fn on(&self, node: u32) -> impl Iterator<Item = ActorKey> + '_ {
        self.nodes.iter().filter(move |(_, n)| **n == node).map(|(k, _)| *k)
    }

    /// Trainers placed on `node`.
    pub fn trainers_on(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        self.on(node).filter(|k| k.role == Role::Trainer).map(|k| k.index)
    }
}

/// A trainer's score on a node: the same on every node and every run (no seeded hasher).
fn score(trainer: u32, node: u32) -> u64 {
    // splitmix64's finaliser over both numbers.
    let mut z = (u64::from(trainer) << 32 | u64::from(node)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// [`Policy::Hash`]: each trainer's node among the live `members` (none when none is live).
fn hashed(configured: u32, trainers: u32, members: &BTreeSet<u32>) -> Vec<Option<u32>> {
    let configured = configured.max(1);
    // Homes over every configured node: highest score first, at most ⌈T/N⌉ per node.
    let cap = trainers.div_ceil(configured);
    let mut load = vec![0u32; configured as usize];
    let mut out: Vec<Option<u32>> = Vec::with_capacity(trainers as usize);
    for t in 0..trainers {
        let mut ranked: Vec<u32> = (0..configured).collect();
        ranked.sort_by_key(|n| std::cmp::Reverse(score(t, *n)));
        let home = ranked.into_iter().find(|n| load[*n as usize] < cap).unwrap_or(0);
        load[home as usize] += 1;
        out.push(Some(home));
    }
    // Trainers whose home is down: each to the least loaded live node, ties by score.
    let mut live_load: BTreeMap<u32, u32> = members.iter().map(|m| (*m, 0)).collect();
    for node in out.iter().flatten() {
        if let Some(l) = live_load.get_mut(node) {
            *l += 1;
        }
    }
    for (t, slot) in out.iter_mut().enumerate() {
        if slot.is_some_and(|home| live_load.contains_key(&home)) {
            continue;
        }
        let best =
            live_load.iter().min_by_key(|(n, l)| (**l, std::cmp::Reverse(score(t as u32, **n)))).map(|(n, _)| *n);
        if let Some(n) = best {
            *live_load.get_mut(&n).expect("a live node") += 1;
        }
        *slot = best;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    fn shape(trainers: u32, assignment: &[u32], aggregators: u32, replicas: u32) -> Shape<'_> {
        Shape { policy: Policy::Ring, configured: 3, trainers, assignment, aggregators, spread: false, replicas }
    }

    #[test]
    fn aggregators_go_to_the_lowest_live_node_and_shards_follow_their_trainer() {
        let assignment = [0, 1, 2, 0, 1, 2];
        let p = Placement::compute(1, 0, &members(&[0, 1, 2]), &shape(3, &assignment, 2, 1)).unwrap();
        assert_eq!(p.node_of(ActorKey::aggregator(1)), Some(0));
        assert_eq!(p.node_of(ActorKey::trainer(2)), Some(2));
        assert_eq!(p.node_of(ActorKey::shard(4)), Some(1));
        assert_eq!(p.replicas, vec![1]);
    }

    #[test]
    fn a_dead_node_moves_only_its_own_actors() {
        let assignment = [0, 1, 2, 0, 1, 2];
        let before = Placement::compute(1, 0, &members(&[0, 1, 2]), &shape(3, &assignment, 1, 1)).unwrap();
        let after = Placement::compute(2, 0, &members(&[0, 2]), &shape(3, &assignment, 1, 1)).unwrap();
        for (key, node) in &before.nodes {
            if *node != 1 {
                assert_eq!(after.node_of(*key), Some(*node), "{key} should stay");
            } else {
                assert_ne!(after.node_of(*key), Some(1), "{key} must move");
            }
        }
        let coordinator_lost = Placement::compute(3, 1, &members(&[1, 2]), &shape(3, &assignment, 1, 1)).unwrap();
        assert_eq!((coordinator_lost.coordinator, coordinator_lost.replicas.clone()), (1, vec![2]));
        assert_eq!(coordinator_lost.node_of(ActorKey::trainer(0)), Some(1));
    }

    #[test]
    fn no_members_no_placement() {
        assert!(Placement::compute(1, 0, &BTreeSet::new(), &shape(1, &[0], 1, 1)).is_none());
        assert!(
            Placement::compute(1, 3, &members(&[0, 1]), &shape(1, &[0], 1, 1)).is_none(),
            "the coordinator is a member"
        );
    }

    #[test]
    fn aggregators_stay_with_a_coordinator_that_is_not_the_lowest_node() {
        let assignment = [0, 1, 2, 0, 1, 2];
        // Node 0 came back while node 1 coordinates: node 1 keeps the aggregators.
        let p = Placement::compute(4, 1, &members(&[0, 1, 2]), &shape(3, &assignment, 2, 1)).unwrap();
        assert_eq!((p.node_of(ActorKey::aggregator(0)), p.node_of(ActorKey::aggregator(1))), (Some(1), Some(1)));
        assert_eq!((p.coordinator, p.replicas.clone()), (1, vec![0]));
        assert_eq!(p.node_of(ActorKey::trainer(0)), Some(0), "trainer 0 goes home");
    }

    #[test]
    fn replicas_are_the_lowest_live_nodes_after_the_coordinator_so_the_successor_has_a_copy() {
        let assignment = [0, 1, 2, 3, 4];
        let five = |live: &[u32], coordinator: u32, replicas: u32| {
            let shape = Shape {
                policy: Policy::Ring,
                configured: 5,
                trainers: 5,
                assignment: &assignment,
                aggregators: 1,
                spread: false,
                replicas,
            };
            Placement::compute(1, coordinator, &members(live), &shape).unwrap().replicas
        };
        assert_eq!(five(&[0, 1, 2, 3, 4], 0, 2), vec![1, 2]);
        assert_eq!(five(&[0, 1, 2, 3, 4], 2, 2), vec![0, 1], "a sticky coordinator's successor is the lowest other id");
        assert_eq!(five(&[0, 3, 4], 0, 2), vec![3, 4]);
        assert_eq!(five(&[3, 4], 3, 2), vec![4], "fewer live nodes than replicas: as many as there are");
        assert_eq!(five(&[0], 0, 2), Vec::<u32>::new());
        assert_eq!((default_replicas(3), default_replicas(4), default_replicas(5), default_replicas(9)), (1, 1, 2, 2));
    }

    fn hashed_on(live: &[u32], configured: u32, trainers: u32) -> Vec<u32> {
        let assignment: Vec<u32> = (0..trainers).collect();
        let shape = Shape {
            policy: Policy::Hash,
            configured,
            trainers,
            assignment: &assignment,
            aggregators: 1,
            spread: false,
            replicas: 1,
        };
        let coordinator = live[0];
        let p = Placement::compute(1, coordinator, &members(live), &shape).unwrap();
        (0..trainers).map(|t| p.node_of(ActorKey::trainer(t)).unwrap()).collect()
    }

    fn loads(placed: &[u32], nodes: u32) -> Vec<usize> {
        (0..nodes).map(|n| placed.iter().filter(|p| **p == n).count()).collect()
    }

    #[test]
    fn hashing_balances_the_trainers_and_a_dead_node_spreads_only_its_own() {
        for (nodes, trainers) in [(3, 3), (3, 6), (5, 12), (4, 3), (7, 20)] {
            let all: Vec<u32> = (0..nodes).collect();
            let before = hashed_on(&all, nodes, trainers);
            let most = trainers.div_ceil(nodes) as usize;
            assert!(loads(&before, nodes).iter().all(|l| *l <= most), "{nodes} nodes, {trainers} trainers: {before:?}");
            for dead in 0..nodes {
                let live: Vec<u32> = all.iter().copied().filter(|n| *n != dead).collect();
                let after = hashed_on(&live, nodes, trainers);
                for t in 0..trainers as usize {
                    if before[t] == dead {
                        assert_ne!(after[t], dead);
                    } else {
                        assert_eq!(after[t], before[t], "trainer {t} is not on the dead node {dead}: it stays");
                    }
                }
                // The dead node's trainers do not pile up: no survivor gets more than one more
                // than another.
                let survivors: Vec<usize> = loads(&after, nodes)
                    .into_iter()
                    .enumerate()
                    .filter(|(n, _)| *n as u32 != dead)
                    .map(|(_, l)| l)
                    .collect();
                let (lo, hi) = (survivors.iter().min().unwrap(), survivors.iter().max().unwrap());
                assert!(hi - lo <= 1 || *hi <= most, "{nodes} nodes, {trainers} trainers, node {dead} dead: {after:?}");
                // Back: every trainer goes home.
                assert_eq!(hashed_on(&all, nodes, trainers), before);
            }
        }
        // Six trainers on three nodes, one dead: its two go to two different nodes (a ring would
        // give both to its neighbour).
        let before = hashed_on(&[0, 1, 2], 3, 6);
        let after = hashed_on(&[0, 2], 3, 6);
        assert_eq!(loads(&after, 3), vec![3, 0, 3], "{before:?} then {after:?}");
    }

    #[test]
    fn spread_ranges_go_one_to_a_node_and_a_dead_nodes_range_to_the_next_live_one() {
        let assignment = [0, 1, 2, 0, 1, 2];
        let spread = |live: &[u32], coordinator: u32| {
            let shape = Shape { spread: true, ..shape(3, &assignment, 3, 1) };
            let p = Placement::compute(1, coordinator, &members(live), &shape).unwrap();
            (0..3).map(|r| p.node_of(ActorKey::aggregator(r)).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(spread(&[0, 1, 2], 0), vec![0, 1, 2]);
        assert_eq!(spread(&[0, 2], 0), vec![0, 2, 2], "range 1 to the next live node");
        assert_eq!(spread(&[1, 2], 1), vec![1, 1, 2], "the coordinator does not pull them in");
        // More ranges than nodes: round the ring again.
        let five = Shape { spread: true, ..shape(3, &assignment, 5, 1) };
        let p = Placement::compute(1, 0, &members(&[0, 1, 2]), &five).unwrap();
        let nodes: Vec<u32> = (0..5).map(|r| p.node_of(ActorKey::aggregator(r)).unwrap()).collect();
        assert_eq!(nodes, vec![0, 1, 2, 0, 1]);
        // Fewer ranges than nodes, and the coordinator is none of their homes: it takes one.
        let two = Shape { spread: true, ..shape(3, &assignment, 2, 1) };
        let p = Placement::compute(1, 2, &members(&[0, 1, 2]), &two).unwrap();
        assert_eq!((p.node_of(ActorKey::aggregator(0)), p.node_of(ActorKey::aggregator(1))), (Some(2), Some(1)));
    }

    /// Ranges one to a node on three nodes, one replica: the coordinator's range is copied to
    /// the replica, the replica's to the coordinator, the third node's to both (4 copies for 3
    /// ranges); with every range on the coordinator, each goes to the replica alone.
    #[test]
    fn checkpoint_files_are_copied_to_the_coordinator_and_the_replicas_but_not_their_writer() {
        let assignment = [0, 1, 2, 0, 1, 2];
        let spread = Shape { spread: true, ..shape(3, &assignment, 3, 1) };
        let p = Placement::compute(1, 0, &members(&[0, 1, 2]), &spread).unwrap();
        assert_eq!(
            (p.checkpoint_keepers(0), p.checkpoint_keepers(1), p.checkpoint_keepers(2)),
            (vec![1], vec![0], vec![0, 1])
        );
        assert_eq!((0..3).map(|r| p.checkpoint_copies(r)).collect::<Vec<_>>(), vec![1, 1, 2]);
        let together = Placement::compute(1, 0, &members(&[0, 1, 2]), &shape(3, &assignment, 3, 1)).unwrap();
        assert_eq!((0..3).map(|r| together.checkpoint_copies(r)).collect::<Vec<_>>(), vec![1, 1, 1]);
        let alone = Placement::compute(1, 0, &members(&[0]), &spread).unwrap();
        assert_eq!((alone.checkpoint_keepers(0), alone.checkpoint_copies(0)), (vec![], 0), "one node: no copies");
    }

    #[test]
    fn hashing_does_not_depend_on_who_coordinates() {
        let assignment: Vec<u32> = (0..6).collect();
        let shape = Shape {
            policy: Policy::Hash,
            configured: 3,
            trainers: 6,
            assignment: &assignment,
            aggregators: 1,
            spread: false,
            replicas: 1,
        };
        let a = Placement::compute(1, 0, &members(&[0, 1, 2]), &shape).unwrap();
        let b = Placement::compute(2, 2, &members(&[0, 1, 2]), &shape).unwrap();
        for t in 0..6 {
            assert_eq!(a.node_of(ActorKey::trainer(t)), b.node_of(ActorKey::trainer(t)));
        }
    }
}
