//! A whole roost fleet on one machine: `roost up` (the demo: embedded brokers, `git daemon`,
//! per store a bridge and an agent, the GitOps controller), `roost sim` (rollout latency for
//! N stores in one process) and the benchmarks behind `roost bench`. Not published.

pub mod bench;
pub mod cloud_tier;
pub mod controller;
pub mod nats;
pub mod process;
pub mod sim;
pub mod up;
pub mod up_view;
pub mod workers;
