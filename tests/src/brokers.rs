//! Real cloud brokers for the cloud tier's tests: a 3-node nats-server cluster with MQTT on
//! every node, and mosquitto with persistence, as child processes that can be SIGKILLed and
//! started again on the same ports and files; and the fleet record on several addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::fixtures::free_addr;
use crate::harness::{Component, FleetService};

/// SIGKILLs a child process (no clean shutdown) and reaps it.
fn sigkill(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One node of a [`NatsCluster`]: a `nats-server` child process with MQTT on loopback.
pub struct NatsNode {
    /// The node's name (`server_name`).
    pub name: String,
    /// Its MQTT listener.
    pub mqtt: SocketAddr,
    conf: PathBuf,
    log: PathBuf,
    bin: String,
    child: Option<std::process::Child>,
}

impl NatsNode {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log");
        let child = std::process::Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("nats-server");
        self.child = Some(child);
        roost_broker::wait_listening(self.mqtt, Duration::from_secs(20))
            .expect("nats-server MQTT listening");
    }

    /// SIGKILLs the node (no clean shutdown: its clients' wills are not published).
    pub fn kill(&mut self) {
        sigkill(&mut self.child);
    }

    /// Whether the node runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-node NATS cluster (Debian's nats-server 2.9) as the cloud MQTT broker: each node with
/// its `server_name`, JetStream in its own store directory, `cluster.routes` listing all three
/// nodes, and MQTT on a loopback port with `stream_replicas: 3` (with the documented
/// example's routes the MQTT streams get 2 replicas, and losing either node stalls them).
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Writes the three configurations under `dir` and starts the nodes; returns once every
    /// node accepts a QoS 1 subscription (JetStream has a leader and the MQTT streams exist).
    pub async fn start(bin: &str, dir: &Path) -> NatsCluster {
        let routes: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
        let route_list = routes
            .iter()
            .map(|a| format!("nats-route://{a}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let ndir = dir.join(&name);
            std::fs::create_dir_all(ndir.join("js")).expect("nats dir");
            let mqtt = free_addr();
            let conf = ndir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:-1\n\
                     jetstream {{ store_dir: \"{js}\" }}\n\
                     cluster {{\n  name: roost-test\n  listen: {route}\n  routes: [{route_list}]\n}}\n\
                     mqtt {{\n  listen: {mqtt}\n  stream_replicas: 3\n}}\n",
                    js = ndir.join("js").display(),
                ),
            )
            .expect("nats conf");
            nodes.push(NatsNode {
                name,
                mqtt,
                conf,
                log: ndir.join("nats.log"),
                bin: bin.to_owned(),
                child: None,
            });
        }
        for n in &mut nodes {
            n.spawn();
        }
        let c = NatsCluster { nodes };
        for i in 0..3 {
            c.wait_ready(i, Duration::from_secs(60)).await;
        }
        c
    }

    /// The MQTT addresses, `HOST:PORT,…`, starting with node `first` (a client's order).
    pub fn addrs_from(&self, first: usize) -> Vec<String> {
        (0..self.nodes.len())
            .map(|k| self.nodes[(first + k) % self.nodes.len()].mqtt.to_string())
            .collect()
    }

    /// Starts node `i` again (same configuration and JetStream directory) and waits until it
    /// accepts a QoS 1 subscription.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].spawn();
        self.wait_ready(i, Duration::from_secs(90)).await;
    }

    /// Waits until node `i` answers a QoS 1 SUBSCRIBE with success (a positive marker: the
    /// MQTT streams have a leader).
    pub async fn wait_ready(&self, i: usize, timeout: Duration) {
        let addr = self.nodes[i].mqtt;
        let deadline = Instant::now() + timeout;
        loop {
            if suback_ok(addr).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "NATS node {} did not accept a QoS 1 subscription in {timeout:?}:\n{}",
                self.nodes[i].name,
                self.nodes[i].log_text()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Whether `addr` accepts a connection and a QoS 1 subscription (SUBACK without failure)
/// within 5 s.
pub async fn suback_ok(addr: SocketAddr) -> bool {
    let mut o = MqttOptions::new(
        format!("roost-probe-{:08x}", rand::random::<u32>()),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(o, 10);
    let ok = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if client
                        .subscribe("roost/v1/probe", QoS::AtLeastOnce)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    return !roost_runtime::suback_refused(&a)
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = client.try_disconnect();
    ok
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
