//! roost's integration-test harness: real brokers, real Git repositories served by
//! `git daemon`, real SQLite files, restartable stores, and a cloud-side observer.

pub mod brokers;
pub mod fixtures;
pub mod harness;
pub mod https_git;
pub mod kube_api;
pub mod postgres;
pub mod proxy;
pub mod receiver;
