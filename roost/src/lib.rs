//! The `roost` command line as a library: embedded brokers, cloud-side commands (keys,
//! rollouts, fleet status, events) and `roost up`, the whole fleet on one machine.

pub mod api;
pub mod bench;
pub mod broker;
pub mod cloud;
pub mod fleet;
pub mod fleet_metrics;
pub mod gitops;
pub mod gitserve;
pub mod process;
pub mod rollout_wait;
pub mod sim;
pub mod sim_controller;
pub mod up;
pub mod up_view;
pub mod view;

/// Installs the process-wide rustls crypto provider (ring) once. rumqttc and kube both use
/// rustls; without an explicit provider, building a client can panic.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
