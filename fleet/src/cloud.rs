//! Cloud-side commands: key generation, publishing rollouts (signed by [`crate::sign`]),
//! reading the fleet's retained status, and following the event stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use roost_runtime::{next_address, suback_refused, BrokerAddr, Security};
use roost_schemas::{Rollout, SigningKey, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

pub use crate::rollout_wait::{
    wait_for_rollout, RolloutWatch, StoreOutcome, StoreState, WaitReport, WaitTarget,
};
pub use crate::sign::{sign_rollout, RolloutSpec, Signed};

/// Errors of the cloud-side commands.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The broker's TLS files or credentials are not usable.
    #[error(transparent)]
    Security(#[from] roost_runtime::SecurityError),
    /// A key file could not be written or read, or holds no key.
    #[error("key {path}")]
    Key {
        /// File (or the directory keys are written to).
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: KeyFileError,
    },
    /// The connection to a broker failed.
    #[error("mqtt: {broker}{}", .problem.as_deref().map(|p| format!(": {p}")).unwrap_or_default())]
    Connection {
        /// `HOST:PORT`.
        broker: String,
        /// What it means, where it is a TLS or authorization problem.
        problem: Option<String>,
        /// The connection's error.
        #[source]
        source: Box<rumqttc::ConnectionError>,
    },
    /// The MQTT client did not take a request (its event loop is gone).
    #[error("mqtt: {what}")]
    Client {
        /// The request (`subscribe`, `publish`).
        what: &'static str,
        /// The client's error.
        #[source]
        source: Box<rumqttc::ClientError>,
    },
    /// The broker refused a subscription (a cluster moving a stream leader): a failed
    /// connection, tried again.
    #[error("mqtt: {broker} refused the subscription")]
    Refused {
        /// `HOST:PORT`.
        broker: String,
    },
    /// The task that owned the connection ended.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// Timed out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The rollout could not be signed.
    #[error("signing the rollout")]
    Sign(#[from] crate::sign::SignError),
}

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing it.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// It is not base64.
    #[error("not base64")]
    Base64(#[from] base64::DecodeError),
    /// It is not an Ed25519 key, or no key could be generated.
    #[error(transparent)]
    Key(#[from] roost_schemas::dsse::KeyError),
    /// A generated key came without its PKCS#8 form.
    #[error("generated key has no PKCS#8 form")]
    NoPkcs8,
}

impl CloudError {
    fn client(what: &'static str) -> impl Fn(rumqttc::ClientError) -> CloudError {
        move |source| CloudError::Client {
            what,
            source: Box::new(source),
        }
    }
}

/// A broker address `HOST:PORT`, `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (host and port).
pub fn parse_broker(s: &str) -> Result<(String, u16), CloudError> {
    let s = s
        .strip_prefix("mqtts://")
        .or_else(|| s.strip_prefix("mqtt://"))
        .unwrap_or(s);
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| CloudError::Usage(format!("broker address {s:?} must be HOST:PORT")))?;
    let port = p
        .parse()
        .map_err(|_| CloudError::Usage(format!("broker port {p:?} is not a number")))?;
    Ok((h.to_owned(), port))
}

/// A broker to connect to: its address (and a cluster's other nodes, tried in turn) and the
/// connection's transport security.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    /// Host (for TLS: the name or address in the broker's certificate).
    pub host: String,
    /// Port.
    pub port: u16,
    /// More addresses, tried in order after `host`:`port` when a connection fails.
    pub fallbacks: Vec<BrokerAddr>,
    /// TLS and credentials.
    pub security: Security,
}

impl BrokerTarget {
    /// Parses `HOST:PORT`, `mqtt://HOST:PORT` or `mqtts://HOST:PORT` with the security of
    /// the command line (`--tls-ca`, …), and checks its files. `mqtts://` without a CA file
    /// trusts the system's store; TLS flags with a bare `HOST:PORT` mean TLS too.
    /// Several addresses, comma-separated (`h1:1883,h2:1883`), are one cluster: the same
    /// scheme and security for each.
    pub fn parse(addr: &str, mut security: Security) -> Result<BrokerTarget, CloudError> {
        let mut list = BrokerAddr::parse_list(addr)
            .map_err(CloudError::Usage)?
            .into_iter();
        let first = list
            .next()
            .ok_or_else(|| CloudError::Usage("no broker address".into()))?;
        let fallbacks: Vec<BrokerAddr> = list.collect();
        let (host, port) = (first.host, first.port);
        let addr = addr.trim();
        if addr.starts_with("mqtts://") && security.tls.is_none() {
            security.tls = Some(roost_runtime::TlsFiles::default());
        }
        if addr.starts_with("mqtt://") && security.tls.is_some() {
            return Err(CloudError::Usage(format!(
                "{addr} is plain MQTT, but TLS files were given: use mqtts://{host}:{port}"
            )));
        }
        security.validate()?;
        Ok(BrokerTarget {
            host,
            port,
            fallbacks,
            security,
        })
    }

    /// Every address, in the order tried.
    pub fn addresses(&self) -> Vec<BrokerAddr> {
        BrokerAddr::with_fallbacks(&self.host, self.port, &self.fallbacks)
    }

    /// The error of a failed connection, explained where it is a TLS or auth problem.
    pub fn error(&self, e: rumqttc::ConnectionError) -> CloudError {
        CloudError::Connection {
            broker: self
                .addresses()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            problem: self.security.diagnose(&e),
            source: Box::new(e),
        }
    }
}

/// Something that names a broker: an address (plain MQTT unless `mqtts://`) or a
/// [`BrokerTarget`] with its TLS and credentials.
pub trait ToBroker {
    /// The broker to connect to.
    fn to_broker(&self) -> Result<BrokerTarget, CloudError>;
}

impl ToBroker for str {
    fn to_broker(&self) -> Result<BrokerTarget, CloudError> {
        BrokerTarget::parse(self, Security::default())
    }
}

impl ToBroker for String {
    fn to_broker(&self) -> Result<BrokerTarget, CloudError> {
        self.as_str().to_broker()
    }
}

impl ToBroker for BrokerTarget {
    fn to_broker(&self) -> Result<BrokerTarget, CloudError> {
        Ok(self.clone())
    }
}

/// Connects a short-lived client to the target's first address; the caller polls the event
/// loop (and moves to the next address with [`BrokerTarget::options`] when it fails).
pub fn connect(
    broker: &(impl ToBroker + ?Sized),
    client_prefix: &str,
) -> Result<(AsyncClient, EventLoop), CloudError> {
    let target = broker.to_broker()?;
    let id = format!("{client_prefix}-{}", uuid_like());
    let o = target.options(&id, 0)?;
    Ok(AsyncClient::new(o, 1024))
}

/// How long a short-lived command keeps trying a target's addresses in turn (with the link's
/// backoff) before it gives up: longer than a cluster needs to move a stream leader.
pub const FAILOVER_FOR: Duration = Duration::from_secs(45);

impl BrokerTarget {
    /// The client options for address number `at` (modulo the number of addresses).
    pub fn options(&self, id: &str, at: usize) -> Result<MqttOptions, CloudError> {
        let all = self.addresses();
        let a = &all[at % all.len()];
        let mut o = MqttOptions::new(id, a.host.clone(), a.port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        self.security.apply(&mut o)?;
        Ok(o)
    }

    /// The target reduced to address number `at`.
    pub fn only(&self, at: usize) -> BrokerTarget {
        let all = self.addresses();
        let a = all[at % all.len()].clone();
        BrokerTarget {
            host: a.host,
            port: a.port,
            fallbacks: Vec::new(),
            security: self.security.clone(),
        }
    }
}

/// Whether a failed short-lived operation is worth trying at another address: the
/// connection failed (not for a TLS or authorization problem, which another node shares),
/// the broker did not answer in time, or it refused a subscription.
pub fn worth_retrying(e: &CloudError) -> bool {
    match e {
        CloudError::Connection { problem, .. } => problem.is_none(),
        CloudError::Refused { .. } | CloudError::Timeout(_) | CloudError::Mqtt(_) => true,
        _ => false,
    }
}

/// Runs `op` against one address of `target` at a time: with several addresses, a failure
/// worth retrying ([`worth_retrying`]) moves to the next address after the link's backoff,
/// for up to [`FAILOVER_FOR`]; with one, the first failure is the answer (as before).
pub async fn with_failover<T, F, Fut>(target: &BrokerTarget, mut op: F) -> Result<T, CloudError>
where
    F: FnMut(BrokerTarget) -> Fut,
    Fut: std::future::Future<Output = Result<T, CloudError>>,
{
    let count = target.addresses().len();
    let deadline = tokio::time::Instant::now() + FAILOVER_FOR;
    let mut backoff =
        roost_runtime::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut at = 0usize;
    loop {
        match op(target.only(at)).await {
            Ok(v) => return Ok(v),
            Err(e) if count > 1 && worth_retrying(&e) => {
                let delay = backoff.next_delay();
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(e);
                }
                at = next_address(at, count);
                tracing::warn!(error = %roost_runtime::error_chain(&e), next = %target.only(at).addresses()[0], retry_in_ms = delay.as_millis() as u64, "broker failed; trying the next address");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Writes a new key pair to `dir`: `KEYID.key` (base64 PKCS#8, mode 0600) and `KEYID.pub`
/// (base64 raw public key). Returns (key id, public key base64).
pub fn keygen(dir: &Path) -> Result<(String, String), CloudError> {
    let at = |path: &Path| {
        let path = path.to_owned();
        move |e: KeyFileError| CloudError::Key { path, source: e }
    };
    let key = SigningKey::generate()
        .map_err(KeyFileError::from)
        .map_err(at(dir))?;
    let id = key.key_id();
    std::fs::create_dir_all(dir)
        .map_err(KeyFileError::from)
        .map_err(at(dir))?;
    let priv_path = dir.join(format!("{id}.key"));
    let pkcs8 = key
        .pkcs8()
        .ok_or(KeyFileError::NoPkcs8)
        .map_err(at(&priv_path))?;
    let write = |p: &Path, data: String| {
        std::fs::write(p, data)
            .map_err(KeyFileError::from)
            .map_err(at(p))
    };
    write(&priv_path, B64.encode(pkcs8))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o600));
    }
    let pub_b64 = B64.encode(key.public_key());
    write(&dir.join(format!("{id}.pub")), pub_b64.clone())?;
    Ok((id, pub_b64))
}

/// Loads a private key file written by [`keygen`].
pub fn load_key(path: &Path) -> Result<SigningKey, CloudError> {
    let read = || -> Result<SigningKey, KeyFileError> {
        let text = std::fs::read_to_string(path)?;
        Ok(SigningKey::from_pkcs8(&B64.decode(text.trim())?)?)
    };
    read().map_err(|source| CloudError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Reads the retained messages matching `filters` for up to `wait` (stops early after a
/// quiet period once something arrived, or right after SUBACK + quiet when nothing is retained).
pub async fn read_retained(
    broker: &(impl ToBroker + ?Sized),
    filters: &[String],
    wait: Duration,
) -> Result<Vec<(String, Vec<u8>)>, CloudError> {
    let target = broker.to_broker()?;
    with_failover(&target, |one| async move {
        read_retained_from(&one, filters, wait).await
    })
    .await
}

async fn read_retained_from(
    target: &BrokerTarget,
    filters: &[String],
    wait: Duration,
) -> Result<Vec<(String, Vec<u8>)>, CloudError> {
    let (client, mut ev) = connect(target, "roost-read")?;
    for f in filters {
        client
            .subscribe(f.clone(), QoS::AtLeastOnce)
            .await
            .map_err(CloudError::client("subscribe"))?;
    }
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut subacks = 0usize;
    let quiet = Duration::from_millis(300);
    loop {
        let next = if subacks >= filters.len() {
            quiet
        } else {
            wait
        };
        let until = (tokio::time::Instant::now() + next).min(deadline);
        match tokio::time::timeout_at(until, ev.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => return Err(target.error(e)),
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                if suback_refused(&ack) {
                    return Err(CloudError::Refused {
                        broker: format!("{}:{}", target.host, target.port),
                    });
                }
                subacks += 1
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if p.retain {
                    out.push((p.topic.clone(), p.payload.to_vec()));
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(out)
}

/// Publishes one retained QoS 1 message and waits for the PUBACK.
pub async fn publish_retained(
    broker: &(impl ToBroker + ?Sized),
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), CloudError> {
    let target = broker.to_broker()?;
    let payload = &payload;
    with_failover(&target, |one| async move {
        publish_retained_to(&one, topic, payload.clone()).await
    })
    .await
}

async fn publish_retained_to(
    target: &BrokerTarget,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), CloudError> {
    let (client, mut ev) = connect(target, "roost-pub")?;
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .map_err(CloudError::client("publish"))?;
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(target.error(e)),
            }
        }
    })
    .await
    .map_err(|_| CloudError::Timeout("no PUBACK from the broker".into()))?;
    let _ = client.disconnect().await;
    res
}

/// The sequence for the next envelope on `topic` by the contract's rule,
/// `max(retained + 1, milliseconds since the epoch)`: what the broker retains is only a lower
/// bound (a broker that lost its retained messages must not make a new rollout a replay),
/// the clock is what keeps sequences increasing without a record of our own.
pub async fn next_sequence(
    broker: &(impl ToBroker + ?Sized),
    topic: &str,
) -> Result<u64, CloudError> {
    let cur = read_retained(broker, &[topic.to_owned()], Duration::from_secs(2)).await?;
    let retained = cur
        .iter()
        .filter_map(|(_, p)| roost_schemas::envelope_sequence(p))
        .max();
    Ok(roost_schemas::sequence_rule(
        retained.unwrap_or(0),
        crate::db::now_ms(),
    ))
}

/// Signs (with every key) and publishes a rollout; the sequence, unless the spec gives one, follows the
/// contract's rule ([`next_sequence`]).
pub async fn rollout(
    broker: &(impl ToBroker + ?Sized),
    topics: &Topics,
    keys: &[SigningKey],
    spec: &RolloutSpec,
) -> Result<Rollout, CloudError> {
    let broker = broker.to_broker()?;
    let broker = &broker;
    let topic = topics.deployment(&spec.scope, &spec.deployment);
    let sequence = match spec.sequence {
        Some(s) => s,
        None => next_sequence(broker, &topic).await?,
    };
    let signed = sign_rollout(keys, spec, sequence)?;
    publish_retained(broker, &topic, signed.envelope).await?;
    Ok(signed.rollout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        assert_eq!(
            parse_broker("127.0.0.1:1883").expect("ok"),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(parse_broker("mqtt://h:1").expect("ok"), ("h".into(), 1));
        assert_eq!(
            parse_broker("mqtts://h:8883").expect("ok"),
            ("h".into(), 8883)
        );
        assert!(parse_broker("h").is_err());
        let tls = BrokerTarget::parse("mqtts://h:8883", Security::default()).expect("mqtts");
        assert!(tls.security.is_tls(), "mqtts:// means TLS");
        assert!(!"h:1883".to_broker().expect("plain").security.is_tls());
        let missing = Security {
            tls: Some(roost_runtime::TlsFiles {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            }),
            field_prefix: "--".into(),
            ..Security::default()
        };
        let e = BrokerTarget::parse("h:8883", missing.clone()).expect_err("missing CA");
        assert!(
            e.to_string().starts_with("--tls-ca: /nonexistent/ca.pem"),
            "{e}"
        );
        let e = BrokerTarget::parse("mqtt://h:1883", missing).expect_err("plain with TLS");
        assert!(e.to_string().contains("use mqtts://h:1883"), "{e}");
    }

    #[test]
    fn keygen_roundtrip() {
        let dir = tempfile::tempdir().expect("tmp");
        let (id, _pub) = keygen(dir.path()).expect("keygen");
        let key = load_key(&dir.path().join(format!("{id}.key"))).expect("load");
        assert_eq!(key.key_id(), id);
        // What is wrong with a key file is its error's source; the chain says it once.
        let missing = dir.path().join("missing.key");
        let e = load_key(&missing).expect_err("missing");
        assert!(
            matches!(
                &e,
                CloudError::Key {
                    source: KeyFileError::Io(_),
                    ..
                }
            ),
            "{e:?}"
        );
        let chain = roost_runtime::error_chain(&e);
        assert!(
            chain.starts_with(&format!("key {}: ", missing.display())),
            "{chain}"
        );
        let garbage = dir.path().join("garbage.key");
        std::fs::write(&garbage, "not base64!").expect("write");
        let chain = roost_runtime::error_chain(&load_key(&garbage).expect_err("garbage"));
        assert!(chain.contains(": not base64: "), "{chain}");
    }
}
