//! One round trip through every table's write and read paths, for the tests of both engines:
//! the unit tests run it on SQLite, `tests/tests/postgres.rs` on a real PostgreSQL. Each
//! check panics with what differed (test support, not a runtime path).

use roost_schemas::{CloudEvent, EventType, Topics};

use super::gitops::{self, Published, Request};
use super::inventory::{self, ProfilePublication};
use super::{DbError, FleetDb, FleetItem, Gap};
use crate::gitops::plan::{Plan, Release};

fn event(store: &str, id: &str, seq: u64) -> (String, CloudEvent, String) {
    let mut e = CloudEvent::new(
        &format!("roost://stores/{store}/agent"),
        EventType::ApplyStarted,
        Some("web"),
        serde_json::json!({}),
    );
    e.id = id.into();
    e.roostseq = seq;
    let json = serde_json::to_string(&e).expect("json");
    (store.to_owned(), e, json)
}

fn envelope(seq: u64) -> Vec<u8> {
    let key = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
    serde_json::to_vec(&key.sign(
        roost_schemas::PAYLOAD_TYPE,
        format!("{{\"sequence\":{seq}}}").as_bytes(),
    ))
    .expect("json")
}

fn status(store: &str) -> String {
    serde_json::to_string(&roost_schemas::StatusDoc {
        store: store.to_owned(),
        agent_version: "t".into(),
        updated_at: roost_schemas::now_rfc3339(),
        roostseq: 1,
        outbox_backlog: 0,
        heartbeat_s: None,
        profile_sequence: None,
        deployments: Default::default(),
        freshness: Default::default(),
        groups: vec!["canary".into()],
    })
    .expect("json")
}

/// Runs every write and read path of [`FleetDb`] on a new, empty database.
pub fn round_trip(db: &FleetDb) {
    let topics = Topics::default();
    // Events: deduplicated by id, gaps, counts, pages.
    assert_eq!(
        db.record_events(&[
            event("s1", "a", 1),
            event("s1", "b", 2),
            event("s1", "a", 1)
        ])
        .expect("events"),
        2
    );
    let (_, e5, j5) = event("s1", "e", 5);
    let out = db
        .record_batch(&[
            FleetItem::Event("s1".into(), Box::new(e5), j5),
            FleetItem::Status("s1".into(), status("s1")),
            FleetItem::Presence("s1".into(), r#"{"state":"online"}"#.into()),
            FleetItem::Status("s2".into(), status("s2")),
            FleetItem::Desired("roost/v1/fleet/deployments/web".into(), envelope(5)),
        ])
        .expect("batch");
    assert_eq!(out.new_events, 1);
    let c = db.counts().expect("counts");
    assert_eq!((c.events, c.duplicates), (3, 1));
    assert_eq!(
        db.gaps().expect("gaps"),
        vec![Gap {
            store: "s1".into(),
            from: 3,
            to: 4
        }]
    );
    let seqs: Vec<u64> = db
        .events("s1")
        .expect("events")
        .iter()
        .map(|e| e.roostseq)
        .collect();
    assert_eq!(seqs, [1, 2, 5]);
    assert_eq!(db.recent_events(2).expect("recent").len(), 2);
    assert_eq!(db.stores().expect("stores"), ["s1", "s2"]);
    assert_eq!(db.status_messages(&topics).expect("status").len(), 3);
    let (page, more) = db
        .with_conn(|c| {
            crate::api::events_page(
                c,
                &crate::api::EventRange {
                    store: Some("s1".into()),
                    limit: 2,
                    ..Default::default()
                },
            )
        })
        .expect("page");
    assert_eq!((page.len(), more), (2, true));
    let marks = db.confirmation_watermarks().expect("watermarks");
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].1.upto(), 2);
    // Desired state: the newest envelope wins, the broker's older one is reported.
    assert!(!db
        .record_desired("roost/v1/fleet/deployments/web", &envelope(3))
        .expect("older"));
    assert!(db
        .record_desired("roost/v1/fleet/deployments/web", &envelope(6))
        .expect("newer"));
    let out = db
        .record_batch(&[FleetItem::Desired(
            "roost/v1/fleet/deployments/web".into(),
            envelope(4),
        )])
        .expect("batch");
    assert_eq!(out.regressed.len(), 1);
    let a = db.next_sequence("t").expect("seq");
    assert!(db.next_sequence("t").expect("seq") > a);

    // The controller: sync, inventory, plans, publications, requests, revisions, profiles.
    let mut inv = crate::inventory::Inventory::default();
    inv.stores.insert(
        "s1".into(),
        serde_json::from_value(serde_json::json!({
            "apiVersion": "roost.dev/v1alpha1", "kind": "Store", "name": "s1",
            "labels": {"region": "east"}
        }))
        .expect("entry"),
    );
    let file: roost_schemas::fleet::FleetFile = serde_json::from_value(serde_json::json!({
        "apiVersion": "roost.dev/v1alpha1", "kind": "Fleet", "deployments": {}
    }))
    .expect("file");
    let commit = "a".repeat(40);
    db.put_sync("git://h/fleet", &commit, Ok((&file, Some(&inv))))
        .expect("sync");
    db.put_sync("git://h/fleet", &"b".repeat(40), Err("bad"))
        .expect("bad sync");
    db.touch_sync().expect("touch");
    let (sync, labels, held) = db
        .with_conn(|c| {
            Ok((
                gitops::sync_state(c)?,
                inventory::labels(c)?,
                inventory::inventory(c)?,
            ))
        })
        .expect("read");
    let (s, f) = sync.expect("sync state");
    assert!(!s.ok && s.good_commit.as_deref() == Some(commit.as_str()) && f.is_some());
    assert_eq!(labels["s1"]["region"], "east");
    assert_eq!(held, inv);
    let release = Release {
        url: "git://h/apps".into(),
        revision: "c".repeat(40),
        path: "apps/web".into(),
        policy: Default::default(),
        not_before: None,
        schedule: Default::default(),
    };
    let plan = Plan::new(
        "web",
        release,
        None,
        &commit,
        Vec::new(),
        Default::default(),
        1,
    );
    let sent = db
        .record_publications(
            vec![Published {
                topic: "roost/v1/groups/canary/deployments/web".into(),
                deployment: "web".into(),
                role: "wave".into(),
                revision: Some("c".repeat(40)),
                remove: false,
                sequence: 0,
            }],
            Some(&plan),
            |_, p| Ok::<_, DbError>(envelope(p.sequence)),
        )
        .expect("publish");
    assert_eq!(sent.len(), 1);
    let (plans, published, view) = db
        .with_conn(|c| {
            Ok((
                gitops::plans(c)?,
                gitops::published(c)?,
                gitops::view(c, "web")?,
            ))
        })
        .expect("read");
    assert_eq!(plans.get("web"), Some(&plan));
    let text = crate::gitops::plan_status_text(db, None).expect("plan status");
    assert!(text.contains("web") && text.contains("running"), "{text}");
    assert_eq!(published.len(), 1);
    assert!(published[0].sequence > 0 && !published[0].remove);
    assert_eq!(view.len(), 2, "both stores that sent status");
    assert_eq!(view[0].groups, ["canary"]);
    db.delete_plan("web").expect("delete");
    assert!(db.with_conn(gitops::plans).expect("plans").is_empty());
    db.request(&Request::Pause("web".into())).expect("request");
    db.request(&Request::Sync).expect("request");
    assert_eq!(
        db.take_requests().expect("take"),
        [Request::Pause("web".into()), Request::Sync]
    );
    assert!(db.take_requests().expect("take").is_empty());
    db.put_revision("r1", "git://h/apps", "subject", "2026-01-01T00:00:00Z")
        .expect("revision");
    assert_eq!(db.revisions().expect("revisions")["r1"].0, "subject");
    let pubs = [ProfilePublication {
        store: "s1".into(),
        topic: topics.profile("s1"),
        digest: "d1".into(),
        in_inventory: true,
    }];
    db.record_profiles(&pubs, |_, seq| Ok::<_, DbError>(envelope(seq)))
        .expect("profiles");
    let (profiles, profile_topics) = db
        .with_conn(|c| Ok((inventory::profiles(c)?, inventory::held_profile_topics(c)?)))
        .expect("read");
    assert!(profiles["s1"].in_inventory);
    assert!(profile_topics.contains(&topics.profile("s1")));
    db.forget_profile("s1").expect("forget");

    // The broker audit and the views over everything.
    db.record_audit("connection", 2, &["t".into()])
        .expect("audit");
    let a = db.record_audit("interval", 3, &[]).expect("audit");
    assert_eq!((a.audits, a.repaired_total), (2, 1));
    assert_eq!(db.last_audit().expect("audit"), Some(a));
    let inputs = crate::view::load(db).expect("view");
    assert_eq!(inputs.status.len(), 2);
    crate::api::source::snapshot(db).expect("api snapshot");
    notifications(db);
    let history = db.with_conn(super::schema::history).expect("history");
    assert_eq!(history.len(), super::schema::MIGRATIONS.len());
}

/// The notifications' queue: events recorded by the writers of the facts (the plan, the
/// invalid commit and a store's failure above), once per key; taken into messages in one
/// transaction; attempts, retries, giving up, counts and pruning.
fn notifications(db: &FleetDb) {
    use crate::notify::{Kind, NotifyEvent};
    let (_, mut failed, json) = event("s8", "f1", 1);
    failed.ty = EventType::ApplyFailed.as_str().into();
    let json = json.replace(
        EventType::ApplyStarted.as_str(),
        EventType::ApplyFailed.as_str(),
    );
    db.record_events(&[("s8".into(), failed.clone(), json.clone())])
        .expect("failure");
    db.record_events(&[("s8".into(), failed, json)])
        .expect("the same failure again");
    let stale = crate::notify::stale_events(
        &[("s8".into(), 1)],
        10_000_000,
        std::time::Duration::from_secs(1),
    );
    assert_eq!(db.record_notify_events(&stale).expect("stale"), 1);
    assert_eq!(db.record_notify_events(&stale).expect("stale again"), 0);
    // Not ready yet: nothing taken.
    assert_eq!(
        db.take_notify_events(0, 0, 0, |_| unreachable!())
            .expect("early"),
        (0, 0)
    );
    let mut seen: Vec<NotifyEvent> = Vec::new();
    let queued = db
        .take_notify_events(u64::MAX, 0, 0, |events| {
            seen = events.to_vec();
            let wanted = |_: Kind| true;
            let mut out: Vec<(String, crate::notify::Message)> =
                crate::notify::coalesce("hook", crate::notify::SinkKind::Webhook, wanted, events)
                    .into_iter()
                    .map(|m| ("hook".to_owned(), m))
                    .collect();
            out.extend(
                crate::notify::coalesce("gh", crate::notify::SinkKind::Github, wanted, events)
                    .into_iter()
                    .map(|m| ("gh".to_owned(), m)),
            );
            out
        })
        .expect("take");
    let kinds: Vec<Kind> = seen.iter().map(|e| e.kind).collect();
    for k in [
        Kind::InvalidCommit,
        Kind::PlanStarted,
        Kind::StoreFailed,
        Kind::StoreStale,
    ] {
        assert_eq!(
            kinds.iter().filter(|x| **x == k).count(),
            1,
            "{k:?} in {kinds:?}"
        );
    }
    // One webhook message; a commit status for the plan's commit and the invalid one.
    assert_eq!(queued, (3, 0));
    assert_eq!(
        db.take_notify_events(u64::MAX, 0, 0, |_| unreachable!())
            .expect("again"),
        (0, 0)
    );
    let due = db.due_notifications(i64::MAX as u64, 10).expect("due");
    assert_eq!(due.len(), 3);
    let hook = due.iter().find(|d| d.sink == "hook").expect("hook");
    assert_eq!(hook.events as usize, seen.len());
    db.notify_attempted(hook.id, Some("h answered 500"), 5, false)
        .expect("failed attempt");
    db.notify_attempted(due[1].id, Some("h answered 500"), 5, true)
        .expect("given up");
    db.notify_attempted(due[2].id, None, 0, false)
        .expect("sent");
    let counts = db
        .with_conn(super::notify::delivery_counts)
        .expect("counts");
    assert_eq!(
        (
            counts.queued,
            counts.retrying,
            counts.sent,
            counts.failed,
            counts.failed_attempts
        ),
        (1, 1, 1, 1, 2)
    );
    assert_eq!(db.due_notifications(4, 10).expect("not due").len(), 0);
    let again = db.due_notifications(5, 10).expect("due again");
    assert_eq!(
        (again.len(), again[0].key.as_str(), again[0].attempts),
        (1, hook.key.as_str(), 1)
    );
    db.notify_attempted(again[0].id, None, 0, false)
        .expect("sent");
    let list = db
        .with_conn(|c| super::notify::deliveries(c, 10))
        .expect("list");
    assert_eq!(list.len(), 3);
    assert!(list
        .iter()
        .any(|d| d.state == "failed" && d.last_error.contains("500")));
    db.prune_notifications(i64::MAX as u64).expect("prune");
    assert!(db
        .with_conn(|c| super::notify::deliveries(c, 10))
        .expect("list")
        .is_empty());
}
