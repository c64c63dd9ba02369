//! The store inventory in force (`inventory`, replaced whole with the fleet file of the
//! same good commit, [`super::FleetDb::put_sync`]) and the store profiles the controller
//! published (`profiles`: what each store's last profile said, as a digest, so that an
//! unchanged store is not signed again).

use std::collections::BTreeMap;

use super::desired::{next_sequence_in, store};
use super::sql::{args, Conn};
use super::{DbError, FleetDb};
use crate::inventory::Inventory;
use roost_schemas::inventory::StoreEntry;
use roost_schemas::Labels;

/// The last profile the controller published for a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedProfile {
    /// Digest of its content ([`crate::inventory::ProfileContent::digest`]).
    pub digest: String,
    /// Its sequence.
    pub sequence: u64,
    /// Whether the store was in the inventory (false: the neutral profile of a store that
    /// left it).
    pub in_inventory: bool,
}

/// One profile to publish: for `store` on `topic`, with content `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfilePublication {
    /// Store.
    pub store: String,
    /// Its profile topic.
    pub topic: String,
    /// Digest of the content.
    pub digest: String,
    /// Whether the store is in the inventory.
    pub in_inventory: bool,
}

/// The inventory in force.
pub fn inventory(c: &Conn<'_>) -> Result<Inventory, DbError> {
    let mut stores = BTreeMap::new();
    for row in c.query("SELECT store, entry FROM inventory ORDER BY store", &[])? {
        let (name, json): (String, String) = (row.get(0)?, row.get(1)?);
        if let Ok(entry) = serde_json::from_str::<StoreEntry>(&json) {
            stores.insert(name, entry);
        }
    }
    Ok(Inventory { stores })
}

/// Every inventory store's labels (stores outside the inventory have none).
pub fn labels(c: &Conn<'_>) -> Result<BTreeMap<String, Labels>, DbError> {
    Ok(inventory(c)?
        .stores
        .into_iter()
        .map(|(name, e)| (name, e.labels))
        .collect())
}

/// The profiles published so far, by store.
pub fn profiles(c: &Conn<'_>) -> Result<BTreeMap<String, PublishedProfile>, DbError> {
    c.query(
        "SELECT store, digest, sequence, in_inventory FROM profiles ORDER BY store",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok((
            r.get(0)?,
            PublishedProfile {
                digest: r.get(1)?,
                sequence: r.get(2)?,
                in_inventory: r.get(3)?,
            },
        ))
    })
    .collect()
}

/// The profile topics the record holds desired state for (a tombstoned one it does not).
pub fn held_profile_topics(c: &Conn<'_>) -> Result<std::collections::BTreeSet<String>, DbError> {
    Ok(c.query(
        "SELECT topic FROM desired WHERE topic LIKE '%/profile'",
        &[],
    )?
    .iter()
    .map(|r| r.get::<String>(0))
    .collect::<Result<Vec<String>, _>>()?
    .into_iter()
    .filter(|t| roost_schemas::snapshot::profile_topic_tail(t).is_some())
    .collect())
}

/// Replaces the inventory in force, inside a caller's transaction.
pub(super) fn replace_inventory(c: &Conn<'_>, inv: &Inventory) -> Result<(), DbError> {
    c.execute("DELETE FROM inventory", &[])?;
    for (name, entry) in &inv.stores {
        let json = serde_json::to_string(entry).map_err(|source| DbError::Encode {
            what: "an inventory entry",
            source,
        })?;
        c.execute(
            "INSERT INTO inventory(store, entry) VALUES (?1, ?2)",
            args![name, json],
        )?;
    }
    Ok(())
}

impl FleetDb {
    /// Records the profiles the controller is about to publish, in one transaction: for
    /// each the next sequence on its topic, the envelope `sign(publication, sequence)` makes
    /// as the topic's desired state, and what it said. Returns (topic, envelope) in order;
    /// nothing is recorded if signing fails.
    pub fn record_profiles<E: From<DbError>>(
        &self,
        publications: &[ProfilePublication],
        mut sign: impl FnMut(&ProfilePublication, u64) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<(String, Vec<u8>)>, E> {
        self.transaction(|tx| {
            let now = roost_schemas::now_rfc3339();
            let mut out = Vec::with_capacity(publications.len());
            for p in publications {
                let sequence = next_sequence_in(tx, &p.topic)?;
                let envelope = sign(p, sequence)?;
                store(tx, &p.topic, sequence, &envelope)?;
                tx.execute(
                    "INSERT INTO profiles(store, digest, sequence, in_inventory, published_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(store) DO UPDATE SET digest = excluded.digest,
                       sequence = excluded.sequence, in_inventory = excluded.in_inventory,
                       published_at = excluded.published_at",
                    args![&p.store, &p.digest, sequence, p.in_inventory, &now],
                )?;
                out.push((p.topic.clone(), envelope));
            }
            Ok(out)
        })
    }

    /// Forgets the profile published for `store` (it was retired: its topic tombstoned).
    pub fn forget_profile(&self, store: &str) -> Result<(), DbError> {
        self.transaction(|c| {
            c.execute("DELETE FROM profiles WHERE store = ?1", args![store])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, region: &str) -> StoreEntry {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "roost.dev/v1alpha1", "kind": "Store", "name": name,
            "labels": {"region": region}, "vars": {"n": name}
        }))
        .expect("entry")
    }

    #[test]
    fn the_inventory_is_replaced_whole_and_profiles_get_sequences() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("fleet.db")).expect("db");
        let mut inv = Inventory::default();
        inv.stores.insert("s1".into(), entry("s1", "east"));
        inv.stores.insert("s2".into(), entry("s2", "west"));
        let file: roost_schemas::fleet::FleetFile = serde_json::from_value(serde_json::json!({
            "apiVersion": "roost.dev/v1alpha1", "kind": "Fleet", "deployments": {}
        }))
        .expect("file");
        db.put_sync("git://h/fleet", &"a".repeat(40), Ok((&file, Some(&inv))))
            .expect("sync");
        inv.stores.remove("s1");
        db.put_sync("git://h/fleet", &"b".repeat(40), Ok((&file, Some(&inv))))
            .expect("sync");
        // A commit with the same `stores/` tree keeps the inventory in force.
        db.put_sync("git://h/fleet", &"d".repeat(40), Ok((&file, None)))
            .expect("sync");
        // A bad commit leaves the inventory in force alone.
        db.put_sync("git://h/fleet", &"c".repeat(40), Err("stores/x.yaml: bad"))
            .expect("sync");
        let (held, labels) = db
            .with_conn(|c| Ok((inventory(c)?, self::labels(c)?)))
            .expect("read");
        assert_eq!(held, inv);
        assert_eq!(labels["s2"]["region"], "west");

        let pubs = [ProfilePublication {
            store: "s2".into(),
            topic: "roost/v1/stores/s2/profile".into(),
            digest: "d1".into(),
            in_inventory: true,
        }];
        let out = db
            .record_profiles(&pubs, |_, seq| {
                Ok::<_, DbError>(seq.to_string().into_bytes())
            })
            .expect("record");
        let first: u64 = String::from_utf8(out[0].1.clone())
            .expect("utf8")
            .parse()
            .expect("seq");
        db.record_profiles(&pubs, |_, seq| {
            assert!(seq > first, "sequences increase");
            Ok::<_, DbError>(b"x".to_vec())
        })
        .expect("again");
        let p = db.with_conn(profiles).expect("profiles");
        assert!(p["s2"].sequence > first && p["s2"].in_inventory);
        // A failed signature records nothing.
        let e = db.record_profiles(&pubs, |_, _| {
            Err(DbError::Encode {
                what: "a test",
                source: serde_json::from_str::<u8>("x").expect_err("not json"),
            })
        });
        assert!(e.is_err());
        assert_eq!(db.with_conn(profiles).expect("profiles"), p);
        db.forget_profile("s2").expect("forget");
        assert!(db.with_conn(profiles).expect("profiles").is_empty());
    }
}
