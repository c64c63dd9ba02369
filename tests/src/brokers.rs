//! Real cloud brokers for the cloud tier's tests: mosquitto with persistence, as a child
//! process that can be SIGKILLed and started again on the same port and files; and the fleet
//! record on several addresses. The 3-node nats-server cluster is `roost_sim::nats` (the
//! launcher `roost sim --cloud-tier --cloud-broker nats` runs too).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fixtures::free_addr;
use crate::harness::{Component, FleetService};

/// SIGKILLs a child process (no clean shutdown) and reaps it.
fn sigkill(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// mosquitto as a cloud broker with persistence (`autosave_interval` seconds between saves),
/// as a child process that can be SIGKILLed and started again on the same port and files.
pub struct MosquittoCloud {
    /// Its listener.
    pub addr: SocketAddr,
    conf: PathBuf,
    bin: String,
    child: Option<std::process::Child>,
}

impl MosquittoCloud {
    /// Writes the configuration under `dir` and starts mosquitto.
    pub fn start(bin: &str, dir: &Path, autosave_interval_s: u64) -> MosquittoCloud {
        std::fs::create_dir_all(dir).expect("mosquitto dir");
        let addr = free_addr();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {dir}/\nautosave_interval {autosave_interval_s}\n\
                 max_queued_messages 0\nmax_inflight_messages 0\n",
                port = addr.port(),
                dir = dir.display()
            ),
        )
        .expect("mosquitto conf");
        let mut m = MosquittoCloud {
            addr,
            conf,
            bin: bin.to_owned(),
            child: None,
        };
        m.restart();
        m
    }

    /// SIGKILLs it: what it acknowledged since its last autosave is gone.
    pub fn kill(&mut self) {
        sigkill(&mut self.child);
    }

    /// Starts it (again) and waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(crate::fixtures::spawn_mosquitto(
            &self.bin, &self.conf, self.addr,
        ));
    }
}

impl Drop for MosquittoCloud {
    fn drop(&mut self) {
        self.kill();
    }
}

impl FleetService {
    /// Starts recording everything on a cloud broker given by several addresses (a
    /// cluster's nodes, tried in turn), with the broker audit every `audit_interval`.
    pub fn start_on(addrs: &[SocketAddr], path: &Path, audit_interval: Duration) -> FleetService {
        let db = roost_fleet::db::FleetDb::open(path).expect("fleet db");
        let mut opts = roost_fleet::record::FleetOptions::new(
            &addrs[0].ip().to_string(),
            addrs[0].port(),
            path.to_owned(),
            &format!("roost-fleet-{:08x}", rand::random::<u32>()),
        );
        opts.fallbacks = addrs[1..]
            .iter()
            .map(|a| roost_runtime::BrokerAddr {
                host: a.ip().to_string(),
                port: a.port(),
            })
            .collect();
        opts.audit_interval = audit_interval;
        let db2 = db.clone();
        let component = Component::spawn("fleet service", move |c| {
            roost_fleet::record::run(opts, db2, c)
        });
        FleetService {
            db,
            component: Some(component),
        }
    }
}
