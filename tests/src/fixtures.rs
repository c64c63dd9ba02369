//! Test data and small helpers shared by the test binaries: the `web` app's manifests, file
//! lists for [`GitServer`](crate::harness::GitServer), shipped configuration files, free
//! ports, mosquitto, tools a test may skip without, and `roost up --once`.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_schemas::{CloudEvent, StatusDoc};

use crate::harness::roost_bin;

/// Borrows owned (path, content) pairs as the `&[(&str, &str)]` that
/// [`GitServer::start`](crate::harness::GitServer::start) and
/// [`GitServer::commit`](crate::harness::GitServer::commit) take.
pub fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

/// Where [`web_app`] puts the `web` app in a repository (a rollout's `source.path`).
pub const WEB_APP: &str = "apps/web";

/// Which files of the `web` app [`web_app`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Web {
    /// `apps/web/configmap.yaml` only.
    ConfigMap,
    /// The ConfigMap and `apps/web/deploy/deployment.yaml` (in a subdirectory).
    WithDeployment,
    /// Both, and `other/readme.txt`: a file outside the app's path, never deployed.
    WithDeploymentAndOutside,
}

/// The `web` app at `version` as (path, content) pairs for a repository: a ConfigMap `web`
/// whose `data.version` is `version`, and with [`Web::WithDeployment`] a Deployment `web`
/// (`replicas: 0`) labelled with it.
pub fn web_app(version: &str, files: Web) -> Vec<(String, String)> {
    let mut out = vec![(
        format!("{WEB_APP}/configmap.yaml"),
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  version: \"{version}\"\n"),
    )];
    if files != Web::ConfigMap {
        out.push((
            format!("{WEB_APP}/deploy/deployment.yaml"),
            format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 0\n  template:\n    metadata:\n      labels: {{app: web, v: \"{version}\"}}\n"),
        ));
    }
    if files == Web::WithDeploymentAndOutside {
        out.push(("other/readme.txt".into(), "not deployed".into()));
    }
    out
}

/// The `revision` an event names in its data, if any.
pub fn rev_of(e: &CloudEvent) -> Option<&str> {
    e.data.get("revision").and_then(|v| v.as_str())
}

/// A status document of `store` with no deployments, updated now; the other counters 0.
pub fn status_doc(store: &str, agent_version: &str, roostseq: u64) -> StatusDoc {
    StatusDoc {
        store: store.to_owned(),
        groups: Vec::new(),
        agent_version: agent_version.to_owned(),
        updated_at: roost_schemas::now_rfc3339(),
        roostseq,
        outbox_backlog: 0,
        heartbeat_s: None,
        profile_sequence: None,
        deployments: Default::default(),
        freshness: Default::default(),
    }
}

/// A free port on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    ([127, 0, 0, 1], roost_broker::free_port().expect("port")).into()
}

/// A shipped broker configuration file: `broker-config/NAME` of this checkout.
pub fn shipped(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../broker-config")
        .join(file)
}

/// For a test whose tool is not installed: under CI (`CI=true`) it fails the test with
/// `ci_message` (CI must run every test; `.ci/run` installs the tools); elsewhere it prints
/// `skip_message`, and the caller returns: the test is skipped.
pub fn skip_unless_ci(ci_message: &str, skip_message: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{ci_message}");
    eprintln!("{skip_message}");
}

/// Debian's mosquitto, or None when `test` may be skipped (absent, and not under CI; see
/// [`skip_unless_ci`]).
pub fn mosquitto_bin(test: &str) -> Option<&'static str> {
    let found = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if found.is_none() {
        skip_unless_ci(
            &format!("mosquitto is not installed, and CI must run {test} (.ci/run installs it)"),
            &format!("SKIPPED {test}: mosquitto is not installed (apt-get install -y mosquitto)"),
        );
    }
    found
}

/// Debian's `nats-server` (2.9: MQTT on JetStream), or None when `test` may be skipped
/// (absent, and not under CI; see [`skip_unless_ci`]).
pub fn nats_bin(test: &str) -> Option<&'static str> {
    let found = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if found.is_none() {
        skip_unless_ci(
            &format!("nats-server is not installed, and CI must run {test} (.ci/run installs it)"),
            &format!(
                "SKIPPED {test}: nats-server is not installed (apt-get install -y nats-server)"
            ),
        );
    }
    found
}

/// The reference `age` CLI (`age`, with `age-keygen` beside it), or None when `test` may be
/// skipped (absent, and not under CI; see [`skip_unless_ci`]).
pub fn age_bin(test: &str) -> Option<&'static str> {
    let found = ["/usr/bin/age", "/usr/local/bin/age"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if found.is_none() {
        skip_unless_ci(
            &format!("age is not installed, and CI must run {test} (.ci/run installs it)"),
            &format!("SKIPPED {test}: age is not installed (apt-get install -y age)"),
        );
    }
    found
}

/// Starts mosquitto (`bin`, see [`mosquitto_bin`]) with the configuration file `conf`, its
/// output discarded, and waits until it listens on `addr` (the conf's listener).
pub fn spawn_mosquitto(bin: &str, conf: &Path, addr: SocketAddr) -> std::process::Child {
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto");
    roost_broker::wait_listening(addr, Duration::from_secs(10)).expect("mosquitto listening");
    child
}

/// Runs `roost up --once ARGS… --state-dir STATE_DIR` to its end, with `ROOST_LOG=error` and
/// the variables `env`, and returns its output.
pub async fn roost_up_once(
    args: &[&str],
    state_dir: &Path,
    env: &[(&str, &OsStr)],
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(roost_bin());
    cmd.args(["up", "--once"])
        .args(args)
        .arg("--state-dir")
        .arg(state_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("ROOST_LOG", "error")
        .output()
        .await
        .expect("roost up --once")
}
