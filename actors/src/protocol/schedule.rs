//! The step schedule of a job: how global steps map to epochs.

use serde::{Deserialize, Serialize};

/// How many steps an epoch has and how many epochs the job runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Schedule {
    /// Steps in one epoch (every partition feeds one chunk per step).
    pub steps_per_epoch: u32,
    /// Number of epochs.
    pub epochs: u32,
}

impl Schedule {
    /// Total number of steps of the job.
    pub fn total_steps(&self) -> u64 {
        u64::from(self.steps_per_epoch) * u64::from(self.epochs)
    }

    /// The epoch and step-within-epoch of global step `step`.
    ///
    /// ```
    /// use phalanx_actors::protocol::Schedule;
    /// let s = Schedule { steps_per_epoch: 10, epochs: 3 };
    /// assert_eq!(s.locate(25), (2, 5));
    /// ```
    pub fn locate(&self, step: u64) -> (u32, u32) {
        let per = u64::from(self.steps_per_epoch.max(1));
        ((step / per) as u32, (step % per) as u32)
    }
}
