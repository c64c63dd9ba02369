//! Cloud-side commands: key generation, signing and publishing rollouts, reading the fleet's
//! retained status, and following the event stream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{
    Envelope, Origin, Policy, Presence, Rollout, Scope, SigningKey, Source, StatusDoc, Topics,
    PAYLOAD_TYPE,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// Errors of the cloud-side commands.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// Key files.
    #[error("key {path}: {message}")]
    Key {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// MQTT.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// Git (resolving a branch).
    #[error("git: {0}")]
    Git(String),
    /// Timed out.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// A broker address `host:port`.
pub fn parse_broker(s: &str) -> Result<(String, u16), CloudError> {
    let s = s.strip_prefix("mqtt://").unwrap_or(s);
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| CloudError::Usage(format!("broker address {s:?} must be HOST:PORT")))?;
    let port = p
        .parse()
        .map_err(|_| CloudError::Usage(format!("broker port {p:?} is not a number")))?;
    Ok((h.to_owned(), port))
}

/// Connects a short-lived client; the caller polls the event loop.
pub fn connect(broker: &str, client_prefix: &str) -> Result<(AsyncClient, EventLoop), CloudError> {
    let (host, port) = parse_broker(broker)?;
    let id = format!("{client_prefix}-{}", uuid_like());
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    Ok(AsyncClient::new(o, 1024))
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Writes a new key pair to `dir`: `KEYID.key` (base64 PKCS#8, mode 0600) and `KEYID.pub`
/// (base64 raw public key). Returns (key id, public key base64).
pub fn keygen(dir: &Path) -> Result<(String, String), CloudError> {
    let key = SigningKey::generate().map_err(|e| CloudError::Key {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let id = key.key_id();
    std::fs::create_dir_all(dir).map_err(|e| CloudError::Key {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let priv_path = dir.join(format!("{id}.key"));
    let pkcs8 = key.pkcs8().ok_or_else(|| CloudError::Key {
        path: priv_path.clone(),
        message: "generated key has no PKCS#8 form".into(),
    })?;
    let write = |p: &Path, data: String| {
        std::fs::write(p, data).map_err(|e| CloudError::Key {
            path: p.to_owned(),
            message: e.to_string(),
        })
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
    let err = |m: String| CloudError::Key {
        path: path.to_owned(),
        message: m,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let der = B64
        .decode(text.trim())
        .map_err(|e| err(format!("not base64: {e}")))?;
    SigningKey::from_pkcs8(&der).map_err(|e| err(e.to_string()))
}

/// Resolves a branch, tag or full sha to a commit id via the remote (git2 ls-remote).
pub fn resolve_revision(url: &str, rev: &str) -> Result<String, CloudError> {
    if roost_schemas::rollout::is_full_sha(rev) {
        return Ok(rev.to_owned());
    }
    let mut remote =
        git2::Remote::create_detached(url).map_err(|e| CloudError::Git(e.message().to_owned()))?;
    remote
        .connect(git2::Direction::Fetch)
        .map_err(|e| CloudError::Git(format!("{url}: {}", e.message())))?;
    let heads = remote
        .list()
        .map_err(|e| CloudError::Git(e.message().to_owned()))?;
    let wanted = [
        rev.to_owned(),
        format!("refs/heads/{rev}"),
        format!("refs/tags/{rev}^{{}}"),
        format!("refs/tags/{rev}"),
    ];
    for w in &wanted {
        if let Some(h) = heads.iter().find(|h| h.name() == w) {
            return Ok(h.oid().to_string());
        }
    }
    Err(CloudError::Git(format!(
        "{rev} is not a branch, tag or full commit id in {url}"
    )))
}

/// Everything needed to build a rollout.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// Deployment.
    pub deployment: String,
    /// Scope.
    pub scope: Scope,
    /// Repository URL.
    pub url: String,
    /// Commit id.
    pub revision: String,
    /// Path.
    pub path: String,
    /// Policy.
    pub policy: Policy,
    /// Activation time.
    pub not_before: Option<String>,
    /// Tombstone.
    pub remove: bool,
    /// Sequence (None = current retained + 1).
    pub sequence: Option<u64>,
    /// The fleet-repository commit that caused this rollout (v1.1), if any.
    pub origin: Option<Origin>,
}

/// Builds a rollout and signs it with every key (one signature each, so an agent's
/// `[thresholds]` can be met).
pub fn sign_rollout(
    keys: &[SigningKey],
    spec: &RolloutSpec,
    sequence: u64,
) -> Result<(Rollout, Envelope), CloudError> {
    let rollout = Rollout {
        deployment: spec.deployment.clone(),
        scope: spec.scope.clone(),
        sequence,
        issued_at: roost_schemas::now_rfc3339(),
        // A tombstone needs no source; one given without a revision is dropped.
        source: if spec.remove && (spec.url.is_empty() || spec.revision.is_empty()) {
            None
        } else {
            Some(Source {
                url: spec.url.clone(),
                revision: spec.revision.clone(),
                path: spec.path.clone(),
            })
        },
        not_before: spec.not_before.clone(),
        policy: spec.policy.clone(),
        remove: spec.remove,
        origin: spec.origin.clone(),
    };
    rollout
        .validate()
        .map_err(|e| CloudError::Usage(e.to_string()))?;
    let body = serde_json::to_vec(&rollout).map_err(|e| CloudError::Usage(e.to_string()))?;
    let env = roost_schemas::sign_all(keys, PAYLOAD_TYPE, &body)
        .ok_or_else(|| CloudError::Usage("at least one signing key is required".into()))?;
    Ok((rollout.clone(), env))
}

/// Reads the retained messages matching `filters` for up to `wait` (stops early after a
/// quiet period once something arrived, or right after SUBACK + quiet when nothing is retained).
pub async fn read_retained(
    broker: &str,
    filters: &[String],
    wait: Duration,
) -> Result<Vec<(String, Vec<u8>)>, CloudError> {
    let (client, mut ev) = connect(broker, "roost-read")?;
    for f in filters {
        client
            .subscribe(f.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| CloudError::Mqtt(e.to_string()))?;
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
            Ok(Err(e)) => return Err(CloudError::Mqtt(e.to_string())),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
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
    broker: &str,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), CloudError> {
    let (client, mut ev) = connect(broker, "roost-pub")?;
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .map_err(|e| CloudError::Mqtt(e.to_string()))?;
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(CloudError::Mqtt(e.to_string())),
            }
        }
    })
    .await
    .map_err(|_| CloudError::Timeout("no PUBACK from the broker".into()))?;
    let _ = client.disconnect().await;
    res
}

/// Signs (with every key) and publishes a rollout; the sequence defaults to the retained
/// one + 1.
pub async fn rollout(
    broker: &str,
    topics: &Topics,
    keys: &[SigningKey],
    spec: &RolloutSpec,
) -> Result<Rollout, CloudError> {
    let topic = topics.deployment(&spec.scope, &spec.deployment);
    let sequence = match spec.sequence {
        Some(s) => s,
        None => {
            let cur =
                read_retained(broker, std::slice::from_ref(&topic), Duration::from_secs(2)).await?;
            let last = cur
                .iter()
                .filter_map(|(_, p)| serde_json::from_slice::<Envelope>(p).ok())
                .filter_map(|e| B64.decode(e.payload).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter_map(|v| v.get("sequence").and_then(|s| s.as_u64()))
                .max()
                .unwrap_or(0);
            last + 1
        }
    };
    let (rollout, env) = sign_rollout(keys, spec, sequence)?;
    let bytes = serde_json::to_vec(&env).map_err(|e| CloudError::Usage(e.to_string()))?;
    publish_retained(broker, &topic, bytes).await?;
    Ok(rollout)
}

/// One row of the fleet table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetRow {
    /// Store.
    pub store: String,
    /// Deployment ("-" when none).
    pub deployment: String,
    /// Desired revision (short).
    pub desired: String,
    /// Applied revision (short).
    pub applied: String,
    /// Phase.
    pub phase: String,
    /// Drift.
    pub drift: bool,
    /// Presence and since when.
    pub presence: String,
    /// Last status update.
    pub last_seen: String,
    /// Message.
    pub message: String,
}

/// Builds the fleet table from retained status and presence messages.
pub fn fleet_rows(topics: &Topics, msgs: &[(String, Vec<u8>)]) -> Vec<FleetRow> {
    let mut status: BTreeMap<String, StatusDoc> = BTreeMap::new();
    let mut presence: BTreeMap<String, Presence> = BTreeMap::new();
    for (t, p) in msgs {
        match topics.parse_store_topic(t) {
            Some((s, StoreTopicKind::Status)) => {
                if let Ok(d) = serde_json::from_slice(p) {
                    status.insert(s, d);
                }
            }
            Some((s, StoreTopicKind::Presence)) => {
                if let Ok(d) = serde_json::from_slice(p) {
                    presence.insert(s, d);
                }
            }
            _ => {}
        }
    }
    let short = |s: Option<&String>| {
        s.map(|r| r.chars().take(12).collect())
            .unwrap_or_else(|| "-".to_string())
    };
    let mut stores: Vec<String> = status.keys().chain(presence.keys()).cloned().collect();
    stores.sort();
    stores.dedup();
    let mut rows = Vec::new();
    for s in stores {
        let pres = presence
            .get(&s)
            .map(|p| {
                format!(
                    "{} since {}",
                    serde_json::to_value(p.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    p.since
                )
            })
            .unwrap_or_else(|| "unknown".into());
        match status.get(&s) {
            Some(doc) if !doc.deployments.is_empty() => {
                for (d, st) in &doc.deployments {
                    rows.push(FleetRow {
                        store: s.clone(),
                        deployment: d.clone(),
                        desired: short(st.desired.as_ref().map(|x| &x.revision)),
                        applied: short(st.applied_revision.as_ref()),
                        phase: st.phase.as_str().into(),
                        drift: st.drift,
                        presence: pres.clone(),
                        last_seen: doc.updated_at.clone(),
                        message: st.message.clone(),
                    });
                }
            }
            other => rows.push(FleetRow {
                store: s.clone(),
                deployment: "-".into(),
                desired: "-".into(),
                applied: "-".into(),
                phase: "-".into(),
                drift: false,
                presence: pres,
                last_seen: other
                    .map(|d| d.updated_at.clone())
                    .unwrap_or_else(|| "-".into()),
                message: String::new(),
            }),
        }
    }
    rows
}

/// Renders the fleet table as text.
pub fn render_table(rows: &[FleetRow]) -> String {
    let header = [
        "STORE",
        "DEPLOYMENT",
        "DESIRED",
        "APPLIED",
        "PHASE",
        "DRIFT",
        "PRESENCE",
        "LAST SEEN",
        "MESSAGE",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.store.clone(),
                r.deployment.clone(),
                r.desired.clone(),
                r.applied.clone(),
                r.phase.clone(),
                if r.drift { "yes".into() } else { "no".into() },
                r.presence.clone(),
                r.last_seen.clone(),
                r.message.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.len());
        }
    }
    let line = |vals: Vec<&str>| {
        vals.iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for c in &cells {
        out.push_str(&line(c.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
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
        assert!(parse_broker("h").is_err());
    }

    #[test]
    fn keygen_roundtrip_and_table() {
        let dir = tempfile::tempdir().expect("tmp");
        let (id, _pub) = keygen(dir.path()).expect("keygen");
        let key = load_key(&dir.path().join(format!("{id}.key"))).expect("load");
        assert_eq!(key.key_id(), id);
        let topics = Topics::default();
        let doc = serde_json::json!({"store":"s1","agent_version":"0","updated_at":"t","roostseq":3,"outbox_backlog":0,
            "deployments":{"web":{"desired":{"revision":"a".repeat(40),"sequence":1,"scope":"fleet"},"applied_revision":"a".repeat(40),"phase":"Converged","drift":false}}});
        let rows = fleet_rows(
            &topics,
            &[(topics.status("s1"), serde_json::to_vec(&doc).expect("json"))],
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].phase, "Converged");
        let table = render_table(&rows);
        assert!(table.starts_with("STORE"));
        assert!(table.contains("aaaaaaaaaaaa"));
    }
}
