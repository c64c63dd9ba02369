//! Checks the JSON Schema files in `schemas/schema/` against the examples in
//! `schemas/examples/` and against the Rust types, so that the two forms of the contract agree.
//!
//! Examples are found by name: `<schema>.valid.<n>.json` must validate, `<schema>.invalid.<n>.json`
//! must not (each breaks exactly one rule; see `examples/README.md`). New files are picked up
//! automatically.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::dsse::pae;
use crate::rollout::normalize_path;
use crate::{
    json_schema, validate_name, CloudEvent, Envelope, EventType, Keyring, Phase, Presence, Rollout,
    SigningKey, Snapshot, StatusDoc, PAYLOAD_TYPE,
};

/// Every schema by its file stem.
const SCHEMAS: [(&str, &str); 11] = [
    ("rollout", json_schema::ROLLOUT),
    ("envelope", json_schema::ENVELOPE),
    ("event", json_schema::EVENT),
    ("status", json_schema::STATUS),
    ("presence", json_schema::PRESENCE),
    ("ack", json_schema::ACK),
    ("fleet", json_schema::FLEET),
    ("snapshot", json_schema::SNAPSHOT),
    ("store", json_schema::STORE),
    ("profile", json_schema::PROFILE),
    ("confirmed", json_schema::CONFIRMED),
];

const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

/// Files in `examples/` that are not `<schema>.(valid|invalid).<n>.json` examples.
const NOT_EXAMPLES: [&str; 1] = ["dsse-test-vector.json"];

const VECTOR: &str = include_str!("../examples/dsse-test-vector.json");

fn schema_value(name: &str) -> Value {
    let src = SCHEMAS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .unwrap_or_else(|| panic!("no schema named {name}"));
    serde_json::from_str(src).unwrap_or_else(|e| panic!("{name}.schema.json is not JSON: {e}"))
}

/// A draft 2020-12 validator with `format` assertions (date-time, uri-reference) enabled.
fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema_value(name))
        .unwrap_or_else(|e| panic!("{name}.schema.json does not compile: {e}"))
}

/// Human-readable list of the errors of `instance` against `v` (empty = valid).
fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {:?}", e, e.instance_path().as_str()))
        .collect()
}

/// One example file.
struct Example {
    file: String,
    valid: bool,
    value: Value,
}

/// Examples by schema name, read from disk.
fn examples() -> BTreeMap<String, Vec<Example>> {
    let mut out: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    let dir = std::fs::read_dir(EXAMPLES_DIR).expect("read examples dir");
    let mut paths: Vec<PathBuf> = dir.map(|e| e.expect("dir entry").path()).collect();
    paths.sort();
    for path in paths {
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("utf-8 file name")
            .to_owned();
        if !file.ends_with(".json") || NOT_EXAMPLES.contains(&file.as_str()) {
            continue;
        }
        let parts: Vec<&str> = file.split('.').collect();
        let (schema, kind) = match parts.as_slice() {
            [schema, kind, n, "json"] if n.parse::<u32>().is_ok() => (*schema, *kind),
            _ => panic!("{file}: example names must be <schema>.(valid|invalid).<n>.json"),
        };
        assert!(
            SCHEMAS.iter().any(|(n, _)| *n == schema),
            "{file}: unknown schema {schema:?}"
        );
        let valid = match kind {
            "valid" => true,
            "invalid" => false,
            _ => panic!("{file}: expected .valid. or .invalid."),
        };
        let text = std::fs::read_to_string(&path).expect("read example");
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        out.entry(schema.to_owned())
            .or_default()
            .push(Example { file, valid, value });
    }
    out
}

fn valid_examples(schema: &str) -> Vec<Example> {
    examples()
        .remove(schema)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.valid)
        .collect()
}

/// deserialize → serialize → deserialize gives the same value; returns it and the
/// re-serialized JSON.
fn roundtrip<T: DeserializeOwned + Serialize + PartialEq + Debug>(
    file: &str,
    value: &Value,
) -> (T, Value) {
    let first: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file} does not deserialize: {e}"));
    let json = serde_json::to_value(&first).expect("serialize");
    let text = serde_json::to_string(&first).expect("serialize to text");
    let second: T = serde_json::from_value(json.clone()).expect("deserialize again");
    let third: T = serde_json::from_str(&text).expect("deserialize text again");
    assert_eq!(first, second, "{file}: value changed in a round trip");
    assert_eq!(first, third, "{file}: value changed in a text round trip");
    (first, json)
}

/// A keyring holding the test vector's public key.
fn vector_keyring() -> Keyring {
    let vector: Value = serde_json::from_str(VECTOR).expect("vector json");
    let mut ring = Keyring::new();
    ring.add_base64(
        vector["public_key_base64"].as_str().expect("public key"),
        vector["keyid"].as_str(),
    )
    .expect("vector key");
    ring
}

#[test]
fn schemas_are_draft_2020_12_documents() {
    for (name, _) in SCHEMAS {
        let schema = schema_value(name);
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!("{name}.schema.json is not a valid 2020-12 schema: {e}");
        }
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        assert_eq!(
            schema["$id"],
            format!("https://roost.dev/schemas/v1/{name}.schema.json"),
            "{name}"
        );
        for key in ["title", "description"] {
            assert!(
                schema[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name}.schema.json needs a {key}"
            );
        }
        // Compiles with format assertions on.
        let _ = validator(name);
    }
}

#[test]
fn examples_validate_against_their_schemas() {
    let all = examples();
    for (name, _) in SCHEMAS {
        let v = validator(name);
        let list = all.get(name).map(Vec::as_slice).unwrap_or_default();
        let n_valid = list.iter().filter(|e| e.valid).count();
        let n_invalid = list.len() - n_valid;
        assert!(
            n_valid >= 2,
            "{name}: need at least 2 valid examples, have {n_valid}"
        );
        assert!(
            n_invalid >= 3,
            "{name}: need at least 3 invalid examples, have {n_invalid}"
        );
        for ex in list {
            let errs = errors(&v, &ex.value);
            if ex.valid {
                assert!(errs.is_empty(), "{} should be valid: {errs:#?}", ex.file);
                assert!(v.is_valid(&ex.value), "{}", ex.file);
            } else {
                // Each invalid example breaks exactly one rule, so exactly one error is reported.
                assert_eq!(
                    errs.len(),
                    1,
                    "{} should break exactly one rule: {errs:#?}",
                    ex.file
                );
                assert!(!v.is_valid(&ex.value), "{}", ex.file);
            }
        }
    }
}

#[test]
fn every_invalid_example_is_listed_in_the_readme() {
    let readme = std::fs::read_to_string(format!("{EXAMPLES_DIR}/README.md")).expect("README.md");
    for ex in examples().values().flatten().filter(|e| !e.valid) {
        assert!(
            readme.contains(&format!("`{}`", ex.file)),
            "{} is not listed in examples/README.md",
            ex.file
        );
    }
}

#[test]
fn valid_rollouts_roundtrip_and_pass_rust_validation() {
    let v = validator("rollout");
    for ex in valid_examples("rollout") {
        let (r, json) = roundtrip::<Rollout>(&ex.file, &ex.value);
        r.validate()
            .unwrap_or_else(|e| panic!("{}: Rollout::validate: {e}", ex.file));
        // What Rust writes is valid too.
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn invalid_rollouts_are_rejected_by_rust_too() {
    let list = examples().remove("rollout").unwrap_or_default();
    for ex in list.into_iter().filter(|e| !e.valid) {
        let bytes = serde_json::to_vec(&ex.value).expect("serialize");
        assert!(
            Rollout::from_json(&bytes).is_err(),
            "{}: the schema rejects it but Rollout::from_json accepts it",
            ex.file
        );
    }
}

#[test]
fn snapshots_agree_with_rust_validation() {
    let v = validator("snapshot");
    for ex in valid_examples("snapshot") {
        let (s, json) = roundtrip::<Snapshot>(&ex.file, &ex.value);
        s.validate()
            .unwrap_or_else(|e| panic!("{}: Snapshot::validate: {e}", ex.file));
        assert_eq!(errors(&v, &json), Vec::<String>::new(), "{}", ex.file);
    }
    let list = examples().remove("snapshot").unwrap_or_default();
    for ex in list.into_iter().filter(|e| !e.valid) {
        let bytes = serde_json::to_vec(&ex.value).expect("serialize");
        assert!(
            Snapshot::from_json(&bytes).is_err(),
            "{}: the schema rejects it but Snapshot::from_json accepts it",
            ex.file
        );
    }
    // What the agent reports about a snapshot validates, and a signed snapshot verifies.
    let key = SigningKey::from_seed(&core::array::from_fn(|i| i as u8)).expect("key");
    let body = serde_json::to_vec(&valid_examples("snapshot")[0].value).expect("json");
    let env = key.sign(crate::SNAPSHOT_PAYLOAD_TYPE, &body);
    let ring = vector_keyring();
    assert_eq!(
        ring.verify(&env, crate::SNAPSHOT_PAYLOAD_TYPE)
            .expect("verify"),
        body
    );
    assert!(
        ring.verify(&env, PAYLOAD_TYPE).is_err(),
        "a snapshot is never a rollout"
    );
}

#[test]
fn valid_envelopes_roundtrip_verify_and_carry_valid_rollouts() {
    let env_v = validator("envelope");
    let rollout_v = validator("rollout");
    let ring = vector_keyring();
    for ex in valid_examples("envelope") {
        let (env, json) = roundtrip::<Envelope>(&ex.file, &ex.value);
        assert_eq!(
            errors(&env_v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
        let payload = B64
            .decode(env.payload.as_bytes())
            .unwrap_or_else(|e| panic!("{}: payload is not base64: {e}", ex.file));
        let payload_json: Value = serde_json::from_slice(&payload)
            .unwrap_or_else(|e| panic!("{}: payload is not JSON: {e}", ex.file));
        assert_eq!(
            errors(&rollout_v, &payload_json),
            Vec::<String>::new(),
            "{}: payload against rollout.schema.json",
            ex.file
        );
        Rollout::from_json(&payload).unwrap_or_else(|e| panic!("{}: payload: {e}", ex.file));
        // Every valid envelope example is signed (at least) by the test vector's key.
        assert_eq!(
            ring.verify(&env, PAYLOAD_TYPE)
                .unwrap_or_else(|e| panic!("{}: {e}", ex.file)),
            payload,
            "{}",
            ex.file
        );
    }
}

#[test]
fn valid_events_roundtrip() {
    let v = validator("event");
    for ex in valid_examples("event") {
        let (ev, json) = roundtrip::<CloudEvent>(&ex.file, &ex.value);
        assert!(
            ev.event_type().is_some(),
            "{}: unknown type {}",
            ex.file,
            ev.ty
        );
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn valid_status_documents_roundtrip() {
    let v = validator("status");
    for ex in valid_examples("status") {
        let (doc, json) = roundtrip::<StatusDoc>(&ex.file, &ex.value);
        validate_name(&doc.store).expect("store name");
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn valid_presence_documents_roundtrip() {
    let v = validator("presence");
    for ex in valid_examples("presence") {
        let (p, json) = roundtrip::<Presence>(&ex.file, &ex.value);
        assert!(crate::parse_rfc3339(&p.since).is_some(), "{}", ex.file);
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn valid_confirmations_roundtrip() {
    let v = validator("ack");
    for ex in valid_examples("ack") {
        let (_, json) = roundtrip::<crate::Confirmation>(&ex.file, &ex.value);
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn valid_cloud_confirmations_roundtrip() {
    let v = validator("confirmed");
    for ex in valid_examples("confirmed") {
        let (_, json) = roundtrip::<crate::Confirmed>(&ex.file, &ex.value);
        assert_eq!(
            errors(&v, &json),
            Vec::<String>::new(),
            "{} re-serialized",
            ex.file
        );
    }
}

#[test]
fn dsse_test_vector_matches_the_schemas_and_the_implementation() {
    let vector: Value = serde_json::from_str(VECTOR).expect("vector json");
    assert!(vector["description"]
        .as_str()
        .is_some_and(|d| d.contains("PAE")));
    let env = &vector["envelope"];
    assert_eq!(errors(&validator("envelope"), env), Vec::<String>::new());
    let payload_utf8 = vector["payload_utf8"].as_str().expect("payload_utf8");
    let payload: Value = serde_json::from_str(payload_utf8).expect("payload json");
    assert_eq!(
        errors(&validator("rollout"), &payload),
        Vec::<String>::new()
    );
    Rollout::from_json(payload_utf8.as_bytes()).expect("payload is a valid rollout");
    assert_eq!(vector["payload_type"], PAYLOAD_TYPE);
    assert_eq!(
        pae(PAYLOAD_TYPE, payload_utf8.as_bytes()),
        vector["pae_utf8"].as_str().expect("pae").as_bytes()
    );
    // The vector's envelope is also envelope.valid.1.json.
    let first = examples()
        .remove("envelope")
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.file == "envelope.valid.1.json")
        .expect("envelope.valid.1.json");
    assert_eq!(&first.value, env);
    // The seed is the documented one (bytes 0x00..0x1f).
    let seed: [u8; 32] = core::array::from_fn(|i| i as u8);
    assert_eq!(vector["seed_hex"], hex::encode(seed));
    let key = SigningKey::from_seed(&seed).expect("key");
    use sha2::Digest as _;
    assert_eq!(
        vector["keyid"].as_str().expect("keyid"),
        hex::encode(&sha2::Sha256::digest(key.public_key())[..8])
    );
}

/// The schema's path pattern and `normalize_path` accept the same paths.
#[test]
fn path_pattern_agrees_with_normalize_path() {
    let v = validator("rollout");
    let paths = [
        "",
        ".",
        "./",
        "apps",
        "apps/kitchen-display",
        "./apps//kitchen-display/",
        "apps/./x",
        "...",
        "a/...",
        "..a",
        "a..",
        "a/..b/c",
        "a/b..",
        ". /x",
        "ünïcödé/ok",
        "..",
        "../x",
        "a/..",
        "a/../b",
        "./..",
        "a//../b",
        "/",
        "/abs",
        "//x",
        "a\\b",
        "\\",
        "..\\x",
        "a\0b",
    ];
    for path in paths {
        let payload = json!({
            "deployment": "kitchen-display",
            "scope": {"fleet": true},
            "sequence": 1,
            "issued_at": "2026-11-26T10:00:00Z",
            "source": {
                "url": "git://git.example/fleet.git",
                "revision": "0123456789abcdef0123456789abcdef01234567",
                "path": path,
            },
        });
        let rust_ok = normalize_path(path).is_ok();
        assert_eq!(v.is_valid(&payload), rust_ok, "path {path:?}");
        let parsed = Rollout::from_json(&serde_json::to_vec(&payload).expect("ser"));
        assert_eq!(parsed.is_ok(), rust_ok, "path {path:?}");
    }
}

/// The schema's name pattern and `validate_name` accept the same names, in every place a name
/// appears.
#[test]
fn name_pattern_agrees_with_validate_name() {
    let rollout = validator("rollout");
    let status = validator("status");
    let a63 = "a".repeat(63);
    let a64 = "a".repeat(64);
    let names = [
        "a",
        "0",
        "store-0042",
        "kitchen-display",
        "a--b",
        a63.as_str(),
        "",
        "-a",
        "a-",
        "A",
        "a_b",
        "a.b",
        "a b",
        "a/b",
        "a:b",
        a64.as_str(),
        "ä",
        "a\n",
    ];
    for name in names {
        let ok = validate_name(name).is_ok();
        let r = json!({
            "deployment": name,
            "scope": {"group": name},
            "sequence": 1,
            "issued_at": "2026-11-26T10:00:00Z",
            "remove": true,
        });
        assert_eq!(rollout.is_valid(&r), ok, "rollout name {name:?}");
        let s = json!({
            "store": name,
            "agent_version": "0.1.0",
            "updated_at": "2026-11-26T10:00:00Z",
            "roostseq": 0,
            "outbox_backlog": 0,
            "deployments": {name: {"phase": "Pending", "desired": {
                "revision": "0123456789abcdef0123456789abcdef01234567",
                "sequence": 1,
                "scope": format!("store:{name}"),
            }}},
        });
        assert_eq!(status.is_valid(&s), ok, "status name {name:?}");
    }
}

/// Enumerations in the schemas list exactly what the Rust types know.
#[test]
fn enumerations_match_the_rust_types() {
    let event = schema_value("event");
    let types: Vec<&str> = event["properties"]["type"]["enum"]
        .as_array()
        .expect("type enum")
        .iter()
        .map(|t| t.as_str().expect("string"))
        .collect();
    let rust: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(types, rust);

    /// Fails to compile when a phase is added, as a reminder to update status.schema.json.
    fn phase_index(p: Phase) -> usize {
        match p {
            Phase::Pending => 0,
            Phase::Fetching => 1,
            Phase::Applying => 2,
            Phase::Progressing => 3,
            Phase::Converged => 4,
            Phase::Degraded => 5,
            Phase::Failed => 6,
            Phase::Removed => 7,
            Phase::Waiting => 8,
            Phase::RolledBack => 9,
        }
    }
    let phases = [
        Phase::Pending,
        Phase::Fetching,
        Phase::Applying,
        Phase::Progressing,
        Phase::Converged,
        Phase::Degraded,
        Phase::Failed,
        Phase::Removed,
        Phase::Waiting,
        Phase::RolledBack,
    ];
    let status = schema_value("status");
    let schema_phases = status["$defs"]["deploymentStatus"]["properties"]["phase"]["enum"]
        .as_array()
        .expect("phase enum")
        .clone();
    let rust_phases: Vec<Value> = phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            assert_eq!(phase_index(*p), i);
            assert_eq!(serde_json::to_value(p).expect("ser"), p.as_str());
            Value::from(p.as_str())
        })
        .collect();
    assert_eq!(schema_phases, rust_phases);
}

/// Events that report a problem need `data.reason`; the others do not, and every Rust reason
/// code fits the schema's reason pattern.
#[test]
fn reason_rules() {
    let v = validator("event");
    let needs_reason = [
        EventType::RolloutRejected,
        EventType::FetchFailed,
        EventType::ApplyFailed,
        EventType::Degraded,
        EventType::DriftDetected,
        EventType::OutboxOverflow,
        EventType::DesiredStale,
        EventType::ProfileRejected,
        EventType::Waiting,
        EventType::RolledBack,
    ];
    for t in EventType::ALL {
        let mut ev = CloudEvent::new(
            "roost://stores/store-0042/agent",
            t,
            Some("kitchen-display"),
            json!({"deployment": "kitchen-display"}),
        );
        ev.id = "e-1".into();
        ev.roostseq = 1;
        let without = serde_json::to_value(&ev).expect("ser");
        assert_eq!(
            v.is_valid(&without),
            !needs_reason.contains(&t),
            "{t} without reason"
        );
        ev.data["reason"] = json!(crate::Reason::Internal);
        ev.data["message"] = json!("detail");
        let with = serde_json::to_value(&ev).expect("ser");
        assert_eq!(errors(&v, &with), Vec::<String>::new(), "{t} with reason");
    }
    use crate::Reason::*;
    for r in [
        Malformed,
        Schema,
        BadSignature,
        UnknownKey,
        Replay,
        ScopeMismatch,
        TooLarge,
        SourceNotAllowed,
        PolicyDenied,
        RevisionNotFound,
        InvalidManifest,
        FetchFailed,
        ApplyFailed,
        PruneFailed,
        HealthTimeout,
        Drift,
        HookFailed,
        OutboxOverflow,
        SnapshotReplay,
        SnapshotExpired,
        DesiredStale,
        Window,
        Dependency,
        Internal,
    ] {
        let mut ev = CloudEvent::new(
            "roost://stores/store-0042/agent",
            EventType::RolloutRejected,
            None,
            json!({"reason": r, "message": "m"}),
        );
        ev.id = "e-2".into();
        ev.roostseq = 2;
        let value = serde_json::to_value(&ev).expect("ser");
        assert_eq!(errors(&v, &value), Vec::<String>::new(), "reason {r}");
    }
}

/// What the Rust signing code produces is a valid envelope.
#[test]
fn signed_envelopes_validate() {
    let v = validator("envelope");
    let key = SigningKey::from_seed(&[7u8; 32]).expect("key");
    for payload in [&b"{}"[..], b"x", b"xy", b"xyz", b"\x00\xff\xfe"] {
        let env = key.sign(PAYLOAD_TYPE, payload);
        let value = serde_json::to_value(&env).expect("ser");
        assert_eq!(errors(&v, &value), Vec::<String>::new(), "{payload:?}");
    }
}

/// Every typed payload, as the agent emits it, is a valid event under the published schema.
#[test]
fn typed_payloads_validate_against_the_event_schema() {
    use crate::payload::*;
    use crate::{EventData, Problem, Reason, RolloutRef};
    let v = validator("event");
    let r = RolloutRef {
        deployment: "kitchen-display".into(),
        revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
        sequence: 17,
        scope: "group:canary".into(),
    };
    let p = Problem {
        reason: Reason::TargetUnavailable,
        message: "API server unavailable".into(),
        retryable: true,
        retry_in_ms: Some(2000),
    };
    let all = vec![
        EventData::RolloutReceived(RolloutReceived {
            rollout: r.clone(),
            remove: false,
            not_before: None,
        }),
        EventData::RolloutRejected(RolloutRejected {
            deployment: Some("kitchen-display".into()),
            sequence: Some(17),
            topic: Some("roost/v1/fleet/deployments/kitchen-display".into()),
            revision: None,
            scope: None,
            reason: Reason::Replay,
            message: "m".into(),
            detail: Some(crate::reason::detail::SECRET_NOT_FOR_THIS_STORE.into()),
        }),
        EventData::FetchFailed(FetchFailed {
            rollout: r.clone(),
            problem: p.clone(),
        }),
        EventData::ApplyStarted(ApplyStarted {
            rollout: r.clone(),
            objects: 3,
            fetch_ms: Some(12),
            build_ms: Some(3),
        }),
        EventData::ApplySucceeded(ApplySucceeded {
            rollout: r.clone(),
            changed: vec!["/v1/ConfigMap/kitchen/settings".into()],
            unchanged: 2,
        }),
        EventData::ApplyFailed(ApplyFailed {
            rollout: r.clone(),
            problem: p,
        }),
        EventData::Converged(Converged { rollout: r.clone() }),
        EventData::Degraded(Degraded {
            rollout: r.clone(),
            reason: Reason::HealthTimeout,
            message: "m".into(),
            not_ready: vec!["x".into()],
        }),
        EventData::DriftDetected(DriftDetected {
            rollout: r.clone(),
            reason: Reason::Drift,
            message: "m".into(),
            items: vec!["x: data.value".into()],
        }),
        EventData::DriftCorrected(DriftCorrected {
            rollout: r.clone(),
            items: vec!["x".into()],
        }),
        EventData::Pruned(Pruned {
            rollout: r.clone(),
            pruned: vec!["x".into()],
        }),
        EventData::Removed(Removed {
            rollout: RolloutRef {
                revision: None,
                ..r.clone()
            },
        }),
        EventData::OutboxOverflow(OutboxOverflow {
            reason: Reason::OutboxOverflow,
            message: "m".into(),
            dropped_messages: 4,
            lost_count: 4,
            lost_from_roostseq: Some(8),
            lost_to_roostseq: Some(11),
            lost_ranges: vec![[8, 11]],
        }),
        EventData::DesiredStale(DesiredStale {
            reason: Reason::DesiredStale,
            message: "m".into(),
            snapshot_sequence: 1_795_000_000_200,
            snapshot_issued_at: "2026-11-26T10:03:10Z".into(),
            snapshot_expires: "2026-11-26T10:18:10Z".into(),
            topics: vec![
                StaleTopic {
                    topic: "roost/v1/fleet/deployments/kitchen-display".into(),
                    listed: 18,
                    held: Some(17),
                },
                StaleTopic {
                    topic: "roost/v1/groups/canary/deployments/kitchen-display".into(),
                    listed: 3,
                    held: None,
                },
            ],
        }),
        EventData::ProfileAccepted(ProfileAccepted {
            sequence: 1_795_000_000_300,
            groups: vec!["us-south".into()],
            previous_groups: vec!["us-east".into()],
            changed: vec!["groups".into(), "labels".into()],
        }),
        EventData::ProfileRejected(ProfileRejected {
            topic: "roost/v1/stores/store-0042/profile".into(),
            sequence: Some(3),
            reason: Reason::Replay,
            message: "m".into(),
        }),
        EventData::Waiting(Waiting {
            rollout: r.clone(),
            reason: Reason::Window,
            message: "m".into(),
            next_window: Some("2026-12-07T02:00:00-05:00".into()),
            waiting_for: vec![],
        }),
        EventData::RolledBack(RolledBack {
            rollout: r.clone(),
            failed_revision: "0123456789abcdef0123456789abcdef01234567".into(),
            restored_revision: "89abcdef0123456789abcdef0123456789abcdef".into(),
            reason: Reason::HookFailed,
            message: "m".into(),
        }),
    ];
    assert_eq!(
        all.len(),
        crate::EventType::ALL.len(),
        "one payload per event type"
    );
    for d in all {
        let ty = d.event_type();
        let mut ev = d.into_event("roost://stores/store-0042/agent");
        ev.id = "x".into();
        ev.roostseq = 1;
        let json = serde_json::to_value(&ev).expect("json");
        assert_eq!(errors(&v, &json), Vec::<String>::new(), "{ty}");
    }
}

#[test]
fn valid_fleet_files_parse_and_pass_the_rust_rules() {
    for ex in valid_examples("fleet") {
        let f: crate::fleet::FleetFile =
            serde_json::from_value(ex.value.clone()).expect("fleet file parses");
        f.validate().unwrap_or_else(|e| panic!("{}: {e}", ex.file));
    }
}

#[test]
fn inventory_entries_and_profiles_agree_with_rust_validation() {
    use crate::inventory::StoreEntry;
    use crate::Profile;
    for ex in valid_examples("store") {
        let (e, _) = roundtrip::<StoreEntry>(&ex.file, &ex.value);
        assert_eq!(e.validate(), Ok(()), "{}", ex.file);
    }
    for ex in valid_examples("profile") {
        let (p, _) = roundtrip::<Profile>(&ex.file, &ex.value);
        assert_eq!(p.validate(), Ok(()), "{}", ex.file);
    }
    let all = examples();
    for ex in all.get("store").into_iter().flatten().filter(|e| !e.valid) {
        let rust = serde_json::from_value::<StoreEntry>(ex.value.clone())
            .map_err(|e| e.to_string())
            .and_then(|e| e.validate().map_err(|e| e.to_string()));
        assert!(rust.is_err(), "{} is accepted by StoreEntry", ex.file);
    }
    for ex in all
        .get("profile")
        .into_iter()
        .flatten()
        .filter(|e| !e.valid)
    {
        let body = serde_json::to_vec(&ex.value).expect("json");
        assert!(
            Profile::from_payload(&body).is_err(),
            "{} is accepted by Profile",
            ex.file
        );
    }
}
