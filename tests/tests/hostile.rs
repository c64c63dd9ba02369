//! Hostile input, end to end on loopback: a table of malformed, forged, replayed, oversize and
//! malicious messages, sources, repository contents and store profiles, each asserting its
//! exact reason code, that nothing was applied or changed, and that the agent (and bridge)
//! still answer: a good rollout converges after every case. Plus key rotation, `roost rollout` with several keys,
//! credentials that never leak, forged confirmations, and the Kubernetes-only cases against
//! the project's test API server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use roost_agent::config::{AgentFile, KubernetesConfig, TargetConfig, TrustedKey};
use roost_bridge::{DropReason, UpwardStats};
use roost_schemas::payload::OutboxOverflow;
use roost_schemas::{
    CloudEvent, EventData, EventType, Reason, Scope, SigningKey, StatusDoc, Topics, PAYLOAD_TYPE,
};
use roost_tests::fixtures::{refs, status_doc, web_app, Web, WEB_APP};
use roost_tests::harness::{
    self, paths_under, publish, publish_qos1, CloudRig, Component, GitServer, Observer,
    ProcessStore, StoreRig,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const APP: &str = WEB_APP;
/// The `web` app's files in these tests' repositories.
const FILES: Web = Web::ConfigMap;
const STORE: &str = "store-0001";
const DEP: &str = "web";
/// Seeds of the keys: two trusted, one trusted but expired, one trusted but revoked, one
/// nobody trusts.
const KEY_A: u8 = 1;
const KEY_B: u8 = 2;
const KEY_EXPIRED: u8 = 3;
const KEY_REVOKED: u8 = 4;
const STRANGER: u8 = 99;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32]).expect("key")
}

fn trusted(seed: u8, not_after: Option<&str>) -> TrustedKey {
    trusted_key(&key(seed), not_after)
}

/// The agent's trust entry for `k`.
fn trusted_key(k: &SigningKey, not_after: Option<&str>) -> TrustedKey {
    TrustedKey {
        id: k.key_id(),
        public_key: base64::engine::general_purpose::STANDARD.encode(k.public_key()),
        not_after: not_after.map(str::to_owned),
    }
}

/// The agent configuration of `store` trusting the test keys: A and B, one that expired
/// (2020) and one that is revoked.
fn test_keys(store: &StoreRig) -> AgentFile {
    let mut file: AgentFile = store.agent_cfg.file.clone();
    file.trusted_keys = vec![
        trusted(KEY_A, None),
        trusted(KEY_B, None),
        trusted(KEY_EXPIRED, Some("2020-01-01T00:00:00Z")),
        trusted(KEY_REVOKED, None),
    ];
    file.revoked_keys = vec![key(KEY_REVOKED).key_id()];
    file
}

/// Envelope bytes of `body` signed by each of `seeds`.
fn sign_bytes(seeds: &[u8], body: &[u8]) -> Vec<u8> {
    envelope_bytes(seeds, PAYLOAD_TYPE, body)
}

/// Envelope bytes of `body` as a `payload_type` payload, signed by each of `seeds`.
fn envelope_bytes(seeds: &[u8], payload_type: &str, body: &[u8]) -> Vec<u8> {
    let keys: Vec<SigningKey> = seeds.iter().map(|s| key(*s)).collect();
    let env = roost_schemas::sign_all(&keys, payload_type, body).expect("keys");
    serde_json::to_vec(&env).expect("json")
}

fn sign(seeds: &[u8], v: &Value) -> Vec<u8> {
    sign_bytes(seeds, &serde_json::to_vec(v).expect("json"))
}

fn env_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("envelope")
}

/// Writes a commit whose `apps/web` directory holds `entries` (name, mode, content) as raw
/// tree objects, so that names and modes `git` would refuse can be served.
fn raw_commit(repo: &git2::Repository, entries: &[(&str, u32, &[u8])]) -> String {
    let odb = repo.odb().expect("odb");
    let tree = |items: Vec<(String, u32, git2::Oid)>| {
        let mut raw = Vec::new();
        for (name, mode, id) in items {
            raw.extend_from_slice(format!("{mode:o} {name}\0").as_bytes());
            raw.extend_from_slice(id.as_bytes());
        }
        odb.write(git2::ObjectType::Tree, &raw).expect("tree")
    };
    let mut items: Vec<(String, u32, git2::Oid)> = entries
        .iter()
        .map(|(n, m, c)| {
            let id = odb.write(git2::ObjectType::Blob, c).expect("blob");
            ((*n).to_owned(), *m, id)
        })
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let web = tree(items);
    let apps = tree(vec![("web".into(), 0o40000, web)]);
    let root = tree(vec![("apps".into(), 0o40000, apps)]);
    let root = repo.find_tree(root).expect("root tree");
    let sig = git2::Signature::now("t", "t@t").expect("sig");
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, "hostile", &root, &parents)
        .expect("commit")
        .to_string()
}

/// What a case sends and where.
enum Send {
    /// A message on a deployment topic (through the cloud broker and the bridge): rejected
    /// by verification with `rollout.rejected`.
    Topic { topic: String, payload: Vec<u8> },
    /// A message straight onto the edge broker's deployment topic (one the bridge would not
    /// carry): rejected by the agent's verification.
    EdgeTopic { topic: String, payload: Vec<u8> },
    /// A well-signed fleet rollout of a hostile revision: rejected when rendered (with
    /// `policy.substitute` when `substitute`).
    Revision { rev: String, substitute: bool },
    /// A forged message on the edge broker that the bridge must drop.
    Edge {
        topic: String,
        payload: Vec<u8>,
        drop: DropReason,
    },
    /// A message on the store's profile topic (through the cloud broker and the bridge):
    /// rejected by the agent with `profile.rejected`; the profile in force stays.
    Profile { payload: Vec<u8> },
}

struct Case {
    name: String,
    reason: &'static str,
    send: Send,
}

struct World {
    _dir: tempfile::TempDir,
    cloud: SocketAddr,
    git: GitServer,
    obs: Observer,
    store: StoreRig,
    bridge: Option<Component>,
    stats: Arc<UpwardStats>,
    /// The fleet slot's last sequence handed out.
    seq: u64,
    /// The last accepted fleet sequence (a marker).
    accepted: u64,
    good: [String; 2],
    markers: usize,
}

impl World {
    async fn new() -> World {
        let CloudRig {
            dir,
            cloud,
            mut git,
            rev: rev_a,
            obs,
        } = CloudRig::start(&refs(&web_app("a", FILES))).await;
        let rev_b = git.commit(&refs(&web_app("b", FILES)), &[], "b");
        let signer = harness::Signer::new(KEY_A);
        let mut store = StoreRig::new(STORE, &["canary"], dir.path(), cloud, &signer, &git.url());
        let mut file = test_keys(&store);
        file.thresholds.fleet = Some(2);
        // Exactly the one repository, not the whole host.
        file.git.allowed_sources = vec![git.url()];
        file.limits.max_objects = 50;
        file.limits.max_file_bytes = 64 * 1024;
        store.set_agent_file(file);
        let stats = Arc::new(UpwardStats::default());
        let mut w = World {
            _dir: dir,
            cloud,
            git,
            obs,
            store,
            bridge: None,
            stats,
            seq: 0,
            accepted: 0,
            good: [rev_a, rev_b],
            markers: 0,
        };
        w.start_bridge();
        w.store.start_agent();
        w
    }

    fn start_bridge(&mut self) {
        let cfg = self.store.bridge_cfg.clone();
        let stats = self.stats.clone();
        self.bridge = Some(Component::spawn("bridge", move |c| {
            roost_bridge::run_with(cfg, c, stats)
        }));
    }

    async fn stop_bridge(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.stop().await;
        }
    }

    fn fleet_topic(&self) -> String {
        Topics::default().deployment(&Scope::Fleet, DEP)
    }

    /// A valid rollout payload for `rev` on `scope` with `seq`.
    fn rollout(&self, scope: Scope, seq: u64, rev: &str) -> Value {
        let r = harness::Signer::new(KEY_A).rollout(DEP, scope, seq, &self.git.url(), rev, APP);
        serde_json::to_value(r).expect("json")
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn status(&self) -> Option<StatusDoc> {
        self.obs.snapshot().status.get(STORE).cloned()
    }

    fn max_roostseq(&self) -> u64 {
        self.obs.snapshot().max_roostseq(STORE)
    }

    /// A good fleet rollout (alternating two revisions) that must converge: the agent is
    /// alive, verifies, fetches, applies and reports; the bridge still carries it all.
    async fn marker(&mut self) {
        let rev = self.good[self.markers % 2].clone();
        self.markers += 1;
        let seq = self.next();
        let body = self.rollout(Scope::Fleet, seq, &rev);
        publish(
            self.cloud,
            &self.fleet_topic(),
            sign(&[KEY_A, KEY_B], &body),
        )
        .await;
        self.obs
            .wait_status(STORE, &format!("marker {seq} converged on {rev}"), T, |d| {
                harness::converged_at(d, DEP, &rev, seq)
            })
            .await;
        self.accepted = seq;
    }

    async fn run(&mut self, case: &Case) {
        let before_files = self.store.live_files(DEP);
        let before = self.status().and_then(|d| d.deployments.get(DEP).cloned());
        let from = self.max_roostseq();
        match &case.send {
            Send::Topic { topic, payload } => {
                publish(self.cloud, topic, payload.clone()).await;
                let e = self.rejection_after(from, &case.name, REJECTED).await;
                assert_eq!(e.reason(), Some(case.reason), "{}: {}", case.name, e.data);
                if *topic != self.fleet_topic() {
                    // Clear the retained message again, so it is not delivered later.
                    publish(self.cloud, topic, Vec::new()).await;
                }
                let after = self.status().and_then(|d| d.deployments.get(DEP).cloned());
                assert_eq!(
                    after.as_ref().and_then(|d| d.desired.clone()),
                    before.as_ref().and_then(|d| d.desired.clone()),
                    "{}: the desired state did not change",
                    case.name
                );
            }
            Send::EdgeTopic { topic, payload } => {
                publish_qos1(self.store.edge, topic, payload.clone(), true).await;
                let e = self.rejection_after(from, &case.name, REJECTED).await;
                assert_eq!(e.reason(), Some(case.reason), "{}: {}", case.name, e.data);
                publish_qos1(self.store.edge, topic, Vec::new(), true).await;
            }
            Send::Revision { rev, substitute } => {
                let seq = self.next();
                let mut body = self.rollout(Scope::Fleet, seq, rev);
                if *substitute {
                    body["policy"]["substitute"] = json!(true);
                }
                publish(
                    self.cloud,
                    &self.fleet_topic(),
                    sign(&[KEY_A, KEY_B], &body),
                )
                .await;
                let e = self.rejection_after(from, &case.name, REJECTED).await;
                assert_eq!(e.reason(), Some(case.reason), "{}: {}", case.name, e.data);
                assert_eq!(e.data["revision"], rev.as_str(), "{}", case.name);
            }
            Send::Profile { payload } => {
                let in_force = |d: Option<StatusDoc>| d.map(|d| (d.profile_sequence, d.groups));
                let before = in_force(self.status());
                let topic = Topics::default().profile(STORE);
                publish(self.cloud, &topic, payload.clone()).await;
                let e = self
                    .rejection_after(from, &case.name, PROFILE_REJECTED)
                    .await;
                assert_eq!(e.reason(), Some(case.reason), "{}: {}", case.name, e.data);
                assert_eq!(e.data["topic"], topic.as_str(), "{}", case.name);
                // Cleared again, so a reconnecting bridge does not deliver it later.
                publish(self.cloud, &topic, Vec::new()).await;
                assert_eq!(
                    in_force(self.status()),
                    before,
                    "{}: the profile in force did not change",
                    case.name
                );
                let snap = self.obs.snapshot();
                assert!(
                    snap.of(STORE, "dev.roost.profile.accepted")
                        .iter()
                        .all(|e| e.roostseq <= from),
                    "{}: no profile accepted",
                    case.name
                );
            }
            Send::Edge {
                topic,
                payload,
                drop,
            } => {
                let dropped = self.stats.dropped(*drop);
                let total = self.stats.dropped_total();
                publish_qos1(self.store.edge, topic, payload.clone(), false).await;
                let stats = self.stats.clone();
                harness::eventually(T, &format!("{}: dropped by the bridge", case.name), || {
                    (stats.dropped_total() > total).then_some(())
                })
                .await;
                assert_eq!(
                    self.stats.dropped(*drop),
                    dropped + 1,
                    "{}: dropped as {drop}",
                    case.name
                );
                self.check_confirmation().await;
            }
        }
        assert_eq!(
            self.store.live_files(DEP),
            before_files,
            "{}: nothing applied",
            case.name
        );
        let after = self.status().and_then(|d| d.deployments.get(DEP).cloned());
        assert_eq!(
            after.as_ref().and_then(|d| d.applied_revision.clone()),
            before.as_ref().and_then(|d| d.applied_revision.clone()),
            "{}: the applied revision did not change",
            case.name
        );
        let snap = self.obs.snapshot();
        assert!(
            snap.of(STORE, "dev.roost.apply.started")
                .iter()
                .all(|e| e.roostseq <= from),
            "{}: no apply started",
            case.name
        );
        self.marker().await;
        // Forged edge messages never reached the cloud (the marker's events came after them).
        let snap = self.obs.snapshot();
        assert!(
            snap.events.iter().all(|e| !e.id.starts_with("forged-")),
            "{}: a forged event reached the cloud",
            case.name
        );
        assert!(
            !snap.status.contains_key("store-0002"),
            "{}: a forged status reached the cloud",
            case.name
        );
    }

    /// The first event of type `ty` (a rejection) after `from`, which must say why.
    async fn rejection_after(&self, from: u64, name: &str, ty: &str) -> CloudEvent {
        self.obs
            .wait_event(STORE, ty, T, |e| e.roostseq > from)
            .await
            .tap(|e| {
                assert!(
                    e.data["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{name}: a message"
                )
            })
    }

    /// The bridge's confirmation on the edge never claims more than the agent produced.
    async fn check_confirmation(&self) {
        let (status, ack) = harness::edge_retained(self.store.edge, STORE)
            .await
            .expect("read retained");
        if let (Some(s), Some(a)) = (status, ack) {
            assert!(
                a.roostseq <= s.roostseq.max(self.max_roostseq()),
                "confirmation {} beyond the agent's {}",
                a.roostseq,
                s.roostseq
            );
        }
    }
}

const REJECTED: &str = "dev.roost.rollout.rejected";
const PROFILE_REJECTED: &str = "dev.roost.profile.rejected";

/// A store profile of `store` with `seq`, in the `canary` group (the one the hostile world's
/// store is configured with, so a case can only fail for its own reason), with a label.
fn profile_value(store: &str, seq: u64) -> Value {
    let mut p = serde_json::to_value(harness::Signer::new(KEY_A).profile(store, seq, &["canary"]))
        .expect("json");
    p["labels"] = json!({"region": "us-south"});
    p
}

/// `v` signed by `seeds` as a store profile.
fn sign_profile(seeds: &[u8], v: &Value) -> Vec<u8> {
    envelope_bytes(
        seeds,
        roost_schemas::PROFILE_PAYLOAD_TYPE,
        &serde_json::to_vec(v).expect("json"),
    )
}

/// The store profile cases: each refused with its reason before any profile is accepted.
fn profile_cases(w: &mut World) -> Vec<Case> {
    let mut out = Vec::new();
    let mut case = |name: &str, reason: &'static str, payload: Vec<u8>| {
        out.push(Case {
            name: format!("profile: {name}"),
            reason,
            send: Send::Profile { payload },
        })
    };
    let mut good = || profile_value(STORE, w.next() + 5000);
    case("malformed JSON", "malformed", b"{not a profile".to_vec());
    case("oversize", "too_large", vec![b' '; 300 * 1024]);
    case(
        "signed by a key nobody trusts",
        "unknown_key",
        sign_profile(&[STRANGER], &good()),
    );
    case(
        "signed by a revoked key",
        "revoked_key",
        sign_profile(&[KEY_REVOKED], &good()),
    );
    case(
        "signed by an expired key",
        "expired_key",
        sign_profile(&[KEY_EXPIRED], &good()),
    );
    // The bridge reads profiles unverified and follows these groups until the next profile
    // (docs/security.md says why that is safe); the agent refuses it.
    let mut forged = env_of(&sign_profile(&[KEY_A], &good()));
    let mut other = good();
    other["groups"] = json!(["canary", "evil"]);
    forged["payload"] = env_of(&sign_profile(&[KEY_A], &other))["payload"].clone();
    case(
        "forged signature (another payload under A's signature)",
        "bad_signature",
        serde_json::to_vec(&forged).expect("json"),
    );
    case(
        "a rollout's payload type",
        "malformed",
        sign(&[KEY_A], &good()),
    );
    let mut other_store = good();
    other_store["store"] = json!("store-0002");
    case(
        "another store's profile on this store's topic",
        "scope_mismatch",
        sign_profile(&[KEY_A], &other_store),
    );
    let mut extra = good();
    extra["windows"] = json!([]);
    case(
        "a field the profile does not have",
        "schema",
        sign_profile(&[KEY_A], &extra),
    );
    let mut bad_group = good();
    bad_group["groups"] = json!(["Not A Group"]);
    case(
        "an invalid group name",
        "schema",
        sign_profile(&[KEY_A], &bad_group),
    );
    let mut twice = good();
    twice["groups"] = json!(["canary", "canary"]);
    case("a group twice", "schema", sign_profile(&[KEY_A], &twice));
    let mut zero = good();
    zero["sequence"] = json!(0);
    case("sequence 0", "schema", sign_profile(&[KEY_A], &zero));
    out
}

/// A good profile is accepted after the table; then an equal and a lower sequence are
/// refused as replays, also after the agent restarts (the guard is in its ledger).
async fn profile_replays(w: &mut World) {
    let seq = w.next() + 100_000;
    let good = profile_value(STORE, seq);
    publish(
        w.cloud,
        &Topics::default().profile(STORE),
        sign_profile(&[KEY_A], &good),
    )
    .await;
    let doc = w
        .obs
        .wait_status(STORE, "on the good profile", T, |d| {
            d.profile_sequence == Some(seq)
        })
        .await;
    assert_eq!(doc.groups, ["canary"]);
    w.obs
        .wait_event(STORE, "dev.roost.profile.accepted", T, |e| {
            e.data["sequence"] == seq
        })
        .await;
    w.marker().await;
    let mut same_seq = good.clone();
    same_seq["labels"] = json!({"region": "us-east"});
    let lower = profile_value(STORE, seq - 1);
    for (name, v) in [("equal sequence", &same_seq), ("lower sequence", &lower)] {
        let case = Case {
            name: format!("profile: {name}"),
            reason: "replay",
            send: Send::Profile {
                payload: sign_profile(&[KEY_A], v),
            },
        };
        eprintln!("  +    {:<62} -> replay", case.name);
        w.run(&case).await;
    }
    w.store.stop_agent().await;
    w.store.start_agent();
    let case = Case {
        name: "profile: lower sequence after an agent restart".into(),
        reason: "replay",
        send: Send::Profile {
            payload: sign_profile(&[KEY_A], &profile_value(STORE, seq - 2)),
        },
    };
    eprintln!("  +    {:<62} -> replay", case.name);
    w.run(&case).await;
    let doc = w.status().expect("status");
    assert_eq!(
        (doc.profile_sequence, doc.groups),
        (Some(seq), vec!["canary".to_owned()]),
        "the restarted agent runs on the accepted profile"
    );
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl<T> Tap for T {}

/// An event as the agent would publish it, but forged (its id says so).
fn forged_event(roostseq: u64, ty: EventType, data: Value) -> CloudEvent {
    let mut ev = CloudEvent::new(
        &format!("roost://stores/{STORE}/agent"),
        ty,
        Some(DEP),
        data,
    );
    ev.roostseq = roostseq;
    ev.id = format!("forged-{roostseq}-{:08x}", rand::random::<u32>());
    ev
}

fn forged_overflow(roostseq: u64, ranges: &[[u64; 2]], lost_count: u64) -> Vec<u8> {
    let data = EventData::OutboxOverflow(OutboxOverflow {
        reason: Reason::OutboxOverflow,
        message: "forged".into(),
        dropped_messages: lost_count,
        lost_count,
        lost_from_roostseq: ranges.first().map(|r| r[0]),
        lost_to_roostseq: ranges.last().map(|r| r[1]),
        lost_ranges: ranges.to_vec(),
    })
    .to_json();
    serde_json::to_vec(&forged_event(roostseq, EventType::OutboxOverflow, data)).expect("json")
}

fn cases(w: &mut World) -> Vec<Case> {
    let topics = Topics::default();
    let fleet = w.fleet_topic();
    let group = topics.deployment(&Scope::Group("canary".into()), DEP);
    let store = topics.deployment(&Scope::Store(STORE.into()), DEP);
    let rev = w.good[0].clone();
    let url = w.git.url();
    let mut out: Vec<Case> = Vec::new();
    let topic_case =
        |out: &mut Vec<Case>, name: &str, reason: &'static str, topic: &str, payload: Vec<u8>| {
            out.push(Case {
                name: name.into(),
                reason,
                send: Send::Topic {
                    topic: topic.into(),
                    payload,
                },
            })
        };
    // Each fleet case gets a fresh sequence, so it could only fail for its own reason.
    let good = |w: &mut World| {
        let seq = w.next() + 1000;
        w.rollout(Scope::Fleet, seq, &rev)
    };
    let both = [KEY_A, KEY_B];

    // --- Not an envelope at all.
    topic_case(
        &mut out,
        "malformed JSON",
        "malformed",
        &fleet,
        b"{this is not json".to_vec(),
    );
    topic_case(
        &mut out,
        "JSON array",
        "malformed",
        &fleet,
        b"[1,2,3]".to_vec(),
    );
    topic_case(
        &mut out,
        "empty object",
        "malformed",
        &fleet,
        b"{}".to_vec(),
    );
    let valid = sign(&both, &good(w));
    let mut v = env_of(&valid);
    v["payload"] = json!(5);
    topic_case(
        &mut out,
        "payload of the wrong type",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v["signatures"] = json!({"keyid": "x"});
    topic_case(
        &mut out,
        "signatures not a list",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v.as_object_mut().expect("obj").remove("payload");
    topic_case(
        &mut out,
        "missing payload",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v.as_object_mut().expect("obj").remove("signatures");
    topic_case(
        &mut out,
        "missing signatures",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v["signatures"] = json!([]);
    topic_case(
        &mut out,
        "no signatures",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    let one = v["signatures"][0].clone();
    v["signatures"] = json!(vec![one; 9]);
    topic_case(
        &mut out,
        "nine signatures",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v["payloadType"] = json!("application/vnd.in-toto+json");
    topic_case(
        &mut out,
        "unknown payloadType",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&valid);
    v["payload"] = json!("!!!not base64!!!");
    topic_case(
        &mut out,
        "bad base64 payload",
        "malformed",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    topic_case(
        &mut out,
        "non-UTF-8 bytes",
        "malformed",
        &fleet,
        vec![0xff, 0xfe, 0x00, 0x80, b'{'],
    );
    let mut nul = valid.clone();
    nul.insert(1, 0);
    topic_case(
        &mut out,
        "NUL byte in the envelope",
        "malformed",
        &fleet,
        nul,
    );
    topic_case(
        &mut out,
        "oversize message",
        "too_large",
        &fleet,
        vec![b' '; 300 * 1024],
    );
    // The bridge only carries valid deployment topics; straight onto the edge broker.
    out.push(Case {
        name: "invalid deployment name in the topic (edge)".into(),
        reason: "malformed",
        send: Send::EdgeTopic {
            topic: topics.deployment(&Scope::Fleet, "Bad_Name"),
            payload: valid.clone(),
        },
    });

    // --- Keys and signatures.
    topic_case(
        &mut out,
        "unknown key",
        "unknown_key",
        &fleet,
        sign(&[STRANGER], &good(w)),
    );
    topic_case(
        &mut out,
        "unknown keys, two of them",
        "unknown_key",
        &fleet,
        sign(&[STRANGER, 98], &good(w)),
    );
    topic_case(
        &mut out,
        "revoked key",
        "revoked_key",
        &fleet,
        sign(&[KEY_REVOKED], &good(w)),
    );
    topic_case(
        &mut out,
        "expired key",
        "expired_key",
        &fleet,
        sign(&[KEY_EXPIRED], &good(w)),
    );
    topic_case(
        &mut out,
        "revoked key on the store topic (threshold 1)",
        "revoked_key",
        &store,
        {
            let seq = w.next() + 1000;
            sign(
                &[KEY_REVOKED],
                &w.rollout(Scope::Store(STORE.into()), seq, &rev),
            )
        },
    );
    let a = sign(&both, &good(w));
    let b = sign(&both, &good(w));
    let mut v = env_of(&a);
    v["payload"] = env_of(&b)["payload"].clone();
    topic_case(
        &mut out,
        "signatures over other bytes",
        "bad_signature",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&a);
    for s in v["signatures"].as_array_mut().expect("sigs") {
        let full = s["sig"].as_str().expect("sig").to_owned();
        s["sig"] = json!(&full[..40]);
    }
    topic_case(
        &mut out,
        "truncated signatures",
        "bad_signature",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let mut v = env_of(&a);
    for s in v["signatures"].as_array_mut().expect("sigs") {
        s["sig"] = json!("%%%%");
    }
    topic_case(
        &mut out,
        "signatures not base64",
        "bad_signature",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    let g = good(w);
    let mut v = env_of(&sign(&[STRANGER, 98], &g));
    v["signatures"][0]["keyid"] = json!(key(KEY_A).key_id());
    v["signatures"][1]["keyid"] = json!(key(KEY_B).key_id());
    topic_case(
        &mut out,
        "trusted key ids on a stranger's signatures",
        "bad_signature",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    topic_case(
        &mut out,
        "one signature where the fleet threshold wants two",
        "threshold_not_met",
        &fleet,
        sign(&[KEY_A], &good(w)),
    );
    let mut v = env_of(&sign(&[KEY_A], &good(w)));
    let s0 = v["signatures"][0].clone();
    v["signatures"] = json!([s0.clone(), s0]);
    topic_case(
        &mut out,
        "the same key twice towards the threshold",
        "threshold_not_met",
        &fleet,
        serde_json::to_vec(&v).expect("json"),
    );
    topic_case(
        &mut out,
        "a trusted and an expired key towards the threshold",
        "threshold_not_met",
        &fleet,
        sign(&[KEY_A, KEY_EXPIRED], &good(w)),
    );
    topic_case(
        &mut out,
        "a trusted and a revoked key towards the threshold",
        "threshold_not_met",
        &fleet,
        sign(&[KEY_B, KEY_REVOKED], &good(w)),
    );
    topic_case(
        &mut out,
        "a trusted and an unknown key towards the threshold",
        "threshold_not_met",
        &fleet,
        sign(&[KEY_A, STRANGER], &good(w)),
    );

    // --- Signed, but not a valid rollout.
    topic_case(
        &mut out,
        "signed bytes that are not JSON",
        "schema",
        &fleet,
        sign_bytes(&both, b"\xff\xfe not json"),
    );
    topic_case(
        &mut out,
        "signed JSON that is not a rollout",
        "schema",
        &fleet,
        sign(&both, &json!({"x": 1})),
    );
    let field = |w: &mut World, name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = good(w);
        f(&mut v);
        Case {
            name: name.into(),
            reason: "schema",
            send: Send::Topic {
                topic: fleet.clone(),
                payload: sign(&both, &v),
            },
        }
    };
    out.push(field(w, "sequence as a string", &|v| {
        v["sequence"] = json!(v["sequence"].to_string())
    }));
    out.push(field(w, "sequence 0", &|v| v["sequence"] = json!(0)));
    out.push(field(w, "sequence negative", &|v| {
        v["sequence"] = json!(-5)
    }));
    out.push(field(w, "missing deployment", &|v| {
        v.as_object_mut().expect("obj").remove("deployment");
    }));
    out.push(field(w, "missing source", &|v| {
        v.as_object_mut().expect("obj").remove("source");
    }));
    out.push(field(w, "invalid deployment name", &|v| {
        v["deployment"] = json!("Web_App")
    }));
    out.push(field(w, "invalid group name in the scope", &|v| {
        v["scope"] = json!({"group": "-bad-"})
    }));
    out.push(field(w, "two scopes at once", &|v| {
        v["scope"] = json!({"fleet": true, "store": STORE})
    }));
    out.push(field(w, "revision not hex", &|v| {
        v["source"]["revision"] = json!("z".repeat(40))
    }));
    out.push(field(w, "revision a branch name", &|v| {
        v["source"]["revision"] = json!("main")
    }));
    out.push(field(w, "short revision", &|v| {
        v["source"]["revision"] = json!("0123abc")
    }));
    out.push(field(w, "upper-case revision", &|v| {
        let r = v["source"]["revision"]
            .as_str()
            .expect("rev")
            .to_uppercase();
        v["source"]["revision"] = json!(r)
    }));
    out.push(field(w, "path with ..", &|v| {
        v["source"]["path"] = json!("apps/../../etc")
    }));
    out.push(field(w, "absolute path", &|v| {
        v["source"]["path"] = json!("/etc")
    }));
    out.push(field(w, "path with a NUL", &|v| {
        v["source"]["path"] = json!("apps/web\u{0}x")
    }));
    out.push(field(w, "path with a backslash", &|v| {
        v["source"]["path"] = json!("apps\\..\\..\\etc")
    }));
    out.push(field(w, "health timeout 0", &|v| {
        v["policy"]["health_timeout_s"] = json!(0)
    }));
    out.push(field(w, "not_before not a time", &|v| {
        v["not_before"] = json!("tomorrow")
    }));
    out.push(field(w, "null where a time belongs", &|v| {
        v["issued_at"] = Value::Null
    }));

    // --- Addressed to the wrong place.
    let seq = w.next() + 1000;
    topic_case(
        &mut out,
        "store-scope payload on the fleet topic",
        "scope_mismatch",
        &fleet,
        sign(&both, &w.rollout(Scope::Store(STORE.into()), seq, &rev)),
    );
    let seq = w.next() + 1000;
    topic_case(
        &mut out,
        "group-scope payload on the store topic",
        "scope_mismatch",
        &store,
        sign(
            &[KEY_A],
            &w.rollout(Scope::Group("canary".into()), seq, &rev),
        ),
    );
    let seq = w.next() + 1000;
    topic_case(
        &mut out,
        "another store's payload on this store's topic",
        "scope_mismatch",
        &store,
        sign(
            &[KEY_A],
            &w.rollout(Scope::Store("store-0002".into()), seq, &rev),
        ),
    );
    let mut v = good(w);
    v["deployment"] = json!("api");
    topic_case(
        &mut out,
        "deployment does not match the topic",
        "scope_mismatch",
        &fleet,
        sign(&both, &v),
    );
    let seq = w.next() + 1000;
    topic_case(
        &mut out,
        "fleet payload on the group topic",
        "scope_mismatch",
        &group,
        sign(&[KEY_A], &w.rollout(Scope::Fleet, seq, &rev)),
    );

    // --- Where it may fetch from.
    let port = url
        .trim_start_matches("git://127.0.0.1:")
        .split('/')
        .next()
        .expect("port")
        .to_owned();
    let sources = [
        (
            "look-alike host",
            format!("git://127.0.0.1.evil.example:{port}/fleet.git"),
        ),
        (
            "other port",
            format!(
                "git://127.0.0.1:{}/fleet.git",
                port.parse::<u16>().expect("port") + 1
            ),
        ),
        (
            "other repository on the host",
            format!("git://127.0.0.1:{port}/other.git"),
        ),
        (
            "string-prefix trick",
            format!("git://127.0.0.1:{port}/fleet.git-evil"),
        ),
        (
            "user-info",
            format!("git://evil@127.0.0.1:{port}/fleet.git"),
        ),
        (
            "user-info hiding the real host",
            format!("git://127.0.0.1:{port}@evil.example/fleet.git"),
        ),
        (
            "password in the URL",
            "https://x-access-token:hunter2@127.0.0.1/fleet.git".into(),
        ),
        (
            "fragment hiding the real host",
            format!("git://evil.example#@127.0.0.1:{port}/fleet.git"),
        ),
        (
            "ext:: transport",
            "ext::sh -c touch% /tmp/roost-pwned".into(),
        ),
        ("fd:: transport", "fd::7".into()),
        (
            "http without TLS",
            format!("http://127.0.0.1:{port}/fleet.git"),
        ),
        ("scp-like syntax", "git@127.0.0.1:fleet.git".into()),
        (
            "dot segment",
            format!("git://127.0.0.1:{port}/fleet.git/../other.git"),
        ),
        (
            "percent-encoded dots",
            format!("git://127.0.0.1:{port}/fleet.git/%2e%2e/other.git"),
        ),
        ("file:// elsewhere", "file:///etc/".into()),
        (
            "backslash",
            format!("git://127.0.0.1:{port}\\@evil.example/fleet.git"),
        ),
    ];
    for (name, src) in sources {
        let mut v = good(w);
        v["source"]["url"] = json!(src);
        topic_case(
            &mut out,
            &format!("source: {name}"),
            "source_not_allowed",
            &fleet,
            sign(&both, &v),
        );
    }

    // --- Hostile repository contents (signed and allowed; refused when rendered).
    let repo = w.git.repo();
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for n in 'b'..='i' {
        laughs.push_str(&format!(
            "{n}: &{n} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        ));
        prev = n;
    }
    let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  x: \"{}\"\n",
        "x".repeat(100 * 1024)
    );
    type Entries = Vec<(String, u32, Vec<u8>)>;
    let contents: Vec<(&str, &'static str, Entries)> = vec![
        (
            "billion-laughs YAML",
            "invalid_manifest",
            vec![("bomb.yaml".to_string(), 0o100644, laughs.into_bytes())],
        ),
        (
            "deeply nested YAML",
            "invalid_manifest",
            vec![("deep.yaml".to_string(), 0o100644, deep.clone().into_bytes())],
        ),
        (
            "deeply nested JSON",
            "invalid_manifest",
            vec![("deep.json".to_string(), 0o100644, deep.into_bytes())],
        ),
        (
            "oversize manifest",
            "too_large",
            vec![("big.yaml".to_string(), 0o100644, big.into_bytes())],
        ),
        (
            "too many objects",
            "too_large",
            (0..60)
                .map(|i| {
                    (
                        format!("cm-{i:02}.yaml"),
                        0o100644,
                        format!("kind: ConfigMap\nmetadata: {{name: c{i}}}\n").into_bytes(),
                    )
                })
                .collect(),
        ),
        (
            "non-UTF-8 manifest",
            "invalid_manifest",
            vec![(
                "latin1.yaml".to_string(),
                0o100644,
                b"kind: ConfigMap\ndata: {k: \xe9t\xe9}\n".to_vec(),
            )],
        ),
        (
            "NUL bytes in a manifest",
            "invalid_manifest",
            vec![(
                "nul.yaml".to_string(),
                0o100644,
                b"kind: ConfigMap\0\n".to_vec(),
            )],
        ),
        (
            "unparsable YAML",
            "invalid_manifest",
            vec![(
                "broken.yaml".to_string(),
                0o100644,
                b"key: [unclosed\n".to_vec(),
            )],
        ),
        (
            "duplicate keys",
            "invalid_manifest",
            vec![(
                "dup.yaml".to_string(),
                0o100644,
                b"kind: A\nkind: B\n".to_vec(),
            )],
        ),
        (
            "a symlink leaving the repository",
            "invalid_manifest",
            vec![("passwd.yaml".to_string(), 0o120000, b"/etc/passwd".to_vec())],
        ),
        (
            "a symlink to a parent directory",
            "invalid_manifest",
            vec![("up".to_string(), 0o120000, b"../../..".to_vec())],
        ),
        (
            "a tree entry named ..",
            "invalid_manifest",
            vec![("..".to_string(), 0o100644, b"kind: A\n".to_vec())],
        ),
        (
            "a tree entry named .git",
            "invalid_manifest",
            vec![(".git".to_string(), 0o100644, b"kind: A\n".to_vec())],
        ),
        (
            "a submodule",
            "invalid_manifest",
            vec![("sub".to_string(), 0o160000, Vec::new())],
        ),
    ];
    // Sealed files and substitution (`policy.substitute`): this store has no age identity.
    let stranger = roost_runtime::sealed::Identity::generate();
    let sealed_cm = roost_runtime::sealed::encrypt(
        &[stranger.to_recipient()],
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n",
    )
    .expect("seal");
    let cm_with = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  v: \"{value}\"\n"
        )
        .into_bytes()
    };
    let per_store: Vec<(&str, &'static str, Entries, bool)> = vec![
        (
            "a sealed file for another store",
            "invalid_manifest",
            vec![("secret.yaml.age".to_string(), 0o100644, sealed_cm)],
            false,
        ),
        (
            "a sealed file that is not an age file",
            "invalid_manifest",
            vec![(
                "secret.yaml.age".to_string(),
                0o100644,
                b"-----BEGIN AGE ENCRYPTED FILE-----\nnope\n-----END AGE ENCRYPTED FILE-----\n"
                    .to_vec(),
            )],
            false,
        ),
        (
            "substitution: an unresolved variable",
            "invalid_manifest",
            vec![(
                "configmap.yaml".to_string(),
                0o100644,
                cm_with("${roost.vars.printer_ip}"),
            )],
            true,
        ),
        (
            "substitution: a ${ that is not roost's",
            "invalid_manifest",
            vec![("configmap.yaml".to_string(), 0o100644, cm_with("${HOME}"))],
            true,
        ),
        (
            "substitution: an unknown namespace",
            "invalid_manifest",
            vec![(
                "configmap.yaml".to_string(),
                0o100644,
                cm_with("${roost.env.PATH}"),
            )],
            true,
        ),
        (
            "substitution: a nested ${",
            "invalid_manifest",
            vec![(
                "configmap.yaml".to_string(),
                0o100644,
                cm_with("${roost.vars.${roost.store}}"),
            )],
            true,
        ),
        (
            "substitution: a default over 4 KiB",
            "invalid_manifest",
            vec![(
                "configmap.yaml".to_string(),
                0o100644,
                cm_with(&format!("${{roost.vars.x:={}}}", "y".repeat(5000))),
            )],
            true,
        ),
    ];
    let contents = contents
        .into_iter()
        .map(|(n, r, e)| (n, r, e, false))
        .chain(per_store);
    for (name, reason, entries, substitute) in contents {
        let entries: Vec<(&str, u32, &[u8])> = entries
            .iter()
            .map(|(n, m, c)| (n.as_str(), *m, &c[..]))
            .collect();
        let rev = raw_commit(repo, &entries);
        out.push(Case {
            name: format!("content: {name}"),
            reason,
            send: Send::Revision { rev, substitute },
        });
    }

    // --- Forged messages on the edge broker: the bridge drops them.
    let events = topics.events(STORE);
    let near = w.max_roostseq() + 5;
    let edge = |name: &str, topic: &str, payload: Vec<u8>, drop: DropReason| Case {
        name: format!("edge: {name}"),
        reason: drop.as_str(),
        send: Send::Edge {
            topic: topic.into(),
            payload,
            drop,
        },
    };
    out.push(edge(
        "forged lost_ranges [[1, 18446744073709551615]]",
        &events,
        forged_overflow(near, &[[1, u64::MAX]], u64::MAX),
        DropReason::LostRanges,
    ));
    out.push(edge(
        "forged lost range beyond its own roostseq",
        &events,
        forged_overflow(near, &[[near - 2, near + 50]], 53),
        DropReason::LostRanges,
    ));
    out.push(edge(
        "forged lost ranges out of order",
        &events,
        forged_overflow(near + 10, &[[near + 5, near + 6], [near, near + 1]], 4),
        DropReason::LostRanges,
    ));
    out.push(edge(
        "forged lost_count",
        &events,
        forged_overflow(near + 10, &[[near, near + 1]], 1000),
        DropReason::LostRanges,
    ));
    let mut foreign = forged_event(near, EventType::Converged, json!({"deployment": DEP}));
    foreign.source = "roost://stores/store-0002/agent".into();
    out.push(edge(
        "forged event from another store's agent",
        &events,
        serde_json::to_vec(&foreign).expect("json"),
        DropReason::ForeignSource,
    ));
    let mut bridge_src = forged_event(near, EventType::Converged, json!({"deployment": DEP}));
    bridge_src.source = format!("roost://stores/{STORE}/bridge");
    out.push(edge(
        "forged event claiming the bridge as source",
        &events,
        serde_json::to_vec(&bridge_src).expect("json"),
        DropReason::ForeignSource,
    ));
    out.push(edge(
        "malformed event",
        &events,
        b"{\"roostseq\": 1".to_vec(),
        DropReason::Malformed,
    ));
    let mut no_seq =
        serde_json::to_value(forged_event(near, EventType::Converged, json!({}))).expect("json");
    no_seq.as_object_mut().expect("obj").remove("roostseq");
    out.push(edge(
        "event without roostseq",
        &events,
        serde_json::to_vec(&no_seq).expect("json"),
        DropReason::Schema,
    ));
    let mut neg =
        serde_json::to_value(forged_event(near, EventType::Converged, json!({}))).expect("json");
    neg["roostseq"] = json!(-1);
    out.push(edge(
        "event with a negative roostseq",
        &events,
        serde_json::to_vec(&neg).expect("json"),
        DropReason::Schema,
    ));
    let other_status = status_doc("store-0002", "forged", 1);
    out.push(edge(
        "another store's status document",
        &topics.status(STORE),
        serde_json::to_vec(&other_status).expect("json"),
        DropReason::ForeignStore,
    ));
    out.push(edge(
        "empty status (would clear it in the cloud)",
        &topics.status(STORE),
        Vec::new(),
        DropReason::Empty,
    ));
    out.push(edge(
        "status that is not a status document",
        &topics.status(STORE),
        b"{\"store\": \"store-0001\"}".to_vec(),
        DropReason::Schema,
    ));
    out.push(edge(
        "oversize event",
        &events,
        vec![b' '; 600 * 1024],
        DropReason::TooLarge,
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_rejected_with_their_reason_and_change_nothing() {
    let mut w = World::new().await;
    w.marker().await;
    let mut cases = cases(&mut w);
    cases.extend(profile_cases(&mut w));
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let started = Instant::now();
    eprintln!("hostile cases ({}):", cases.len() + 1);
    for (i, c) in cases.iter().enumerate() {
        eprintln!("  {:>3}. {:<62} -> {}", i + 1, c.name, c.reason);
    }
    eprintln!(
        "  {:>3}. {:<62} -> ignored (agent keeps its events)",
        cases.len() + 1,
        "edge: forged ack beyond the agent's last roostseq",
    );
    for (i, c) in cases.iter().enumerate() {
        eprintln!("hostile: running case {} ({})", i + 1, c.name);
        w.run(c).await;
    }
    // Replays, against the last accepted fleet sequence.
    for (name, seq) in [
        ("equal sequence", w.accepted),
        ("lower sequence", w.accepted - 1),
    ] {
        let other = w.good[w.markers % 2].clone();
        let body = w.rollout(Scope::Fleet, seq, &other);
        let case = Case {
            name: name.into(),
            reason: "replay",
            send: Send::Topic {
                topic: w.fleet_topic(),
                payload: sign(&[KEY_A, KEY_B], &body),
            },
        };
        eprintln!("  +    {name:<62} -> replay");
        w.run(&case).await;
    }
    profile_replays(&mut w).await;
    forged_ack_keeps_events(&mut w).await;
    eprintln!(
        "hostile: {} cases passed in {} ms",
        cases.len() + 6,
        started.elapsed().as_millis()
    );
    w.stop_bridge().await;
    w.store.stop_agent().await;
}

/// A forged confirmation on the edge broker while the bridge is away: the agent must not
/// delete what the bridge never got; when the bridge returns, every event arrives.
async fn forged_ack_keeps_events(w: &mut World) {
    w.stop_bridge().await;
    // A rollout straight onto the edge broker: its events wait, unconfirmed, in the agent.
    let seq = w.next();
    let rev = w.good[w.markers % 2].clone();
    w.markers += 1;
    let body = w.rollout(Scope::Fleet, seq, &rev);
    publish_qos1(
        w.store.edge,
        &w.fleet_topic(),
        sign(&[KEY_A, KEY_B], &body),
        true,
    )
    .await;
    let doc = harness::wait_edge_status(w.store.edge, STORE, T, |d| {
        harness::converged_on(d, DEP, &rev)
    })
    .await;
    assert!(
        doc.outbox_backlog > 0,
        "events are waiting for confirmation"
    );
    let forged = serde_json::to_vec(&roost_schemas::Confirmation {
        roostseq: 1_000_000_000,
        resend: false,
    })
    .expect("json");
    publish_qos1(w.store.edge, &Topics::default().ack(STORE), forged, true).await;
    // Another rollout, so we know the agent has read the forged confirmation (same
    // subscription, later message).
    let seq = w.next();
    let rev2 = w.good[w.markers % 2].clone();
    w.markers += 1;
    let body = w.rollout(Scope::Fleet, seq, &rev2);
    publish_qos1(
        w.store.edge,
        &w.fleet_topic(),
        sign(&[KEY_A, KEY_B], &body),
        true,
    )
    .await;
    let doc = harness::wait_edge_status(w.store.edge, STORE, T, |d| {
        harness::converged_on(d, DEP, &rev2)
    })
    .await;
    w.start_bridge();
    let obs = w.obs.seen.clone();
    harness::eventually(T, "every event after the bridge returned", || {
        let s = obs.lock().expect("lock");
        let mut seqs: Vec<u64> = s.store_events(STORE).iter().map(|e| e.roostseq).collect();
        seqs.sort_unstable();
        (seqs.len() as u64 >= doc.roostseq).then_some(seqs)
    })
    .await
    .tap(|seqs| {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &want, "no event lost to the forged confirmation");
    });
    w.accepted = seq;
}

/// Key rotation: add the new key, sign with it, retire the old one (first by `not_after`,
/// then by revocation); the old key's rollouts are accepted before and rejected after, the
/// new key's throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_old_key_accepted_before_and_rejected_after() {
    let CloudRig {
        dir,
        cloud,
        mut git,
        obs,
        ..
    } = CloudRig::start(&refs(&web_app("0", FILES))).await;
    const OLD: u8 = 11;
    const NEW: u8 = 12;
    let mut store = StoreRig::new(
        STORE,
        &[],
        dir.path(),
        cloud,
        &harness::Signer::new(OLD),
        &git.allowed(),
    );
    let reconfigure = |store: &mut StoreRig, keys: Vec<TrustedKey>, revoked: Vec<String>| {
        let mut f = store.agent_cfg.file.clone();
        f.trusted_keys = keys;
        f.revoked_keys = revoked;
        store.set_agent_file(f);
    };
    store.start();
    let topic = Topics::default().deployment(&Scope::Fleet, DEP);
    let mut seq = 0u64;
    let mut roll = async |git: &mut GitServer, seed: u8, label: &str| -> (u64, String) {
        seq += 1;
        let rev = git.commit(&refs(&web_app(label, FILES)), &[], label);
        let r = harness::Signer::new(seed).rollout(DEP, Scope::Fleet, seq, &git.url(), &rev, APP);
        publish(
            cloud,
            &topic,
            sign(&[seed], &serde_json::to_value(r).expect("json")),
        )
        .await;
        (seq, rev)
    };
    let converged = |rev: String| {
        let obs = &obs;
        async move {
            obs.wait_phase(STORE, DEP, "Converged", Some(&rev), T).await;
        }
    };
    // The reason of the first rejection after roostseq `from` (a verification failure knows
    // no sequence: the payload was not trusted).
    let last = || obs.snapshot().max_roostseq(STORE);
    let rejected = |from: u64| {
        let obs = &obs;
        async move {
            obs.wait_event(STORE, "dev.roost.rollout.rejected", T, |e| {
                e.roostseq > from
            })
            .await
            .reason()
            .map(str::to_owned)
        }
    };
    // 1. Only the old key.
    let (_, rev) = roll(&mut git, OLD, "old-1").await;
    converged(rev).await;
    let s = last();
    roll(&mut git, NEW, "new-0").await;
    assert_eq!(
        rejected(s).await.as_deref(),
        Some("unknown_key"),
        "not trusted yet"
    );
    // 2. Add the new key; the old one retires a few seconds from now.
    store.stop_agent().await;
    let until =
        roost_schemas::format_rfc3339(time::OffsetDateTime::now_utc() + time::Duration::seconds(4));
    reconfigure(
        &mut store,
        vec![trusted(OLD, Some(&until)), trusted(NEW, None)],
        vec![],
    );
    store.start_agent();
    let (_, rev) = roll(&mut git, NEW, "new-1").await;
    converged(rev).await;
    let (_, rev) = roll(&mut git, OLD, "old-2").await;
    converged(rev).await;
    let until_t = roost_schemas::parse_rfc3339(&until).expect("time");
    while time::OffsetDateTime::now_utc() <= until_t + time::Duration::milliseconds(200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = last();
    roll(&mut git, OLD, "old-3").await;
    assert_eq!(
        rejected(s).await.as_deref(),
        Some("expired_key"),
        "past not_after"
    );
    let (_, rev) = roll(&mut git, NEW, "new-2").await;
    converged(rev).await;
    // 3. Revoke the old key outright.
    store.stop_agent().await;
    reconfigure(
        &mut store,
        vec![trusted(OLD, None), trusted(NEW, None)],
        vec![key(OLD).key_id()],
    );
    store.start_agent();
    let s = last();
    roll(&mut git, OLD, "old-4").await;
    assert_eq!(rejected(s).await.as_deref(), Some("revoked_key"));
    let (_, rev) = roll(&mut git, NEW, "new-3").await;
    converged(rev).await;
    store.stop_agent().await;
}

/// `roost rollout --key A --key B` meets a fleet threshold of two; one key does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_rollout_signs_with_every_key_to_meet_a_threshold() {
    let CloudRig {
        dir,
        cloud,
        git,
        rev,
        obs,
    } = CloudRig::start(&refs(&web_app("1", FILES))).await;
    let keys = dir.path().join("keys");
    let (id_a, _) = roost_fleet::cloud::keygen(&keys).expect("keygen");
    let (id_b, _) = roost_fleet::cloud::keygen(&keys).expect("keygen");
    let load =
        |id: &str| roost_fleet::cloud::load_key(&keys.join(format!("{id}.key"))).expect("key");
    let (ka, kb) = (load(&id_a), load(&id_b));
    let mut store = StoreRig::new(
        STORE,
        &[],
        dir.path(),
        cloud,
        &harness::Signer::new(1),
        &git.allowed(),
    );
    let mut f = store.agent_cfg.file.clone();
    f.trusted_keys = vec![trusted_key(&ka, None), trusted_key(&kb, None)];
    f.thresholds.fleet = Some(2);
    store.set_agent_file(f);
    store.start();
    let rollout = |keys_args: Vec<String>, seq: u64| {
        let mut cmd = std::process::Command::new(harness::roost_bin());
        cmd.args(["rollout", "--broker", &cloud.to_string()]);
        for k in keys_args {
            cmd.args(["--key", &k]);
        }
        cmd.args([
            "--deployment",
            DEP,
            "--fleet",
            "--repo",
            &git.url(),
            "--revision",
            &rev,
            "--path",
            APP,
            "--sequence",
            &seq.to_string(),
        ]);
        let out = cmd.output().expect("roost rollout");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key_path = |id: &str| keys.join(format!("{id}.key")).display().to_string();
    rollout(vec![key_path(&id_a)], 1);
    let e = obs
        .wait_event(STORE, "dev.roost.rollout.rejected", T, |_| true)
        .await;
    assert_eq!(e.reason(), Some("threshold_not_met"));
    rollout(vec![key_path(&id_a), key_path(&id_b)], 2);
    obs.wait_phase(STORE, DEP, "Converged", Some(&rev), T).await;
    store.stop_agent().await;
}

/// A token configured in `[[git.credentials]]` never appears in anything a run writes: the
/// agent's log (debug level), its state directory (outbox with every event, ledger, git
/// cache), the bridge's outbox, and the events and status documents the cloud receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_logs_events_or_status() {
    let CloudRig {
        dir,
        cloud,
        mut git,
        rev,
        obs,
    } = CloudRig::start(&refs(&web_app("1", FILES))).await;
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let token = format!("roost-secret-token-{:016x}", rand::random::<u64>());
    let signer = harness::Signer::new(1);
    // An https source that does not answer TLS, with a credential for it: fetches fail and
    // are reported, with the token configured for exactly that URL.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let https = format!(
        "https://127.0.0.1:{}/fleet.git",
        dead.local_addr().expect("addr").port()
    );
    let state = dir.path().join("agent");
    let mut toml = harness::agent_toml(STORE, &[], &state, edge, &signer, &git.allowed());
    toml = toml.replace(
        "allowed_sources = [",
        &format!("allowed_sources = [{https:?}, "),
    );
    toml = toml.replace(
        "[target]",
        &format!("[[git.credentials]]\nurl_prefix = {https:?}\ntoken = {token:?}\n[target]"),
    );
    toml = toml.replace("fetch_timeout_s = 10", "fetch_timeout_s = 3");
    let cfg_path = dir.path().join("agent.toml");
    std::fs::write(&cfg_path, &toml).expect("config");
    assert!(std::fs::read_to_string(&cfg_path)
        .expect("read")
        .contains(&token));
    let log = dir.path().join("agent.log");
    std::env::set_var("ROOST_CHILD_LOG", "debug,rumqttd=error");
    let mut agent = harness::RoostProcess::start(
        [
            "agent".to_string(),
            "--config".into(),
            cfg_path.display().to_string(),
        ],
        &log,
    );
    let spec = roost_sim::up::StoreSpec {
        store: STORE.into(),
        groups: vec![],
        dir: dir.path().join("rig"),
        edge,
        cloud,
        allowed: git.allowed(),
        target: TargetConfig::Files(Default::default()),
    };
    let (_, bridge_cfg) = roost_sim::up::store_configs(&spec, &signer.key).expect("configs");
    let bridge_dir = bridge_cfg.state_dir.clone();
    let bridge = Component::spawn("bridge", move |c| roost_bridge::run(bridge_cfg, c));
    let topic = Topics::default().deployment(&Scope::Fleet, DEP);
    let r = signer.rollout(DEP, Scope::Fleet, 1, &git.url(), &rev, APP);
    publish(cloud, &topic, signer.sign(&r)).await;
    obs.wait_phase(STORE, DEP, "Converged", Some(&rev), T).await;
    // The https source: fetch fails (no TLS there), retried, reported.
    let rev2 = git.commit(&refs(&web_app("2", FILES)), &[], "2");
    let r = signer.rollout(DEP, Scope::Fleet, 2, &https, &rev2, APP);
    publish(cloud, &topic, signer.sign(&r)).await;
    obs.wait_event(STORE, "dev.roost.fetch.failed", T, |e| {
        e.data["revision"] == rev2.as_str()
    })
    .await;
    // A rejected source that carries a password of its own: not echoed either.
    let r = signer.rollout(
        DEP,
        Scope::Fleet,
        3,
        &format!("https://u:{token}-url@127.0.0.1/x.git"),
        &rev2,
        APP,
    );
    publish(cloud, &topic, signer.sign(&r)).await;
    let rej = obs
        .wait_event(STORE, "dev.roost.rollout.rejected", T, |e| {
            e.data["sequence"] == 3
        })
        .await;
    assert_eq!(rej.reason(), Some("source_not_allowed"));
    // Back to a good one, so everything is flushed through the bridge.
    let r = signer.rollout(DEP, Scope::Fleet, 4, &git.url(), &rev2, APP);
    publish(cloud, &topic, signer.sign(&r)).await;
    let doc = obs
        .wait_phase(STORE, DEP, "Converged", Some(&rev2), T)
        .await;
    harness::wait_in_bridge_outbox(edge, STORE, T, |d| d.roostseq >= doc.roostseq).await;
    agent.kill();
    bridge.stop().await;
    std::env::remove_var("ROOST_CHILD_LOG");
    let mut haystack: Vec<(String, Vec<u8>)> = Vec::new();
    for p in paths_under(&state)
        .into_iter()
        .chain(paths_under(&bridge_dir))
    {
        if let Ok(b) = std::fs::read(&p) {
            haystack.push((p.display().to_string(), b));
        }
    }
    let log_text = std::fs::read(&log).expect("log");
    assert!(log_text.len() > 1000, "the agent logged at debug level");
    haystack.push(("agent log".into(), log_text));
    let snap = obs.snapshot();
    for e in &snap.events {
        haystack.push((
            format!("event {}", e.roostseq),
            serde_json::to_vec(e).expect("json"),
        ));
    }
    for d in snap.status.values() {
        haystack.push(("status".into(), serde_json::to_vec(d).expect("json")));
    }
    let needle = token.as_bytes();
    let mut checked = 0usize;
    for (what, bytes) in &haystack {
        checked += bytes.len();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the token appears in {what}"
        );
    }
    eprintln!(
        "credentials: {} files/documents ({} bytes) searched, token not found",
        haystack.len(),
        checked
    );
}

// ---------------------------------------------------------------------------------------------
// Per-store content: sealed secrets, overlays and substitution, with every store's state, log,
// Git cache and outbox searched for the secrets afterwards.

/// The project's test API server, a kubeconfig for it in the rig's directory, and the cloud
/// rig (a repository holding only a README).
async fn kube_rig() -> (
    roost_tests::kube_api::TestApiServer,
    std::path::PathBuf,
    CloudRig,
) {
    harness::init();
    let server = roost_tests::kube_api::TestApiServer::start()
        .await
        .expect("test API server");
    let rig = CloudRig::start(&[("README", "apps\n")]).await;
    let kubeconfig = rig.dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (server, kubeconfig, rig)
}

/// A Kubernetes Secret manifest `db` in namespace `shop` with `password`.
fn secret_yaml(password: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: shop\ntype: Opaque\nstringData:\n  password: \"{password}\"\n")
}

/// `plaintext` sealed (ASCII-armored) to `recipient` with the reference `age` CLI, or with the
/// crate when the CLI is absent on a developer's machine (under CI its absence fails).
fn age_seal_cli(
    test: &str,
    recipient: &roost_runtime::sealed::Recipient,
    plaintext: &[u8],
) -> Vec<u8> {
    use std::io::Write as _;
    let Some(age) = roost_tests::fixtures::age_bin(test) else {
        return roost_runtime::sealed::encrypt(std::slice::from_ref(recipient), plaintext)
            .expect("seal");
    };
    let mut child = std::process::Command::new(age)
        .args(["-a", "-r", &recipient.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("age");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(plaintext)
        .expect("write");
    let out = child.wait_with_output().expect("age");
    assert!(out.status.success(), "age -r failed");
    out.stdout
}

/// A Secret sealed for store A only: A converges and its cluster has the Secret; B and C (a
/// files-target store) reject their copy with `secret_not_for_this_store` and apply nothing.
/// Then every store gets its own sealed overlay (B's sealed by the reference `age -r`) and
/// its own name substituted: all converge, C with the ciphertext written as it is. Drift on
/// the Secret names the object and the field, never the key or its data. Finally the secret
/// values (and their base64) are in no file under the test's directories (states, logs at
/// debug level, Git caches, outboxes), no event and no status document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_secrets_overlays_and_substitution_per_store() {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    use roost_runtime::sealed::{decrypt, encrypt, Identity};
    const TEST: &str = "sealed_secrets_overlays_and_substitution_per_store";
    let (
        server,
        kubeconfig,
        CloudRig {
            dir,
            cloud,
            mut git,
            obs,
            ..
        },
    ) = kube_rig().await;
    let signer = harness::Signer::new(KEY_A);
    let (a, b, c) = ("store-a", "store-b", "store-c");
    let ids: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    let secrets: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|s| format!("pw-{s}-{:016x}", rand::random::<u64>()))
        .collect();
    let kube_target = |prefix: &str| {
        format!(
            "[target]\nkind = \"kubernetes\"\nkubeconfig = {:?}\nnamespace_prefix = \"{prefix}\"\ndefault_namespace = \"shop\"\n",
            kubeconfig.display().to_string()
        )
    };
    let mut stores: Vec<ProcessStore> = [(a, Some("a-")), (b, Some("b-")), (c, None)]
        .into_iter()
        .zip(&ids)
        .map(|((name, prefix), id)| {
            ProcessStore::start(
                name,
                &[],
                dir.path(),
                cloud,
                &signer,
                &git.allowed(),
                "debug,rumqttd=error",
                |toml, state| {
                    id.write_file(&state.join("age-identity.txt"))
                        .expect("enrollment writes the identity");
                    match prefix {
                        Some(p) => toml.replace("[target]\nkind = \"files\"\n", &kube_target(p)),
                        None => toml,
                    }
                },
            )
        })
        .collect();
    let files_root = stores[2].state.join("targets");
    let topic = Topics::default().deployment(&Scope::Fleet, DEP);
    let url = git.url();
    let roll = |seq: u64, rev: &str| {
        let mut r = signer.rollout(DEP, Scope::Fleet, seq, &url, rev, APP);
        r.policy.substitute = true;
        signer.sign(&r)
    };
    let config = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: shop\ndata:\n  store: \"${roost.store}\"\n  literal: \"$${roost.store}\"\n  greeting: ${roost.vars.greeting:=hello}\n";
    let base = |extra: Vec<(String, String)>| {
        let mut v = vec![
            (
                format!("{APP}/00-namespace.yaml"),
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n".to_owned(),
            ),
            (format!("{APP}/config.yaml"), config.to_owned()),
        ];
        v.extend(extra);
        v
    };
    let armored = |id: &Identity, text: &str| {
        String::from_utf8(encrypt(&[id.to_recipient()], text.as_bytes()).expect("seal"))
            .expect("armor is text")
    };

    // 1. The base holds a Secret sealed for A only.
    let rev1 = git.commit_replacing(
        APP,
        &base(vec![(
            format!("{APP}/secret.yaml.age"),
            armored(&ids[0], &secret_yaml(&secrets[0])),
        )]),
        "sealed for A",
    );
    publish(cloud, &topic, roll(1, &rev1)).await;
    obs.wait_converged(a, &rev1, T).await;
    for store in [b, c] {
        let e = obs
            .wait_event(store, "dev.roost.rollout.rejected", T, |e| {
                e.data["revision"] == rev1.as_str()
            })
            .await;
        assert_eq!(e.reason(), Some("invalid_manifest"), "{store}: {}", e.data);
        assert_eq!(
            e.data["detail"], "secret_not_for_this_store",
            "{store}: {}",
            e.data
        );
        let message = e.data["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("secret.yaml.age"),
            "names the file: {message}"
        );
    }
    let api = |kind: &str, ns: Option<&str>| {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", kind));
        match ns {
            Some(ns) => Api::<DynamicObject>::namespaced_with(server.client(), ns, &ar),
            None => Api::all_with(server.client(), &ar),
        }
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret_of = |ns: &'static str| {
        let secrets = api("Secret", Some(ns));
        async move {
            secrets
                .get_opt("db")
                .await
                .expect("get")
                .and_then(|s| s.data["data"]["password"].as_str().map(str::to_owned))
        }
    };
    assert_eq!(
        secret_of("a-shop").await,
        Some(b64(&secrets[0])),
        "A applied it"
    );
    let cm = api("ConfigMap", Some("a-shop"))
        .get("web")
        .await
        .expect("A's ConfigMap");
    assert_eq!(cm.data["data"]["store"], a, "substituted");
    assert_eq!(cm.data["data"]["literal"], "${roost.store}", "escaped");
    assert_eq!(cm.data["data"]["greeting"], "hello", "a default");
    assert!(
        api("Namespace", None)
            .get_opt("b-shop")
            .await
            .expect("get")
            .is_none(),
        "B applied nothing"
    );
    assert!(
        harness::files_under(&files_root).is_empty(),
        "C wrote nothing"
    );

    // 2. Each store's own sealed overlay; B's sealed by the reference age CLI.
    let cipher_c = armored(&ids[2], &format!("PASSWORD={}\n", secrets[2]));
    let rev2 = git.commit_replacing(
        APP,
        &base(vec![
            (
                format!("{APP}/_stores/{a}/secret.yaml.age"),
                armored(&ids[0], &secret_yaml(&secrets[0])),
            ),
            (
                format!("{APP}/_stores/{b}/secret.yaml.age"),
                String::from_utf8(age_seal_cli(
                    TEST,
                    &ids[1].to_recipient(),
                    secret_yaml(&secrets[1]).as_bytes(),
                ))
                .expect("armor is text"),
            ),
            (
                format!("{APP}/_stores/{c}/secret.env.age"),
                cipher_c.clone(),
            ),
        ]),
        "a secret per store",
    );
    publish(cloud, &topic, roll(2, &rev2)).await;
    for store in [a, b, c] {
        obs.wait_converged(store, &rev2, T).await;
    }
    assert_eq!(secret_of("a-shop").await, Some(b64(&secrets[0])));
    assert_eq!(secret_of("b-shop").await, Some(b64(&secrets[1])), "B's own");
    let cm = api("ConfigMap", Some("b-shop"))
        .get("web")
        .await
        .expect("B's ConfigMap");
    assert_eq!(cm.data["data"]["store"], b, "B's own name");
    // C, the files target: the ciphertext as committed, which C's identity opens; its own
    // name in its configuration; no overlay directories.
    let live = harness::files_under(&files_root.join(DEP).join("current"));
    assert_eq!(
        live.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["00-namespace.yaml", "config.yaml", "secret.env.age"]
    );
    assert_eq!(live["secret.env.age"], cipher_c, "written as it is");
    assert_eq!(
        decrypt(&ids[2], live["secret.env.age"].as_bytes()).expect("C opens it"),
        format!("PASSWORD={}\n", secrets[2]).as_bytes()
    );
    let c_config: Value = serde_saphyr::from_str(&live["config.yaml"]).expect("yaml");
    assert_eq!(c_config["data"]["store"], c);

    // 3. Drift on A's Secret: detected and corrected; the event names the object and the
    // field, never the key or the data.
    let other = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    api("Secret", Some("a-shop"))
        .patch(
            "db",
            &other,
            &Patch::Merge(json!({"data": {"password": b64("edited-by-hand")}})),
        )
        .await
        .expect("edit");
    let drift = obs
        .wait_event(a, "dev.roost.drift.detected", T, |e| {
            e.data["items"].to_string().contains("Secret")
        })
        .await;
    let items = drift.data["items"].to_string();
    assert!(items.contains("/v1/Secret/a-shop/db: data"), "{items}");
    assert!(!items.contains("password"), "no key in drift: {items}");
    harness::eventually_async(T, "the Secret restored", || async {
        (secret_of("a-shop").await == Some(b64(&secrets[0]))).then_some(())
    })
    .await;

    // 4. The secrets appear nowhere: every file under the test's directories (each store's
    // agent and bridge state, agent.toml, debug log, Git cache, outbox, files target), the
    // served repository, every event and status document.
    for s in &mut stores {
        s.stop().await;
    }
    let mut haystack: Vec<(String, Vec<u8>)> = Vec::new();
    for p in paths_under(dir.path())
        .into_iter()
        .chain(paths_under(&git.path()))
    {
        if let Ok(bytes) = std::fs::read(&p) {
            haystack.push((p.display().to_string(), bytes));
        }
    }
    for s in &stores {
        let log = std::fs::read(&s.log).expect("log");
        assert!(log.len() > 1000, "{} logged at debug level", s.name);
        assert!(
            paths_under(&s.state)
                .iter()
                .any(|p| p.ends_with("outbox.db")),
            "{}: its outbox is searched",
            s.name
        );
    }
    let snap = obs.snapshot();
    for e in &snap.events {
        haystack.push((
            format!("event {} of {}", e.roostseq, e.source),
            serde_json::to_vec(e).expect("json"),
        ));
    }
    for d in snap.status.values() {
        haystack.push((
            format!("status of {}", d.store),
            serde_json::to_vec(d).expect("json"),
        ));
    }
    let mut needles: Vec<String> = secrets.clone();
    needles.extend(secrets.iter().map(|s| b64(s)));
    let mut checked = 0usize;
    for (what, bytes) in &haystack {
        checked += bytes.len();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                "a secret ({n}) appears in {what}"
            );
        }
    }
    eprintln!(
        "sealed secrets: {} files/documents ({checked} bytes) searched, no secret found",
        haystack.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The signed fleet snapshot: stale (withheld, rolled back), replayed, expired, untrusted and
// malformed snapshots.

/// A signed fleet snapshot envelope (`seeds` sign) of `seq` listing `topics`, issued at
/// `issued` and valid until `expires`.
fn snapshot_env(
    seeds: &[u8],
    seq: u64,
    topics: &[(&str, u64)],
    issued: time::OffsetDateTime,
    expires: time::OffsetDateTime,
) -> Vec<u8> {
    let body = json!({
        "issued_at": roost_schemas::format_rfc3339(issued),
        "expires": roost_schemas::format_rfc3339(expires),
        "sequence": seq,
        "topics": topics.iter().map(|(t, s)| ((*t).to_owned(), json!(s))).collect::<serde_json::Map<_, _>>(),
    });
    snapshot_raw(seeds, &serde_json::to_vec(&body).expect("json"))
}

/// `body` signed as a snapshot payload.
fn snapshot_raw(seeds: &[u8], body: &[u8]) -> Vec<u8> {
    envelope_bytes(seeds, roost_schemas::SNAPSHOT_PAYLOAD_TYPE, body)
}

fn freshness_of(d: &StatusDoc) -> Option<roost_schemas::FreshnessState> {
    d.freshness.desired_freshness
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_cases_stale_replayed_expired_untrusted_and_malformed() {
    use roost_schemas::FreshnessState::{Expired, Fresh, Stale};
    let CloudRig {
        dir,
        cloud,
        mut git,
        rev: rev_a,
        obs,
    } = CloudRig::start(&refs(&web_app("a", FILES))).await;
    let rev_b = git.commit(&refs(&web_app("b", FILES)), &[], "b");
    let signer = harness::Signer::new(KEY_A);
    let configure = |store: &mut StoreRig| {
        let file = test_keys(store);
        store.set_agent_file(file);
    };
    let (s1, s2) = ("store-snap-1", "store-snap-2");
    let mut one = StoreRig::new(s1, &["canary"], dir.path(), cloud, &signer, &git.url());
    configure(&mut one);
    one.start();
    let topics = Topics::default();
    let fleet = topics.deployment(&Scope::Fleet, DEP);
    let snap_topic = topics.snapshot();
    let rollout = |seq: u64, rev: &str| {
        let r = signer.rollout(DEP, Scope::Fleet, seq, &git.url(), rev, APP);
        sign(&[KEY_A], &serde_json::to_value(r).expect("json"))
    };
    let now = time::OffsetDateTime::now_utc;
    let later = || now() + time::Duration::minutes(10);
    let converged = |store: &'static str, rev: String, seq: u64| {
        let obs = &obs;
        async move {
            obs.wait_status(store, &format!("converged on {rev} ({seq})"), T, |d| {
                harness::converged_at(d, DEP, &rev, seq)
            })
            .await;
        }
    };
    let mut cases_run: Vec<(String, &'static str)> = Vec::new();

    // A rollout and a snapshot that lists it: fresh, with the time it was confirmed.
    let old_env = rollout(10, &rev_a);
    publish(cloud, &fleet, old_env.clone()).await;
    converged(s1, rev_a.clone(), 10).await;
    publish(
        cloud,
        &snap_topic,
        snapshot_env(&[KEY_A], 100, &[(&fleet, 10)], now(), later()),
    )
    .await;
    let doc = obs
        .wait_status(s1, "fresh at snapshot 100", T, |d| {
            freshness_of(d) == Some(Fresh) && d.freshness.snapshot_sequence == Some(100)
        })
        .await;
    let confirmed = doc
        .freshness
        .desired_confirmed_at
        .clone()
        .expect("desired_confirmed_at");
    assert!(
        roost_schemas::parse_rfc3339(&confirmed).is_some(),
        "{confirmed}"
    );
    assert!(doc.freshness.snapshot_expires.is_some());

    // Rejected snapshots: each with its exact reason, nothing applied, the snapshot in force
    // unchanged, and a marker rollout converging after it.
    let good_body = serde_json::to_vec(&json!({
        "issued_at": roost_schemas::format_rfc3339(now()),
        "expires": roost_schemas::format_rfc3339(later()),
        "sequence": 150, "topics": {fleet.clone(): 10},
    }))
    .expect("json");
    let mut tampered = env_of(&snapshot_raw(&[KEY_A], &good_body));
    let other = env_of(&snapshot_env(
        &[KEY_A],
        151,
        &[(&fleet, 10)],
        now(),
        later(),
    ));
    tampered["payload"] = other["payload"].clone();
    let mut truncated = env_of(&snapshot_raw(&[KEY_A], &good_body));
    let sig = truncated["signatures"][0]["sig"]
        .as_str()
        .expect("sig")
        .to_owned();
    truncated["signatures"][0]["sig"] = json!(&sig[..40]);
    let too_big = vec![b' '; 300 * 1024];
    let bad: Vec<(&str, &'static str, Vec<u8>)> = vec![
        ("snapshot: lower sequence (replay)", "snapshot_replay", snapshot_env(&[KEY_A], 50, &[(&fleet, 10)], now(), later())),
        ("snapshot: equal sequence, other content (replay)", "snapshot_replay", snapshot_env(&[KEY_A], 100, &[(&fleet, 9)], now(), later())),
        ("snapshot: signed by an unknown key", "unknown_key", snapshot_raw(&[STRANGER], &good_body)),
        ("snapshot: signed by a revoked key", "revoked_key", snapshot_raw(&[KEY_REVOKED], &good_body)),
        ("snapshot: signed by an expired key", "expired_key", snapshot_raw(&[KEY_EXPIRED], &good_body)),
        ("snapshot: signature over other bytes", "bad_signature", serde_json::to_vec(&tampered).expect("json")),
        ("snapshot: truncated signature", "bad_signature", serde_json::to_vec(&truncated).expect("json")),
        ("snapshot: not JSON", "malformed", b"{snapshot".to_vec()),
        ("snapshot: not an envelope", "malformed", b"{\"sequence\": 900}".to_vec()),
        ("snapshot: a rollout envelope on the snapshot topic", "malformed", rollout(901, &rev_b)),
        ("snapshot: signed non-JSON payload", "schema", snapshot_raw(&[KEY_A], b"\xff\xfe not json")),
        ("snapshot: sequence 0", "schema", snapshot_env(&[KEY_A], 0, &[(&fleet, 10)], now(), later())),
        ("snapshot: expires before issued_at", "schema", snapshot_env(&[KEY_A], 170, &[], now(), now() - time::Duration::minutes(1))),
        ("snapshot: a status topic listed", "schema", snapshot_env(&[KEY_A], 171, &[("roost/v1/stores/x/status", 1)], now(), later())),
        ("snapshot: topics missing", "schema", snapshot_raw(&[KEY_A], &serde_json::to_vec(&json!({"issued_at": roost_schemas::format_rfc3339(now()), "expires": roost_schemas::format_rfc3339(later()), "sequence": 172})).expect("json"))),
        ("snapshot: a sequence as a string", "schema", snapshot_raw(&[KEY_A], &serde_json::to_vec(&json!({"issued_at": roost_schemas::format_rfc3339(now()), "expires": roost_schemas::format_rfc3339(later()), "sequence": "173", "topics": {}})).expect("json"))),
        ("snapshot: oversize", "too_large", too_big),
    ];
    let mut marker_seq = 10;
    for (name, reason, payload) in bad {
        let before = one.live_files(DEP);
        let from = obs.snapshot().max_roostseq(s1);
        publish(cloud, &snap_topic, payload).await;
        let e = obs
            .wait_event(s1, "dev.roost.rollout.rejected", T, |e| e.roostseq > from)
            .await;
        assert_eq!(e.reason(), Some(reason), "{name}: {}", e.data);
        assert_eq!(e.data["topic"], snap_topic.as_str(), "{name}");
        assert!(e.data.get("deployment").is_none(), "{name}");
        assert_eq!(one.live_files(DEP), before, "{name}: nothing applied");
        // The agent still answers: a new rollout converges; the snapshot in force is 100.
        marker_seq += 1;
        let rev = if marker_seq % 2 == 0 { &rev_a } else { &rev_b };
        publish(cloud, &fleet, rollout(marker_seq, rev)).await;
        converged(s1, rev.clone(), marker_seq).await;
        let d = obs.snapshot().status.get(s1).cloned().expect("status");
        assert_eq!(
            d.freshness.snapshot_sequence,
            Some(100),
            "{name}: the snapshot in force"
        );
        cases_run.push((name.to_owned(), reason));
    }
    let held = marker_seq;
    let held_rev = if held % 2 == 0 {
        rev_a.clone()
    } else {
        rev_b.clone()
    };

    // Stale, withheld: a broker that does not deliver the current rollout to a new store
    // (the retained rollout cleared), while the snapshot lists it. A fresh agent reports the
    // topic as not held, and applies nothing.
    publish(
        cloud,
        &snap_topic,
        snapshot_env(&[KEY_A], 200, &[(&fleet, held)], now(), later()),
    )
    .await;
    obs.wait_status(s1, "fresh at snapshot 200", T, |d| {
        freshness_of(d) == Some(Fresh) && d.freshness.snapshot_sequence == Some(200)
    })
    .await;
    publish(cloud, &fleet, Vec::new()).await;
    let mut two = StoreRig::new(s2, &["canary"], dir.path(), cloud, &signer, &git.url());
    configure(&mut two);
    two.start();
    let e = obs
        .wait_event(s2, "dev.roost.desired.stale", T, |_| true)
        .await;
    let stale: roost_schemas::payload::DesiredStale = e.typed().expect("typed desired.stale");
    assert_eq!(stale.reason, Reason::DesiredStale);
    assert_eq!(stale.snapshot_sequence, 200);
    assert_eq!(
        stale.topics,
        vec![roost_schemas::payload::StaleTopic {
            topic: fleet.clone(),
            listed: held,
            held: None
        }],
        "withheld"
    );
    let doc = obs
        .wait_status(s2, "stale", T, |d| freshness_of(d) == Some(Stale))
        .await;
    assert_eq!(doc.freshness.stale_topics, vec![fleet.clone()]);
    assert!(
        doc.freshness.desired_confirmed_at.is_none(),
        "never confirmed"
    );
    assert!(two.live_files(DEP).is_empty(), "withheld: nothing applied");
    assert!(
        obs.snapshot().of(s2, "dev.roost.apply.started").is_empty(),
        "withheld: no apply"
    );
    cases_run.push((
        "stale snapshot: desired state withheld from a fresh agent".into(),
        "desired_stale",
    ));

    // Stale, rolled back: the broker now serves an older signed rollout. The fresh agent
    // takes it (it is validly signed) and reports the topic as held older than listed; the
    // snapshot makes it apply nothing beyond that rollout.
    let from = obs.snapshot().max_roostseq(s2);
    publish(cloud, &fleet, old_env.clone()).await;
    let e = obs
        .wait_event(s2, "dev.roost.desired.stale", T, |e| e.roostseq > from)
        .await;
    let stale: roost_schemas::payload::DesiredStale = e.typed().expect("typed");
    assert_eq!(
        stale.topics,
        vec![roost_schemas::payload::StaleTopic {
            topic: fleet.clone(),
            listed: held,
            held: Some(10)
        }],
        "rolled back"
    );
    converged(s2, rev_a.clone(), 10).await;
    assert!(
        obs.snapshot()
            .of(s2, "dev.roost.apply.started")
            .iter()
            .all(|e| e.data["sequence"] == 10),
        "only the held rollout was applied"
    );
    cases_run.push((
        "stale snapshot: an older retained rollout than listed".into(),
        "desired_stale",
    ));
    // Once per change: a newer snapshot listing the same is compared (its sequence shows in
    // the status) but not reported again.
    let reports = obs.snapshot().of(s2, "dev.roost.desired.stale").len();
    publish(
        cloud,
        &snap_topic,
        snapshot_env(&[KEY_A], 210, &[(&fleet, held)], now(), later()),
    )
    .await;
    obs.wait_status(s2, "stale at snapshot 210", T, |d| {
        freshness_of(d) == Some(Stale) && d.freshness.snapshot_sequence == Some(210)
    })
    .await;
    assert_eq!(
        obs.snapshot().of(s2, "dev.roost.desired.stale").len(),
        reports,
        "reported once per change"
    );
    // The replay of the current rollout goes on: the first store rejects it, keeps its own.
    let r = obs
        .wait_event(s1, "dev.roost.rollout.rejected", T, |e| {
            e.data["sequence"] == 10
        })
        .await;
    assert_eq!(r.reason(), Some("replay"));
    converged(s1, held_rev.clone(), held).await;

    // Resolved: the current rollout reaches both; the next snapshot confirms them fresh.
    let current = held + 1;
    publish(cloud, &fleet, rollout(current, &rev_b)).await;
    converged(s1, rev_b.clone(), current).await;
    converged(s2, rev_b.clone(), current).await;
    publish(
        cloud,
        &snap_topic,
        snapshot_env(&[KEY_A], 300, &[(&fleet, current)], now(), later()),
    )
    .await;
    for s in [s1, s2] {
        let d = obs
            .wait_status(s, "fresh at snapshot 300", T, |d| {
                freshness_of(d) == Some(Fresh) && d.freshness.snapshot_sequence == Some(300)
            })
            .await;
        assert!(d.freshness.desired_confirmed_at.is_some(), "{s}: confirmed");
        assert!(d.freshness.stale_topics.is_empty(), "{s}");
    }

    // Expired on arrival (an old snapshot that was never seen, e.g. while offline): accepted,
    // not an error: the status says expired, nothing applied, reported once.
    let before = one.live_files(DEP);
    let from = obs.snapshot().max_roostseq(s1);
    publish(
        cloud,
        &snap_topic,
        snapshot_env(
            &[KEY_A],
            400,
            &[(&fleet, current)],
            now() - time::Duration::hours(2),
            now() - time::Duration::hours(1),
        ),
    )
    .await;
    let doc = obs
        .wait_status(s1, "expired at snapshot 400", T, |d| {
            freshness_of(d) == Some(Expired) && d.freshness.snapshot_sequence == Some(400)
        })
        .await;
    assert!(
        doc.freshness.desired_confirmed_at.is_some(),
        "keeps the last confirmation"
    );
    let e = obs
        .wait_event(s1, "dev.roost.desired.stale", T, |e| e.roostseq > from)
        .await;
    assert_eq!(e.reason(), Some("snapshot_expired"), "{}", e.data);
    assert!(
        obs.snapshot()
            .of(s1, "dev.roost.rollout.rejected")
            .iter()
            .all(|e| e.roostseq <= from),
        "not a rejection"
    );
    assert_eq!(
        one.live_files(DEP),
        before,
        "expired: nothing applied or removed"
    );
    cases_run.push(("expired snapshot on arrival".into(), "snapshot_expired"));

    // Expiring while held: fresh, then expired when its time passes, without a new message.
    publish(
        cloud,
        &snap_topic,
        snapshot_env(
            &[KEY_A],
            500,
            &[(&fleet, current)],
            now(),
            now() + time::Duration::seconds(15),
        ),
    )
    .await;
    obs.wait_status(s1, "fresh at snapshot 500", T, |d| {
        freshness_of(d) == Some(Fresh) && d.freshness.snapshot_sequence == Some(500)
    })
    .await;
    obs.wait_status(s1, "snapshot 500 expired by itself", T, |d| {
        freshness_of(d) == Some(Expired) && d.freshness.snapshot_sequence == Some(500)
    })
    .await;
    assert_eq!(
        one.live_files(DEP),
        before,
        "expired: nothing applied or removed"
    );
    cases_run.push((
        "snapshot expiring while the store holds it".into(),
        "snapshot_expired",
    ));

    // The replay guard survives a restart of the agent.
    one.stop_agent().await;
    one.start_agent();
    let from = obs.snapshot().max_roostseq(s1);
    publish(
        cloud,
        &snap_topic,
        snapshot_env(&[KEY_A], 450, &[(&fleet, current)], now(), later()),
    )
    .await;
    let e = obs
        .wait_event(s1, "dev.roost.rollout.rejected", T, |e| e.roostseq > from)
        .await;
    assert_eq!(e.reason(), Some("snapshot_replay"), "{}", e.data);
    cases_run.push((
        "snapshot: lower sequence after an agent restart (replay)".into(),
        "snapshot_replay",
    ));
    // Still answering.
    publish(cloud, &fleet, rollout(current + 1, &rev_a)).await;
    converged(s1, rev_a.clone(), current + 1).await;

    eprintln!("hostile snapshot cases ({}):", cases_run.len());
    for (i, (name, reason)) in cases_run.iter().enumerate() {
        eprintln!("  {:>3}. {:<62} -> {reason}", i + 1, name);
    }
    assert!(cases_run.len() >= 20);
    one.stop_agent().await;
    one.stop_bridge().await;
    two.stop_agent().await;
    two.stop_bridge().await;
}

// ---------------------------------------------------------------------------------------------
// Kubernetes-only cases, against the project's test API server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_policy_and_ownership_cases() {
    use kube::api::{Api, DynamicObject, PostParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let (
        server,
        kc,
        CloudRig {
            dir,
            cloud,
            mut git,
            obs,
            ..
        },
    ) = kube_rig().await;
    let signer = harness::Signer::new(7);
    let prefix = format!("h{:06x}-", rand::random::<u32>() & 0xffffff);
    let mut store = StoreRig::new(STORE, &[], dir.path(), cloud, &signer, &git.allowed());
    store.agent_cfg.file.target = TargetConfig::Kubernetes(KubernetesConfig {
        kubeconfig: Some(kc),
        namespace_prefix: Some(prefix.clone()),
        default_namespace: Some("shop".into()),
        allowed_namespaces: vec![format!("{prefix}shop")],
        denied_kinds: vec!["ClusterRole".into()],
        allow_cluster_scoped: Some(false),
        ..Default::default()
    });
    store.start();
    let ns = format!("{prefix}shop");
    let cm = |name: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: shop\ndata:\n  k: v\n")
    };
    let topic = |d: &str| Topics::default().deployment(&Scope::Fleet, d);
    let mut seq = 0u64;
    let mut roll = async |git: &mut GitServer, d: &str, files: Vec<(String, String)>| -> String {
        seq += 1;
        let rev = git.commit_replacing("apps/", &files, "k");
        let r = signer.rollout(d, Scope::Fleet, seq, &git.url(), &rev, &format!("apps/{d}"));
        publish(cloud, &topic(d), signer.sign(&r)).await;
        rev
    };
    // Deployment A owns ConfigMap "shared" (the namespace exists beforehand, as the policy
    // denies cluster-scoped objects such as Namespaces).
    let cm_ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
    let ns_ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"));
    let nss: Api<DynamicObject> = Api::all_with(server.client(), &ns_ar);
    let nsobj: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .expect("ns");
    nss.create(&PostParams::default(), &nsobj)
        .await
        .expect("namespace");
    let cms: Api<DynamicObject> = Api::namespaced_with(server.client(), &ns, &cm_ar);
    // The owner must exist, or the garbage collector removes the dependent.
    let parent: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "parent", "namespace": ns}, "data": {"k": "v"}
    }))
    .expect("cm");
    let parent = cms
        .create(&PostParams::default(), &parent)
        .await
        .expect("parent");
    let parent_uid = parent.metadata.uid.clone().expect("uid");
    let owned: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "owned", "namespace": ns, "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent_uid, "controller": true}]},
        "data": {"k": "v"}
    }))
    .expect("cm");
    cms.create(&PostParams::default(), &owned)
        .await
        .expect("owned configmap");
    let rev_a = roll(
        &mut git,
        "shop-a",
        vec![("apps/shop-a/shared.yaml".into(), cm("shared"))],
    )
    .await;
    obs.wait_phase(STORE, "shop-a", "Converged", Some(&rev_a), T)
        .await;
    let shared_before = cms
        .get("shared")
        .await
        .expect("shared")
        .metadata
        .resource_version;
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("denied kind", "role.yaml", "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: x\nrules: []\n".into(), "ClusterRole"),
        ("namespace not allowed", "elsewhere.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: kube-system\n".into(), "kube-system"),
        ("cluster-scoped object when denied", "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n".into(), "cluster-scoped"),
        ("adopting another deployment's object", "shared.yaml", cm("shared"), "shop-a"),
        ("adopting an object a controller owns", "owned.yaml", cm("owned"), "controlled by ConfigMap parent"),
    ];
    eprintln!("kubernetes hostile cases ({}):", cases.len());
    for (name, _, _, _) in &cases {
        eprintln!("  - {name:<62} -> policy_denied");
    }
    for (ok_n, (name, file, content, names)) in cases.into_iter().enumerate() {
        let files = vec![
            (
                "apps/shop-b/mine.yaml".to_string(),
                cm(&format!("mine-{ok_n}")),
            ),
            (format!("apps/shop-b/{file}"), content),
        ];
        let rev = roll(&mut git, "shop-b", files).await;
        let e = obs
            .wait_event(STORE, "dev.roost.rollout.rejected", T, |e| {
                e.data["revision"] == rev.as_str()
            })
            .await;
        assert_eq!(e.reason(), Some("policy_denied"), "{name}: {}", e.data);
        let msg = e.data["message"].as_str().unwrap_or_default();
        assert!(msg.contains(names), "{name}: {msg}");
        assert!(
            cms.get_opt(&format!("mine-{ok_n}"))
                .await
                .expect("get")
                .is_none(),
            "{name}: nothing applied"
        );
        assert_eq!(
            cms.get("shared")
                .await
                .expect("shared")
                .metadata
                .resource_version,
            shared_before,
            "{name}: A's object untouched"
        );
        let owned_now = cms.get("owned").await.expect("owned");
        assert!(
            owned_now
                .metadata
                .labels
                .is_none_or(|l| !l.contains_key("roost.dev/deployment")),
            "{name}: owned object untouched"
        );
        // The positive marker: a good revision of B converges.
        let good = roll(
            &mut git,
            "shop-b",
            vec![("apps/shop-b/mine.yaml".into(), cm(&format!("ok-{ok_n}")))],
        )
        .await;
        obs.wait_phase(STORE, "shop-b", "Converged", Some(&good), T)
            .await;
    }
    store.stop_agent().await;
}
