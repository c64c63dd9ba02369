//! A 3-node NATS cluster (Debian's nats-server 2.9) as the cloud MQTT broker, as child
//! processes on loopback: the one launcher of `roost sim --cloud-tier --cloud-broker nats`
//! and of the cloud tier's tests (`tests/src/brokers.rs` re-exports it). Each node has its
//! `server_name`, JetStream in its own store directory, `cluster.routes` listing all three
//! nodes, and MQTT on a loopback port with `stream_replicas: 3` (with the documented
//! example's routes the MQTT streams get 2 replicas, and losing either node stalls them).
//! A node can be SIGKILLed and started again on the same ports and files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::up::{setup, UpError};

/// The most QoS 1 subscriptions one MQTT session of nats-server 2.9 holds: each is a
/// JetStream consumer with `max_ack_pending` (default 1,024) and a session's total may not
/// pass 65,535; the 64th filter of a SUBSCRIBE gets the failure code, with nothing in the
/// server's log. A store's agent or bridge has three or four; a lower `max_ack_pending`
/// raises the count.
pub const MAX_QOS1_SUBSCRIPTIONS: usize = 63;

/// What a cluster's configuration adds to the shape every node shares (the tests run the
/// defaults; `roost sim --cloud-tier` runs [`NatsTuning::fleet_scale`]).
#[derive(Debug, Clone, Default)]
pub struct NatsTuning {
    /// Lines added to each node's `mqtt { }` block.
    pub mqtt: Vec<String>,
    /// Lines added at the top level of each node's configuration.
    pub top: Vec<String>,
}

impl NatsTuning {
    /// The settings of a cloud broker for thousands of stores (why each:
    /// broker-config/README.md, "NATS at fleet scale").
    pub fn fleet_scale() -> NatsTuning {
        NatsTuning {
            mqtt: vec![
                // A QoS 1 subscription is a JetStream consumer: by default one replicated
                // (R3, a Raft group of its own) and file-backed per subscription; a store
                // has two or three. One replica in memory: the session re-creates its
                // consumers when its client reconnects (to any node).
                "consumer_replicas: 1".into(),
                "consumer_memory_storage: true".into(),
            ],
            top: Vec::new(),
        }
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
    bin: PathBuf,
    child: Option<std::process::Child>,
}

impl NatsNode {
    fn spawn(&mut self) -> Result<(), UpError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(setup("nats-server log"))?;
        let child = std::process::Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(setup("nats-server log"))?)
            .stderr(log)
            .spawn()
            .map_err(setup("nats-server (is it installed?)"))?;
        self.child = Some(child);
        roost_broker::wait_listening(self.mqtt, Duration::from_secs(20))
            .map_err(setup("nats-server MQTT listening"))
    }

    /// SIGKILLs the node (no clean shutdown: its clients' wills are not published).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the node runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

/// A 3-node NATS cluster as the cloud MQTT broker.
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsNode>,
}

/// A free loopback address.
fn free_addr() -> Result<SocketAddr, UpError> {
    Ok((
        [127, 0, 0, 1],
        roost_broker::free_port().map_err(setup("port"))?,
    )
        .into())
}

impl NatsCluster {
    /// Writes the three configurations under `dir` and starts the nodes; returns once every
    /// node accepts a QoS 1 subscription (JetStream has a leader and the MQTT streams exist).
    pub async fn start(bin: &Path, dir: &Path) -> Result<NatsCluster, UpError> {
        Self::start_tuned(bin, dir, &NatsTuning::default()).await
    }

    /// [`NatsCluster::start`] with `tuning` added to every node's configuration.
    pub async fn start_tuned(
        bin: &Path,
        dir: &Path,
        tuning: &NatsTuning,
    ) -> Result<NatsCluster, UpError> {
        let routes = (0..3).map(|_| free_addr()).collect::<Result<Vec<_>, _>>()?;
        let route_list = routes
            .iter()
            .map(|a| format!("nats-route://{a}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let ndir = dir.join(&name);
            std::fs::create_dir_all(ndir.join("js")).map_err(setup("nats dir"))?;
            let mqtt = free_addr()?;
            let conf = ndir.join("nats.conf");
            let indent =
                |lines: &[String]| lines.iter().map(|l| format!("  {l}\n")).collect::<String>();
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:-1\n{top}\
                     jetstream {{ store_dir: \"{js}\" }}\n\
                     cluster {{\n  name: roost-test\n  listen: {route}\n  routes: [{route_list}]\n}}\n\
                     mqtt {{\n  listen: {mqtt}\n  stream_replicas: 3\n{extra}}}\n",
                    js = ndir.join("js").display(),
                    top = tuning
                        .top
                        .iter()
                        .map(|l| format!("{l}\n"))
                        .collect::<String>(),
                    extra = indent(&tuning.mqtt),
                ),
            )
            .map_err(setup("nats conf"))?;
            nodes.push(NatsNode {
                name,
                mqtt,
                conf,
                log: ndir.join("nats.log"),
                bin: bin.to_owned(),
                child: None,
            });
        }
        let mut c = NatsCluster { nodes };
        for n in &mut c.nodes {
            n.spawn()?;
        }
        for i in 0..3 {
            c.wait_ready(i, Duration::from_secs(60)).await?;
        }
        Ok(c)
    }

    /// The MQTT addresses starting with node `first` (a client's order).
    pub fn addrs_from(&self, first: usize) -> Vec<String> {
        (0..self.nodes.len())
            .map(|k| self.nodes[(first + k) % self.nodes.len()].mqtt.to_string())
            .collect()
    }

    /// Starts node `i` again (same configuration and JetStream directory) and waits until it
    /// accepts a QoS 1 subscription.
    pub async fn restart(&mut self, i: usize) -> Result<(), UpError> {
        self.nodes[i].spawn()?;
        self.wait_ready(i, Duration::from_secs(90)).await
    }

    /// Waits until node `i` answers a QoS 1 SUBSCRIBE with success (a positive marker: the
    /// MQTT streams have a leader); the error carries the node's log.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> Result<(), UpError> {
        let addr = self.nodes[i].mqtt;
        let deadline = Instant::now() + timeout;
        loop {
            if suback_ok(addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(UpError::Timeout(
                    timeout,
                    format!(
                        "NATS node {} did not accept a QoS 1 subscription:\n{}",
                        self.nodes[i].name,
                        self.nodes[i].log_text()
                    ),
                ));
            }
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

/// The nats-server binary: `/usr/sbin/nats-server` (Debian's package) or `nats-server` on
/// the PATH.
pub fn default_bin() -> PathBuf {
    let debian = Path::new("/usr/sbin/nats-server");
    if debian.exists() {
        debian.to_owned()
    } else {
        PathBuf::from("nats-server")
    }
}
