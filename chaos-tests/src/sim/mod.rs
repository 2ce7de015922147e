//! Deterministic simulation of a job's protocol cores under faults.

mod jobs;
mod world;

pub use jobs::{campaign_jobs, SimJob};

pub use world::{simulate, SimOptions, SimOutcome, SimStats};
