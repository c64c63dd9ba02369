//! `roost bench inventory`: the controller's work on a large store inventory, in this
//! process, no I/O: N stores in `stores/*.yaml` (several files, several documents each) and a
//! fleet file with groups defined by store list and label selectors, a deployment limited by
//! `targets:` and waves by group, selector, percentage and fleet. Timed: parsing and
//! validating the inventory (schema, rules, time zones), parsing the fleet file, each
//! store's profile content (its groups in precedence order), and a plan's first steps over
//! the whole fleet. Prints the figures; asserts nothing about them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use roost_fleet::gitops::parse_fleet_file;
use roost_fleet::gitops::plan::{self, Plan, Release, StoreView};
use roost_fleet::inventory;
use roost_schemas::fleet::FleetFile;
use roost_schemas::Policy;

use super::BenchError;

/// Options.
#[derive(Debug, Clone)]
pub struct InventoryOptions {
    /// Stores in the inventory.
    pub stores: usize,
}

const REGIONS: [&str; 4] = ["us-east", "us-south", "us-west", "eu-west"];
const ZONES: [&str; 4] = [
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
    "Europe/Berlin",
];

/// The generated inventory: one file per region, one document per store.
pub(crate) fn inventory_files(n: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for i in 1..=n {
        let r = i % REGIONS.len();
        let doc = format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: store-{i:05}\n\
             labels: {{region: {region}, format: {format}, pos: v{pos}}}\n\
             timezone: {tz}\nvars: {{store_number: \"{i:05}\", printer_ip: 10.{a}.{b}.17}}\n---\n",
            region = REGIONS[r],
            format = if i % 3 == 0 { "drive-thru" } else { "dine-in" },
            pos = 6 + i % 3,
            tz = ZONES[r],
            a = (i / 250) % 250,
            b = i % 250,
        );
        files
            .entry(format!("stores/{}.yaml", REGIONS[r]))
            .or_default()
            .push_str(&doc);
    }
    files
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect()
}

const FLEET: &str = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups:
  canary: {stores: [store-00001, store-00002, store-00003]}
  us-south: {selector: {region: us-south}}
  new-pos:
    selector:
      matchExpressions: [{key: pos, operator: In, values: [v7, v8]}]
  us: {selector: {matchExpressions: [{key: region, operator: In, values: [us-east, us-south, us-west]}]}}
deployments:
  kitchen-display:
    source: {url: git://h/apps, ref: main, path: apps/kitchen-display}
    waves:
      - {name: canary, group: canary}
      - {name: texas, selector: {region: us-south, format: drive-thru}}
      - {name: tenth, percent: 10}
      - {name: everyone, fleet: true}
  drive-thru-board:
    source: {url: git://h/apps, ref: main, path: apps/board}
    targets: {selector: {format: drive-thru}}
    waves:
      - {name: us, group: us}
      - {name: everyone, fleet: true}
";

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(opts: &InventoryOptions) -> Result<serde_json::Value, BenchError> {
    let n = opts.stores.max(1);
    let files = inventory_files(n);
    let bytes: usize = files.values().map(Vec::len).sum();
    let n_files = files.len();
    let handle = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, BenchError> {
        let started = Instant::now();
        let t = Instant::now();
        let inv = inventory::parse(&files)
            .map_err(|e| BenchError::Invalid(format!("generated inventory: {e}")))?;
        let parse_ms = ms(t);
        let t = Instant::now();
        let fleet: FleetFile = parse_fleet_file(FLEET.as_bytes())
            .map_err(|e| BenchError::Invalid(format!("fleet file: {e}")))?;
        let fleet_ms = ms(t);
        let t = Instant::now();
        let groups = fleet.groups.clone();
        let profiles =
            inv.profiles(|name, labels| groups.as_ref().and_then(|g| g.of(name, labels)));
        let profiles_ms = ms(t);
        let t = Instant::now();
        let view: Vec<StoreView> = inv
            .stores
            .values()
            .map(|e| StoreView {
                store: e.name.clone(),
                groups: profiles
                    .get(&e.name)
                    .and_then(|p| p.groups.clone())
                    .unwrap_or_default(),
                labels: e.labels.clone(),
                online: true,
                status: None,
            })
            .collect();
        let mut published = 0usize;
        let mut wave_stores = 0usize;
        for (name, d) in &fleet.deployments {
            let Some(src) = &d.source else { continue };
            let release = Release {
                schedule: Default::default(),
                url: src.url.clone(),
                revision: "a".repeat(40),
                path: src.path.clone(),
                policy: d.policy.clone().unwrap_or_else(Policy::default),
                not_before: None,
            };
            let mut p = Plan::new(
                name,
                release,
                None,
                "bench",
                FleetFile::waves_of(d),
                d.abort.clone().unwrap_or_default(),
                0,
            );
            p.targets = d.targets.as_ref().map(|t| t.selector.clone());
            published += plan::step(&mut p, &view, &BTreeSet::new(), 1).len();
            published += plan::follow_targets(&mut p, &view, &BTreeSet::new()).len();
            wave_stores += p.wave_stores.iter().map(Vec::len).sum::<usize>();
        }
        let plan_ms = ms(t);
        // What the controller does with a new inventory: a digest per store (to publish only
        // what changed) and, the first time, a signed profile for every store.
        let t = Instant::now();
        let key = roost_schemas::SigningKey::generate()
            .map_err(|e| BenchError::Invalid(format!("key: {e}")))?;
        let mut signed_bytes = 0usize;
        for (store, content) in &profiles {
            let _ = content.digest();
            let env = roost_fleet::sign::sign_profile(
                std::slice::from_ref(&key),
                &content.profile(store, 1),
            )
            .map_err(|e| BenchError::Invalid(format!("profile: {e}")))?;
            signed_bytes += env.len();
        }
        let sign_ms = ms(t);
        let total_ms = ms(started);
        // What a commit of the inventory costs before anything is signed: the figure the
        // controller's poll has to stay under.
        let decide_ms = parse_ms + fleet_ms + profiles_ms + plan_ms;
        let in_groups = profiles
            .values()
            .filter(|p| p.groups.as_ref().is_some_and(|g| !g.is_empty()))
            .count();
        println!(
            "inventory: {n} stores, {} files, {:.1} MiB: parse+validate {parse_ms:.0} ms, fleet file {fleet_ms:.1} ms, \
             profiles {profiles_ms:.0} ms ({in_groups} stores in a group), first plan steps {plan_ms:.0} ms \
             ({published} publishes, {wave_stores} stores in first waves), every profile digested and signed {sign_ms:.0} ms \
             ({:.1} MiB); parse, validate and plan {decide_ms:.0} ms; total {total_ms:.0} ms",
            n_files,
            bytes as f64 / (1 << 20) as f64,
            signed_bytes as f64 / (1 << 20) as f64,
        );
        Ok(serde_json::json!({
            "bench": "inventory",
            "stores": n,
            "bytes": bytes,
            "parse_validate_ms": parse_ms,
            "fleet_file_ms": fleet_ms,
            "profiles_ms": profiles_ms,
            "plan_ms": plan_ms,
            "digest_sign_ms": sign_ms,
            "parse_validate_plan_ms": decide_ms,
            "total_ms": total_ms,
            "stores_in_a_group": in_groups,
            "first_publishes": published,
        }))
    });
    handle
        .await
        .map_err(|e| BenchError::Failed(format!("benchmark task: {e}")))?
}
