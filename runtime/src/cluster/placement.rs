//! Where each actor of a job runs, given the live members (a pure function).
//!
//! * The aggregators (and the job supervisor) run on the coordinator (node 0
//!   at start, so killing node 0 exercises aggregator failover): they restore
//!   from the checkpoints on its disk, and the coordinator keeps the role
//!   while it lives, so the aggregators stay where their checkpoints are.
//! * Trainer `i` prefers node `i mod N` (N configured members); when that
//!   node is down it moves to the next live node on the ring. So a node's
//!   failure moves only the trainers it hosted, and its return moves them
//!   back.
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

/// What is placed, and on a cluster of how many configured members.
#[derive(Clone, Copy, Debug)]
pub struct Shape<'a> {
    /// Configured members (ids `0..configured`).
    pub configured: u32,
    /// Trainers of the job.
    pub trainers: u32,
    /// Partition → trainer.
    pub assignment: &'a [u32],
    /// Aggregator ranges.
    pub aggregators: u32,
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
        let Shape { configured, trainers, assignment, aggregators, replicas } = *shape;
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
            nodes.insert(ActorKey::aggregator(r), coordinator);
        }
        for t in 0..trainers {
            nodes.insert(ActorKey::trainer(t), ring_next(t % configured.max(1)));
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

    /// Actors placed on `node`.
    pub fn on(&self, node: u32) -> impl Iterator<Item = ActorKey> + '_ {
        self.nodes.iter().filter(move |(_, n)| **n == node).map(|(k, _)| *k)
    }

    /// Trainers placed on `node`.
    pub fn trainers_on(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        self.on(node).filter(|k| k.role == Role::Trainer).map(|k| k.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    fn shape(trainers: u32, assignment: &[u32], aggregators: u32, replicas: u32) -> Shape<'_> {
        Shape { configured: 3, trainers, assignment, aggregators, replicas }
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
            let shape = Shape { configured: 5, trainers: 5, assignment: &assignment, aggregators: 1, replicas };
            Placement::compute(1, coordinator, &members(live), &shape).unwrap().replicas
        };
        assert_eq!(five(&[0, 1, 2, 3, 4], 0, 2), vec![1, 2]);
        assert_eq!(five(&[0, 1, 2, 3, 4], 2, 2), vec![0, 1], "a sticky coordinator's successor is the lowest other id");
        assert_eq!(five(&[0, 3, 4], 0, 2), vec![3, 4]);
        assert_eq!(five(&[3, 4], 3, 2), vec![4], "fewer live nodes than replicas: as many as there are");
        assert_eq!(five(&[0], 0, 2), Vec::<u32>::new());
        assert_eq!((default_replicas(3), default_replicas(4), default_replicas(5), default_replicas(9)), (1, 1, 2, 2));
    }
}
