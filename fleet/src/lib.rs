//! The cloud side of roost: the fleet database and its ingest of status and events, the
//! GitOps controller, the fleet view, the HTTP API and dashboard, rollout signing and
//! waiting, the cloud's Git, and the fleet's Git mirror (`roost git-serve`).

pub mod api;
pub mod cloud;
pub mod db;
pub mod enroll;
pub mod fleet_repo;
pub mod git;
pub mod gitops;
pub mod gitserve;
pub mod inventory;
pub mod judge;
pub mod leadership;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod record;
pub mod rollout_wait;
pub mod seal;
pub mod sign;
pub mod view;
