//! What a node is asked, and what it answers about itself: the commands a
//! [`NodeHandle`](crate::NodeHandle) and the client API send the node loop, and the
//! cluster status it answers with. Its own module so that the node loop, the job
//! registry and the client API all speak it without depending on each other.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::registry::{JobEntry, JobId};
use crate::config::JobConfig;
use crate::error::Error;

/// What a [`NodeHandle`](crate::NodeHandle) asks of its node.
#[derive(Debug)]
pub enum NodeCommand {
    /// Submit a job (validated by the caller); the reply is its id once a majority holds it.
    Submit {
        /// The job.
        spec: Box<JobConfig>,
        /// The answer.
        reply: oneshot::Sender<Result<JobId, Error>>,
    },
    /// Cancel a job.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// The registry as this node holds it.
    Jobs {
        /// The answer.
        reply: oneshot::Sender<Vec<JobEntry>>,
    },
    /// The node's view of the cluster (answered by the node loop, which holds the view).
    Status {
        /// The answer.
        reply: oneshot::Sender<ClusterStatus>,
    },
}

/// What `phalanx status` shows: one node's view of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: u32,
    /// The configured members (ids `0..members`).
    pub configured: u32,
    /// The adopted view's epoch, if a view was adopted.
    pub epoch: Option<u64>,
    /// The coordinator of that view.
    pub coordinator: Option<u32>,
    /// Members of the view, with the addresses this node reaches them at.
    pub members: Vec<MemberStatus>,
}

/// One member in a [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The node id.
    pub id: u32,
    /// Its UDP address (this node's own, or the one it has a connection to).
    pub addr: Option<SocketAddr>,
}
