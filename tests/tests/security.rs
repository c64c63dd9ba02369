//! Transport and authorization: stores converge over mutual-TLS links (mosquitto
//! as the cloud broker with the shipped ACL; rumqttd and mosquitto as edge brokers), a wrong
//! CA, an expired certificate and a refused password are explained and retried, the shipped
//! mosquitto ACLs confine each identity, and `roost broker` refuses an exposed listener.
//!
//! Certificates are made here with rcgen: a CA, a server certificate for 127.0.0.1, client
//! certificates per identity (the Common Name is the identity mosquitto authorizes), an
//! expired one and one from another CA. Tests that need mosquitto skip when it is absent,
//! except under CI, where they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use roost_fleet::cloud::BrokerTarget;
use roost_runtime::{Security, TlsFiles};
use roost_schemas::{Scope, Topics};
use roost_tests::fixtures::{free_addr, mosquitto_bin, refs, shipped, web_app, Web, WEB_APP};
use roost_tests::harness::{self, eventually, GitServer, Observer, RoostProcess, Signer, StoreRig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const T: Duration = Duration::from_secs(60);
const APP: &str = WEB_APP;

// ---------------------------------------------------------------------------------------------
// Certificates

/// A test certificate authority writing PEM files into a directory.
struct Pki {
    dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as files.
#[derive(Clone)]
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

fn validity(p: &mut CertificateParams, expired: bool) {
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(2);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(1);
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name = common_name(&format!("roost test CA {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, false);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA");
        let pki = Pki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write CA");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for `cn`: a server certificate for 127.0.0.1 and localhost, or a client
    /// certificate (optionally expired).
    fn issue(&self, cn: &str, server: bool, expired: bool) -> Pair {
        let sans: Vec<String> = if server {
            vec!["127.0.0.1".into(), "localhost".into()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name = common_name(cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, expired);
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &*self.ca).expect("sign");
        let stem = format!(
            "{}-{cn}{}",
            self.name,
            if expired { "-expired" } else { "" }
        );
        let pair = Pair {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }

    /// TLS files for a client with `pair` (mutual TLS) trusting this CA.
    fn client_tls(&self, pair: &Pair) -> TlsFiles {
        TlsFiles {
            ca_file: Some(self.ca_file()),
            cert_file: Some(pair.cert.clone()),
            key_file: Some(pair.key.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// A mosquitto process with a TLS listener (settings given) and a plain, anonymous loopback
/// listener for test observers, each with its own settings (`per_listener_settings`).
struct Mosquitto {
    child: std::process::Child,
    tls: SocketAddr,
    plain: SocketAddr,
    log: PathBuf,
}

impl Mosquitto {
    fn start(bin: &str, dir: &Path, name: &str, tls_settings: &str) -> Mosquitto {
        let tls = free_addr();
        let plain = free_addr();
        let conf = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        // `user root`: as root, mosquitto would otherwise switch to the `mosquitto` user, which
        // cannot read the test's temporary files. It has no effect for other users.
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\nuser root\npersistence false\nlog_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 listener {tp} 127.0.0.1\n{tls_settings}\n\
                 listener {pp} 127.0.0.1\nallow_anonymous true\n",
                tp = tls.port(),
                pp = plain.port(),
            ),
        )
        .expect("mosquitto.conf");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("mosquitto");
        let m = Mosquitto {
            child,
            tls,
            plain,
            log,
        };
        for a in [tls, plain] {
            if roost_broker::wait_listening(a, Duration::from_secs(10)).is_err() {
                panic!(
                    "mosquitto {name} is not listening on {a}:\n{}",
                    m.log_text()
                );
            }
        }
        m
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto TLS listener settings: mutual TLS (client certificates required, the CN is the
/// username) and an ACL file.
fn mtls_settings(pki: &Pki, server: &Pair, acl: &Path) -> String {
    mtls_settings_of(&pki.ca_file(), server, acl)
}

/// [`mtls_settings`] with the CA certificate file `ca`.
fn mtls_settings_of(ca: &Path, server: &Pair, acl: &Path) -> String {
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\nacl_file {}\n",
        ca.display(),
        server.cert.display(),
        server.key.display(),
        acl.display()
    )
}

/// A rumqttd (`roost broker`'s engine) edge broker in this process with a mutual-TLS listener.
fn rumqttd_tls_edge(pki: &Pki, server: &Pair) -> SocketAddr {
    let addr = free_addr();
    let text = format!(
        "id = 0\n[router]\nmax_connections = 100\nmax_outgoing_packet_count = 200\nmax_segment_size = 1048576\nmax_segment_count = 4\n\
         [v4.1]\nname = \"edge-tls\"\nlisten = \"{addr}\"\nnext_connection_delay_ms = 1\n\
         [v4.1.tls]\ncapath = \"{}\"\ncertpath = \"{}\"\nkeypath = \"{}\"\n\
         [v4.1.connections]\nconnection_timeout_ms = 30000\nmax_payload_size = 1048576\nmax_inflight_count = 100\ndynamic_filters = true\n",
        pki.ca_file().display(),
        server.cert.display(),
        server.key.display(),
    );
    let cfg = roost_broker::parse_config(&text, "edge-tls").expect("config");
    roost_broker::check_config(&cfg, "edge-tls", false).expect("TLS files check out");
    roost_broker::spawn(cfg).expect("rumqttd with TLS")
}

fn target(addr: SocketAddr, tls: Option<TlsFiles>) -> BrokerTarget {
    BrokerTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        fallbacks: Vec::new(),
        security: Security {
            tls,
            field_prefix: "--".into(),
            ..Security::default()
        },
    }
}

// ---------------------------------------------------------------------------------------------
// An MQTT client that records what it receives

#[derive(Default)]
struct Record {
    connacks: u64,
    subacks: Vec<Vec<rumqttc::SubscribeReasonCode>>,
    pubacks: u64,
    received: Vec<(String, String)>,
    error: Option<String>,
}

struct Client {
    client: AsyncClient,
    record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
    name: String,
}

impl Client {
    /// Connects `name` (its certificate's CN) over mutual TLS and subscribes to `filters`.
    async fn connect(addr: SocketAddr, tls: TlsFiles, name: &str, filters: &[&str]) -> Client {
        let mut o = MqttOptions::new(
            format!("{name}-{:08x}", rand::random::<u32>()),
            addr.ip().to_string(),
            addr.port(),
        );
        o.set_keep_alive(Duration::from_secs(5));
        Security {
            tls: Some(tls),
            ..Security::default()
        }
        .apply(&mut o)
        .expect("TLS files");
        let (client, mut ev) = AsyncClient::new(o, 100);
        let record = Arc::new(Mutex::new(Record::default()));
        let r = record.clone();
        let task = tokio::spawn(async move {
            loop {
                let e = ev.poll().await;
                let mut r = r.lock().expect("lock");
                match e {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => r.connacks += 1,
                    Ok(Event::Incoming(Packet::SubAck(s))) => r.subacks.push(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => r.pubacks += 1,
                    Ok(Event::Incoming(Packet::Publish(p))) => r
                        .received
                        .push((p.topic.clone(), String::from_utf8_lossy(&p.payload).into())),
                    Ok(_) => {}
                    Err(e) => {
                        r.error = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        let c = Client {
            client,
            record,
            task,
            name: name.to_owned(),
        };
        let want = filters.len();
        if want > 0 {
            c.client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce)),
                )
                .await
                .expect("subscribe");
        }
        let rec = c.record.clone();
        eventually(T, &format!("{name} connected and subscribed"), || {
            let r = rec.lock().expect("lock");
            if let Some(e) = &r.error {
                panic!("{} could not connect: {e}", c.name);
            }
            (r.connacks > 0 && (want == 0 || !r.subacks.is_empty())).then_some(())
        })
        .await;
        c
    }

    /// Publishes QoS 1 and waits for the PUBACK (mosquitto acknowledges a denied publish
    /// too, and drops it: MQTT 3.1.1 has no way to say no).
    async fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let before = self.record.lock().expect("lock").pubacks;
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .expect("publish");
        let rec = self.record.clone();
        eventually(T, &format!("PUBACK for {} on {topic}", self.name), || {
            let r = rec.lock().expect("lock");
            if let Some(e) = &r.error {
                panic!("{} lost its connection: {e}", self.name);
            }
            (r.pubacks > before).then_some(())
        })
        .await;
    }

    fn received(&self) -> Vec<(String, String)> {
        self.record.lock().expect("lock").received.clone()
    }

    /// Waits until `payload` arrived on `topic`; returns everything received until then.
    async fn wait_for(&self, topic: &str, payload: &str) -> Vec<(String, String)> {
        let rec = self.record.clone();
        eventually(
            T,
            &format!("{} to receive {payload:?} on {topic}", self.name),
            || {
                let r = rec.lock().expect("lock");
                r.received
                    .iter()
                    .any(|(t, p)| t == topic && p == payload)
                    .then(|| r.received.clone())
            },
        )
        .await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `log` contains `needle` at least `n` times; returns the log.
async fn wait_log(log: &Path, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= n {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} does not say {needle:?} {n} times in {T:?}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes, as the controller identity over mutual TLS, a signed `web` rollout of `rev` from
/// `git` for `scope` with `sequence`.
async fn publish_web(
    controller: &BrokerTarget,
    signer: &Signer,
    scope: &Scope,
    sequence: u64,
    git: &GitServer,
    rev: &str,
) {
    let r = signer.rollout("web", scope.clone(), sequence, &git.url(), rev, APP);
    roost_fleet::cloud::publish_retained(
        controller,
        &Topics::default().deployment(scope, "web"),
        signer.sign(&r),
    )
    .await
    .expect("the controller publishes over mutual TLS");
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Two stores converge with every link on mutual TLS: the bridges to mosquitto as the cloud
/// broker (`require_certificate`, `use_identity_as_username`, the shipped ACL), store-0001's
/// agent and bridge to a rumqttd edge broker with a TLS listener, store-0002's to a
/// mosquitto edge broker with the shipped edge ACL. The rollout is published by the
/// controller identity over TLS; the observer reads through the cloud's plain listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_converge_over_mutual_tls_links() {
    harness::init();
    let Some(bin) = mosquitto_bin("stores_converge_over_mutual_tls_links") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "fleet");
    let server = pki.issue("localhost", true, false);
    let cloud = Mosquitto::start(
        bin,
        dir.path(),
        "cloud",
        &mtls_settings(&pki, &server, &shipped("mosquitto-acl.conf")),
    );
    let edge1 = rumqttd_tls_edge(&pki, &server);
    let edge2 = Mosquitto::start(
        bin,
        dir.path(),
        "edge-0002",
        &mtls_settings(&pki, &server, &shipped("mosquitto-edge-acl.conf")),
    );
    let files = web_app("1", Web::ConfigMap);
    let (git, rev) = GitServer::start(&refs(&files));
    let signer = Signer::new(9);
    let obs = Observer::start(cloud.plain).await;

    let agent = pki.client_tls(&pki.issue("roost-agent", false, false));
    let bridge = pki.client_tls(&pki.issue("roost-bridge", false, false));
    let mut rigs = Vec::new();
    for (store, edge) in [("store-0001", edge1), ("store-0002", edge2.tls)] {
        let mut s = StoreRig::with_edge(
            store,
            &["canary"],
            dir.path(),
            cloud.tls,
            edge,
            &signer,
            &git.allowed(),
        );
        s.bridge_cfg.cloud.tls = Some(pki.client_tls(&pki.issue(store, false, false)));
        s.bridge_cfg.edge.tls = Some(bridge.clone());
        s.agent_cfg.file.broker.tls = Some(agent.clone());
        s.bridge_cfg
            .validate()
            .expect("bridge config with TLS files");
        s.start();
        rigs.push(s);
    }

    let controller = target(
        cloud.tls,
        Some(pki.client_tls(&pki.issue("roost-controller", false, false))),
    );
    publish_web(
        &controller,
        &signer,
        &Scope::Group("canary".into()),
        1,
        &git,
        &rev,
    )
    .await;
    for s in &rigs {
        obs.wait_phase(&s.name, "web", "Converged", Some(&rev), T)
            .await;
        let live = s.live_files("web");
        assert_eq!(
            live.get("configmap.yaml").map(String::as_str),
            Some(files[0].1.as_str()),
            "{} applied the revision",
            s.name
        );
    }
    let seen = obs.snapshot();
    for s in &rigs {
        assert!(
            !seen.of(&s.name, "dev.roost.converged").is_empty(),
            "{}'s events crossed both TLS links",
            s.name
        );
    }
    let presence = roost_fleet::cloud::read_retained(
        &cloud.plain.to_string(),
        &[Topics::default().presence("store-0002")],
        Duration::from_secs(3),
    )
    .await
    .expect("presence");
    assert!(
        presence
            .first()
            .is_some_and(|(_, p)| String::from_utf8_lossy(p).contains("online")),
        "the bridge's presence is allowed by the ACL: {presence:?}"
    );
    for mut s in rigs {
        s.stop_agent().await;
        s.stop_bridge().await;
    }
}

/// A bridge (`roost bridge` process) whose CA file is another CA's and whose client
/// certificate has expired: each failure is logged as what it is and retried; after the
/// files are fixed in place, the same process connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_and_an_expired_certificate_are_explained_and_retried() {
    harness::init();
    let Some(bin) =
        mosquitto_bin("a_wrong_ca_and_an_expired_certificate_are_explained_and_retried")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let server = pki.issue("localhost", true, false);
    let cloud = Mosquitto::start(
        bin,
        dir.path(),
        "cloud",
        &mtls_settings(&pki, &server, &shipped("mosquitto-acl.conf")),
    );
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let store = "store-0007";
    let good = pki.issue(store, false, false);
    let expired = pki.issue(store, false, true);
    // The bridge's files, at fixed paths: the wrong CA, an expired certificate.
    let ca = dir.path().join("bridge-ca.pem");
    let cert = dir.path().join("bridge.pem");
    let key = dir.path().join("bridge.key");
    std::fs::copy(other.ca_file(), &ca).expect("ca");
    std::fs::copy(&expired.cert, &cert).expect("cert");
    std::fs::copy(&expired.key, &key).expect("key");
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"{store}\"\nstate_dir = {state:?}\n[edge]\nhost = \"127.0.0.1\"\nport = {ep}\nkeep_alive_s = 5\n\
             [cloud]\nhost = \"127.0.0.1\"\nport = {cp}\nkeep_alive_s = 5\n\
             tls = {{ ca_file = {ca:?}, cert_file = {cert:?}, key_file = {key:?} }}\n",
            state = dir.path().join("bridge-state").display().to_string(),
            ep = edge.port(),
            cp = cloud.tls.port(),
            ca = ca.display().to_string(),
            cert = cert.display().to_string(),
            key = key.display().to_string(),
        ),
    )
    .expect("bridge.toml");
    let log = dir.path().join("bridge.log");
    let mut bridge = RoostProcess::start(
        [
            std::ffi::OsString::from("bridge"),
            "--config".into(),
            config.into_os_string(),
        ],
        &log,
    );

    // 1. The wrong CA: the broker's certificate is not signed by it. Retried.
    let wrong_ca = format!(
        "the broker's certificate is not signed by a CA in cloud.tls.ca_file ({})",
        ca.display()
    );
    let text = wait_log(&log, &wrong_ca, 2).await;
    assert!(text.contains("cannot connect"), "{text}");
    println!(
        "wrong CA: {}",
        text.lines()
            .find(|l| l.contains(&wrong_ca))
            .unwrap_or_default()
    );
    std::fs::copy(pki.ca_file(), &ca).expect("fix the CA file");

    // 2. Now the broker refuses the expired client certificate. Retried.
    let expired_msg = format!(
        "the broker rejected our client certificate cloud.tls.cert_file ({}): it has expired",
        cert.display()
    );
    let text = wait_log(&log, &expired_msg, 2).await;
    println!(
        "expired certificate: {}",
        text.lines()
            .find(|l| l.contains(&expired_msg))
            .unwrap_or_default()
    );
    assert!(
        cloud.log_text().contains("certificate verify failed"),
        "mosquitto refused the certificate:\n{}",
        cloud.log_text()
    );
    std::fs::copy(&good.cert, &cert).expect("renew the certificate");
    std::fs::copy(&good.key, &key).expect("renew the key");

    // 3. The same process connects: its presence is online at the cloud.
    let presence = Topics::default().presence(store);
    let deadline = Instant::now() + T;
    loop {
        let got = roost_fleet::cloud::read_retained(
            &cloud.plain.to_string(),
            std::slice::from_ref(&presence),
            Duration::from_secs(1),
        )
        .await
        .unwrap_or_default();
        if got
            .iter()
            .any(|(_, p)| String::from_utf8_lossy(p).contains("online"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge did not connect after its files were fixed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(bridge.is_running(), "the bridge never stopped");
    assert_eq!(bridge.starts, 1, "without a restart");
    bridge.kill();
}

/// Username/password over TLS from the command line: a refused password and a wrong CA
/// are errors that say so; with the right ones `roost rollout` publishes and `roost status`
/// reads (`mqtts://`, `--tls-ca`, `--username`, `--password-file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_speaks_tls_with_passwords() {
    harness::init();
    let Some(bin) = mosquitto_bin("the_command_line_speaks_tls_with_passwords") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let server = pki.issue("localhost", true, false);
    let passwd = dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["roost-controller", "right-password"])
        .status()
        .expect("mosquitto_passwd (part of the mosquitto package)");
    assert!(made.success());
    let cloud = Mosquitto::start(
        bin,
        dir.path(),
        "cloud",
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
            pki.ca_file().display(),
            server.cert.display(),
            server.key.display(),
            passwd.display()
        ),
    );
    let right = dir.path().join("right.txt");
    let wrong = dir.path().join("wrong.txt");
    std::fs::write(&right, "right-password\n").expect("write");
    std::fs::write(&wrong, "guess\n").expect("write");
    let broker = format!("mqtts://127.0.0.1:{}", cloud.tls.port());
    let roost = |args: &[&str], ca: &Path, password: &Path| {
        let out = std::process::Command::new(harness::roost_bin())
            .args(args)
            .args(["--broker", &broker, "--tls-ca"])
            .arg(ca)
            .args(["--username", "roost-controller", "--password-file"])
            .arg(password)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run roost");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = roost(&["status", "--wait", "1"], &pki.ca_file(), &wrong);
    assert!(!ok, "a refused password fails");
    assert!(
        err.contains("the broker refused") && err.contains("username/password"),
        "{err}"
    );
    println!("refused password: {}", err.trim());
    let (ok, _, err) = roost(&["status", "--wait", "1"], &other.ca_file(), &right);
    assert!(!ok, "a wrong CA fails");
    assert!(err.contains("not signed by a CA in --tls-ca"), "{err}");
    println!("wrong CA: {}", err.trim());

    let keys = dir.path().join("keys");
    let (id, _) = roost_fleet::cloud::keygen(&keys).expect("keygen");
    let key = keys.join(format!("{id}.key"));
    let rev = "a".repeat(40);
    let (ok, out, err) = roost(
        &[
            "rollout",
            "--key",
            &key.display().to_string(),
            "--deployment",
            "web",
            "--group",
            "canary",
            "--repo",
            "git://127.0.0.1:1/fleet.git",
            "--revision",
            &rev,
            "--path",
            APP,
        ],
        &pki.ca_file(),
        &right,
    );
    assert!(ok, "roost rollout over TLS with a password: {err}");
    assert!(out.contains(&rev), "{out}");
    let topic = Topics::default().deployment(&Scope::Group("canary".into()), "web");
    let got = roost_fleet::cloud::read_retained(
        &cloud.plain.to_string(),
        std::slice::from_ref(&topic),
        Duration::from_secs(3),
    )
    .await
    .expect("read");
    assert_eq!(got.len(), 1, "the rollout is retained on the broker");
    let (ok, out, err) = roost(&["status", "--wait", "1"], &pki.ca_file(), &right);
    assert!(ok, "roost status over TLS with a password: {err}");
    assert!(out.contains("\nSTORE"), "{out}");
}

/// The shipped cloud ACL (`broker-config/mosquitto-acl.conf`) against a real mosquitto with
/// client certificates: a store's identity cannot publish rollouts (fleet, group or store
/// scope, not even its own), its profile, an end-to-end confirmation (its own or another
/// store's), or another store's status and events, and cannot read another store's topics;
/// the controller identity can publish desired state, profiles and confirmations, which
/// stores read.
/// Each "cannot" is checked against a positive marker sent after it on an allowed topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_acl_confines_each_store_to_its_own_topics() {
    harness::init();
    let Some(bin) = mosquitto_bin("the_cloud_acl_confines_each_store_to_its_own_topics") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "fleet");
    let server = pki.issue("localhost", true, false);
    let cloud = Mosquitto::start(
        bin,
        dir.path(),
        "cloud",
        &mtls_settings(&pki, &server, &shipped("mosquitto-acl.conf")),
    );
    let t = Topics::default();
    let (a, b) = ("store-0001", "store-0002");
    let fleet_topic = t.deployment(&Scope::Fleet, "web");
    let group_topic = t.deployment(&Scope::Group("canary".into()), "web");
    let own_store_topic = t.deployment(&Scope::Store(a.into()), "web");
    let b_store_topic = t.deployment(&Scope::Store(b.into()), "web");
    let own_profile = t.profile(a);
    let own_confirmed = t.confirmed(a);

    let controller = Client::connect(
        cloud.tls,
        pki.client_tls(&pki.issue("roost-controller", false, false)),
        "roost-controller",
        &[
            "roost/v1/fleet/deployments/+",
            "roost/v1/groups/+/deployments/+",
            "roost/v1/stores/+/deployments/+",
            "roost/v1/stores/+/profile",
            "roost/v1/stores/+/confirmed",
            "roost/v1/stores/+/status",
            "roost/v1/stores/+/events",
            "roost/v1/stores/+/presence",
        ],
    )
    .await;
    let store_a = Client::connect(
        cloud.tls,
        pki.client_tls(&pki.issue(a, false, false)),
        a,
        &[
            // Allowed: its own, its group's and the fleet's rollouts, its own profile.
            "roost/v1/stores/store-0001/deployments/+",
            "roost/v1/stores/store-0001/profile",
            "roost/v1/stores/store-0001/confirmed",
            "roost/v1/groups/canary/deployments/+",
            "roost/v1/fleet/deployments/+",
            // Not allowed: another store's topics, and everyone's.
            "roost/v1/stores/store-0002/#",
            "roost/v1/stores/+/status",
            "roost/v1/stores/+/events",
        ],
    )
    .await;
    let store_b = Client::connect(
        cloud.tls,
        pki.client_tls(&pki.issue(b, false, false)),
        b,
        &[],
    )
    .await;

    // A store cannot publish desired state, nor another store's uplink.
    for topic in [&fleet_topic, &group_topic, &own_store_topic, &b_store_topic] {
        store_a.publish(topic, "forged rollout", true).await;
    }
    store_a.publish(&own_profile, "forged profile", true).await;
    store_a
        .publish(&own_confirmed, "forged confirmation", true)
        .await;
    store_a
        .publish(&t.confirmed(b), "forged confirmation", true)
        .await;
    store_a.publish(&t.status(b), "forged status", true).await;
    store_a.publish(&t.events(b), "forged event", false).await;
    store_a.publish(&t.status(a), "marker-a", true).await;
    let seen = controller.wait_for(&t.status(a), "marker-a").await;
    let forged: Vec<_> = seen
        .iter()
        .filter(|(_, p)| p.starts_with("forged"))
        .collect();
    assert!(
        forged.is_empty(),
        "the ACL let {a} publish: {forged:?} (mosquitto log:\n{})",
        cloud.log_text()
    );
    println!(
        "acl: {a} published 9 forbidden messages (rollouts on fleet, group, own and other store topics; its own profile; its own and {b}'s confirmation; {b}'s status and events): 0 reached the controller, the marker after them did"
    );

    // A store cannot read another store's topics; its own arrive.
    store_b.publish(&t.status(b), "status of b", true).await;
    store_b.publish(&t.events(b), "event of b", false).await;
    store_b.publish(&t.presence(b), "presence of b", true).await;
    controller
        .publish(&b_store_topic, "rollout for b", true)
        .await;
    controller
        .publish(&t.profile(b), "profile of b", true)
        .await;
    controller
        .publish(&t.confirmed(b), "confirmation of b", true)
        .await;
    controller.wait_for(&t.status(b), "status of b").await;
    controller.wait_for(&t.events(b), "event of b").await;
    // The marker: a rollout for store-0001, which it may read.
    controller
        .publish(&own_store_topic, "marker-a2", true)
        .await;
    let seen = store_a.wait_for(&own_store_topic, "marker-a2").await;
    let leaked: Vec<_> = seen.iter().filter(|(tp, _)| tp.contains(b)).collect();
    assert!(leaked.is_empty(), "{a} read {b}'s topics: {leaked:?}");
    // Retained copies are checked too: a new subscription gets nothing of b's.
    let late = Client::connect(
        cloud.tls,
        pki.client_tls(&pki.issue(a, false, false)),
        a,
        &[
            "roost/v1/stores/store-0002/#",
            "roost/v1/stores/store-0001/deployments/+",
        ],
    )
    .await;
    let seen = late.wait_for(&own_store_topic, "marker-a2").await;
    assert!(
        seen.iter().all(|(tp, _)| !tp.contains(b)),
        "{a} got {b}'s retained messages: {seen:?}"
    );
    println!("acl: {a} subscribed to {b}'s topics and to +/status, +/events: 0 of {b}'s 6 messages (live or retained) arrived, its own marker did");

    // The controller publishes desired state; the store reads its own, its group's and the
    // fleet's.
    controller
        .publish(&fleet_topic, "fleet rollout", true)
        .await;
    controller
        .publish(&group_topic, "group rollout", true)
        .await;
    controller
        .publish(&own_store_topic, "store rollout", true)
        .await;
    controller
        .publish(&own_profile, "store profile", true)
        .await;
    controller
        .publish(&own_confirmed, "store confirmation", true)
        .await;
    store_a.wait_for(&fleet_topic, "fleet rollout").await;
    store_a.wait_for(&own_confirmed, "store confirmation").await;
    store_a.wait_for(&group_topic, "group rollout").await;
    store_a.wait_for(&own_profile, "store profile").await;
    let seen = store_a.wait_for(&own_store_topic, "store rollout").await;
    assert!(
        seen.iter().all(|(_, p)| !p.starts_with("forged")),
        "{seen:?}"
    );
    assert!(
        store_a.received().iter().all(|(tp, _)| !tp.contains(b)),
        "still nothing of {b}'s"
    );
    println!("acl: roost-controller published fleet, group and store rollouts, {a}'s profile and confirmation: {a} received all 5");
}

/// The shipped edge ACL (`broker-config/mosquitto-edge-acl.conf`): only the agent identity
/// publishes the store's status and events, only the bridge identity its confirmations and
/// desired state; another device on the store's network can do neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_acl_lets_only_the_agent_publish_status_and_events() {
    harness::init();
    let Some(bin) = mosquitto_bin("the_edge_acl_lets_only_the_agent_publish_status_and_events")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "store");
    let server = pki.issue("localhost", true, false);
    let edge = Mosquitto::start(
        bin,
        dir.path(),
        "edge",
        &mtls_settings(&pki, &server, &shipped("mosquitto-edge-acl.conf")),
    );
    let t = Topics::default();
    let s = "store-0042";
    let desired = t.deployment(&Scope::Fleet, "web");
    let bridge = Client::connect(
        edge.tls,
        pki.client_tls(&pki.issue("roost-bridge", false, false)),
        "roost-bridge",
        &[
            "roost/v1/stores/store-0042/status",
            "roost/v1/stores/store-0042/events",
        ],
    )
    .await;
    let agent = Client::connect(
        edge.tls,
        pki.client_tls(&pki.issue("roost-agent", false, false)),
        "roost-agent",
        &[
            "roost/v1/stores/store-0042/ack",
            "roost/v1/fleet/deployments/+",
        ],
    )
    .await;
    let intruder = Client::connect(
        edge.tls,
        pki.client_tls(&pki.issue("pos-terminal", false, false)),
        "pos-terminal",
        &[],
    )
    .await;
    intruder.publish(&t.status(s), "forged status", true).await;
    intruder.publish(&t.events(s), "forged event", false).await;
    intruder.publish(&t.ack(s), "forged ack", true).await;
    intruder.publish(&desired, "forged rollout", true).await;
    agent.publish(&t.status(s), "agent status", true).await;
    agent.publish(&t.events(s), "agent event", false).await;
    bridge.publish(&t.ack(s), "bridge ack", true).await;
    bridge.publish(&desired, "bridge desired", true).await;
    let at_bridge = bridge.wait_for(&t.events(s), "agent event").await;
    let at_agent = agent.wait_for(&desired, "bridge desired").await;
    agent.wait_for(&t.ack(s), "bridge ack").await;
    let forged: Vec<_> = at_bridge
        .iter()
        .chain(at_agent.iter())
        .filter(|(_, p)| p.starts_with("forged"))
        .collect();
    assert!(
        forged.is_empty(),
        "the edge ACL let a device publish: {forged:?}"
    );
    assert!(
        at_bridge.iter().any(|(_, p)| p == "agent status"),
        "{at_bridge:?}"
    );
    println!("edge acl: a third identity published status, events, ack and a rollout: 0 arrived; the agent's status/events and the bridge's ack/rollout did");
}

/// `roost broker` refuses a listener on 0.0.0.0 without TLS and authentication, saying why,
/// and runs it with `--insecure`; a TLS listener with client certificates on 0.0.0.0 needs
/// no flag, serves a client with a certificate, and refuses one without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_broker_refuses_an_exposed_listener() {
    harness::init();
    let dir = tempfile::tempdir().expect("tmp");
    let edge = shipped("edge.toml");
    let port = roost_broker::free_port().expect("port");
    let out = std::process::Command::new(harness::roost_bin())
        .args(["broker", "--config"])
        .arg(&edge)
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("roost broker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(
        err.contains(&format!(
            "refusing to start: listener v4.1 (edge-v4) on 0.0.0.0:{port} has no TLS and no authentication"
        )) && err.contains("--insecure")
            && err.contains("no topic ACLs"),
        "{err}"
    );
    println!(
        "roost broker --listen 0.0.0.0:{port}: exit {:?}",
        out.status.code()
    );

    let mut insecure = RoostProcess::start(
        [
            std::ffi::OsString::from("broker"),
            "--config".into(),
            edge.clone().into_os_string(),
            "--listen".into(),
            format!("0.0.0.0:{port}").into(),
            "--insecure".into(),
        ],
        &dir.path().join("insecure.log"),
    );
    roost_broker::wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(10))
        .expect("--insecure runs it");
    assert!(insecure.is_running());
    insecure.kill();
    let log = std::fs::read_to_string(dir.path().join("insecure.log")).unwrap_or_default();
    assert!(log.contains("exposed listener"), "it warns: {log}");

    // TLS with client certificates (cloud-tls.toml's shape) on 0.0.0.0: no flag needed.
    let pki = Pki::new(dir.path(), "fleet");
    let server = pki.issue("localhost", true, false);
    let shipped_tls = std::fs::read_to_string(shipped("cloud-tls.toml")).expect("cloud-tls.toml");
    let config = dir.path().join("cloud-tls.toml");
    std::fs::write(
        &config,
        shipped_tls
            .replace(
                "/etc/roost/tls/ca.pem",
                &pki.ca_file().display().to_string(),
            )
            .replace(
                "/etc/roost/tls/server.pem",
                &server.cert.display().to_string(),
            )
            .replace(
                "/etc/roost/tls/server.key",
                &server.key.display().to_string(),
            ),
    )
    .expect("config");
    let port = roost_broker::free_port().expect("port");
    let mut tls = RoostProcess::start(
        [
            std::ffi::OsString::from("broker"),
            "--config".into(),
            config.clone().into_os_string(),
            "--listen".into(),
            format!("0.0.0.0:{port}").into(),
        ],
        &dir.path().join("tls.log"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    roost_broker::wait_listening(addr, Duration::from_secs(10)).expect("TLS broker");
    let with_cert = target(
        addr,
        Some(pki.client_tls(&pki.issue("store-0001", false, false))),
    );
    roost_fleet::cloud::publish_retained(
        &with_cert,
        "roost/v1/stores/store-0001/status",
        b"{}".to_vec(),
    )
    .await
    .expect("a client with a certificate is served");
    let without = target(
        addr,
        Some(TlsFiles {
            ca_file: Some(pki.ca_file()),
            ..TlsFiles::default()
        }),
    );
    let e = roost_fleet::cloud::read_retained(&without, &["#".to_owned()], Duration::from_secs(2))
        .await
        .expect_err("no client certificate");
    println!("rumqttd TLS listener, client without a certificate: {e}");
    assert!(e.to_string().contains("client certificate"), "{e}");
    tls.kill();

    // A TLS file that is missing is a configuration error naming the field.
    std::fs::remove_file(&server.key).expect("rm");
    let out = std::process::Command::new(harness::roost_bin())
        .args(["broker", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("roost broker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("v4.1.tls.keypath"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Enrollment and sealed secrets

/// Runs `roost ARGS…` to its end; panics with its output unless it succeeds. Returns stdout.
fn roost(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(harness::roost_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("roost");
    assert!(
        out.status.success(),
        "roost {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `roost store enroll` for `store` with `region` into the fleet checkout, `--direct`.
fn enroll(
    dir: &Path,
    fleet: &Path,
    store: &str,
    region: &str,
    cloud: SocketAddr,
    edge: SocketAddr,
    key: &Path,
) -> (PathBuf, String) {
    let bundle = dir.join(format!("bundle-{store}"));
    let out = roost(&[
        "store".as_ref(),
        "enroll".as_ref(),
        store.as_ref(),
        "--repo".as_ref(),
        fleet.as_os_str(),
        "--direct".as_ref(),
        "--labels".as_ref(),
        format!("region={region},format=drive-thru").as_ref(),
        "--tz".as_ref(),
        "America/Chicago".as_ref(),
        "--vars".as_ref(),
        "store_number=0042".as_ref(),
        "--ca".as_ref(),
        dir.join("ca").as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
        "--cloud".as_ref(),
        format!("mqtts://{cloud}").as_ref(),
        "--edge".as_ref(),
        edge.to_string().as_ref(),
        "--trusted-key".as_ref(),
        key.as_os_str(),
    ]);
    println!("{out}");
    let recipient = out
        .lines()
        .find_map(|l| l.strip_prefix("age recipient "))
        .expect("enroll prints the recipient")
        .to_owned();
    (bundle, recipient)
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Enrollment end to end, with roost's own CA for everything: `roost ca init`, the broker's
/// and the controller's certificates from `roost ca issue`, and `roost store enroll store-x`
/// into a fleet checkout (`--direct`): the checkout has a new commit with `stores/store-x.yaml`
/// (labels, time zone, vars, the age recipient), the bundle's secrets are mode 0600, and the
/// bundle's agent.toml and bridge.toml load. Then `roost bridge` and `roost agent` start from
/// the bundle unedited, the bridge connects to mosquitto with mutual TLS and the shipped ACL,
/// and a signed rollout for the group roost.yaml puts the store in converges on it.
///
/// Sealed secrets: `roost secret seal --store store-x` writes the overlay file, which the
/// reference `age -d -i` opens with the bundle's identity; a file made by `age -r … -a` opens
/// with `roost_runtime::sealed::decrypt`; a group file sealed while store-x was the only
/// member opens for a second store only after it is enrolled and `roost secret reseal` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_store_starts_from_its_bundle_and_opens_its_sealed_secrets() {
    harness::init();
    let test = "an_enrolled_store_starts_from_its_bundle_and_opens_its_sealed_secrets";
    let Some(bin) = mosquitto_bin(test) else {
        return;
    };
    let Some(age) = roost_tests::fixtures::age_bin(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let files = web_app("1", Web::ConfigMap);
    let (git, rev) = GitServer::start(&refs(&files));

    // The fleet checkout: groups by label, the web deployment from the Git server.
    let fleet = d.join("fleet");
    let repo = git2::Repository::init(&fleet).expect("init");
    let fleet_yaml = format!(
        "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups:\n  us-south: {{selector: {{region: us-south}}}}\n\
         deployments:\n  web:\n    source: {{url: {}, ref: HEAD, path: {APP}}}\n",
        git.url()
    );
    let first = roost_sim::up::commit_files(
        &repo,
        &[("roost.yaml".to_owned(), fleet_yaml)]
            .into_iter()
            .collect(),
        "fleet",
    )
    .expect("commit");

    // The CA, the broker's certificate and the controller's.
    let ca = d.join("ca");
    roost(&[
        "ca".as_ref(),
        "init".as_ref(),
        "--dir".as_ref(),
        ca.as_os_str(),
    ]);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca.join("sealing-identity.txt")), 0o600);
    let certs = d.join("certs");
    for (name, server) in [
        ("localhost", Some("127.0.0.1,localhost")),
        ("roost-controller", None),
    ] {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "ca".as_ref(),
            "issue".as_ref(),
            name.as_ref(),
            "--ca".as_ref(),
            ca.as_os_str(),
            "--out".as_ref(),
            certs.as_os_str(),
        ];
        if let Some(s) = server {
            args.push("--server".as_ref());
            args.push(s.as_ref());
        }
        roost(&args);
    }
    let pair = |n: &str| Pair {
        cert: certs.join(format!("{n}.pem")),
        key: certs.join(format!("{n}.key")),
    };
    let cloud = Mosquitto::start(
        bin,
        d,
        "cloud",
        &mtls_settings_of(
            &ca.join("ca.pem"),
            &pair("localhost"),
            &shipped("mosquitto-acl.conf"),
        ),
    );
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let signer = Signer::new(11);
    let key = d.join("signer.pub");
    {
        use base64::Engine as _;
        std::fs::write(
            &key,
            base64::engine::general_purpose::STANDARD.encode(signer.key.public_key()),
        )
        .expect("write key");
    }

    // Enroll.
    let (bundle, recipient) = enroll(d, &fleet, "store-x", "us-south", cloud.tls, edge, &key);
    let head = repo.head().expect("head").peel_to_commit().expect("commit");
    assert_ne!(head.id().to_string(), first, "a new commit");
    assert_eq!(head.parent_id(0).expect("parent").to_string(), first);
    assert_eq!(head.summary().ok().flatten(), Some("Enroll store store-x"));
    let entry_text = std::fs::read_to_string(fleet.join("stores/store-x.yaml"))
        .expect("the checkout has the entry");
    let entry: roost_schemas::inventory::StoreEntry =
        serde_saphyr::from_str(&entry_text).expect("a Store document");
    assert_eq!(entry.name, "store-x");
    assert_eq!(
        entry.labels.get("region").map(String::as_str),
        Some("us-south")
    );
    assert_eq!(entry.timezone.as_deref(), Some("America/Chicago"));
    assert_eq!(
        entry.vars.get("store_number").map(String::as_str),
        Some("0042")
    );
    assert_eq!(entry.age_recipient.as_deref(), Some(recipient.as_str()));
    entry.validate().expect("valid");
    let identity = bundle.join("state/agent/age-identity.txt");
    for secret in [identity.clone(), bundle.join("tls/store-x.key")] {
        assert_eq!(mode(&secret), 0o600, "{}", secret.display());
    }
    let agent_cfg = roost_agent::AgentConfig::load(&bundle.join("agent.toml"))
        .expect("the bundle's agent.toml loads");
    assert_eq!(agent_cfg.file.groups, vec!["us-south".to_owned()]);
    let bridge_cfg = roost_bridge::BridgeConfig::load(&bundle.join("bridge.toml"))
        .expect("the bundle's bridge.toml loads");
    assert_eq!(bridge_cfg.cloud.port, cloud.tls.port());

    // The store starts from the bundle alone, and converges over mutual TLS.
    let obs = Observer::start(cloud.plain).await;
    let _bridge = RoostProcess::start(
        [
            std::ffi::OsString::from("bridge"),
            "--config".into(),
            bundle.join("bridge.toml").into(),
        ],
        &d.join("bridge.log"),
    );
    let _agent = RoostProcess::start(
        [
            std::ffi::OsString::from("agent"),
            "--config".into(),
            bundle.join("agent.toml").into(),
        ],
        &d.join("agent.log"),
    );
    let controller = target(
        cloud.tls,
        Some(TlsFiles {
            ca_file: Some(ca.join("ca.pem")),
            cert_file: Some(pair("roost-controller").cert),
            key_file: Some(pair("roost-controller").key),
        }),
    );
    publish_web(
        &controller,
        &signer,
        &Scope::Group("us-south".into()),
        1,
        &git,
        &rev,
    )
    .await;
    obs.wait_phase("store-x", "web", "Converged", Some(&rev), T)
        .await;
    let live = bundle.join("state/agent/targets/web/current/configmap.yaml");
    assert_eq!(
        std::fs::read_to_string(&live).ok().as_deref(),
        Some(files[0].1.as_str()),
        "the agent applied the revision into its state directory"
    );

    // Sealed: by roost, opened by the reference age CLI.
    const SECRET: &str =
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  password: hunter2\n";
    let plain = d.join("secret.yaml");
    std::fs::write(&plain, SECRET).expect("write");
    let seal = |to: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "secret".as_ref(),
            "seal".as_ref(),
            plain.as_os_str(),
            "--repo".as_ref(),
            fleet.as_os_str(),
            "--deployment".as_ref(),
            "web".as_ref(),
            "--ca".as_ref(),
            ca.as_os_str(),
        ];
        args.extend(to.iter().map(|s| std::ffi::OsStr::new(*s)));
        roost(&args)
    };
    seal(&["--store", "store-x"]);
    let for_x = fleet.join(format!("{APP}/_stores/store-x/secret.yaml.age"));
    let opened = std::process::Command::new(age)
        .arg("-d")
        .arg("-i")
        .arg(&identity)
        .arg(&for_x)
        .output()
        .expect("age -d");
    assert!(
        opened.status.success(),
        "age -d: {}",
        String::from_utf8_lossy(&opened.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&opened.stdout), SECRET);

    // Sealed by the age CLI to the recipient, opened by roost.
    let by_age = d.join("by-age.yaml.age");
    let made = std::process::Command::new(age)
        .args(["-r", &recipient, "-a", "-o"])
        .arg(&by_age)
        .arg(&plain)
        .output()
        .expect("age -r");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let id = roost_runtime::sealed::Identity::read(&identity).expect("identity");
    assert_eq!(
        roost_runtime::sealed::decrypt(&id, &std::fs::read(&by_age).expect("read"))
            .expect("roost opens what age sealed"),
        SECRET.as_bytes()
    );

    // A group file, then a second store joins the group: reseal.
    seal(&["--group", "us-south"]);
    let for_group = fleet.join(format!("{APP}/_groups/us-south/secret.yaml.age"));
    let (bundle_y, _) = enroll(d, &fleet, "store-y", "us-south", cloud.tls, edge, &key);
    let id_y =
        roost_runtime::sealed::Identity::read(&bundle_y.join("state/agent/age-identity.txt"))
            .expect("identity");
    let open = |id: &roost_runtime::sealed::Identity| {
        roost_runtime::sealed::decrypt(id, &std::fs::read(&for_group).expect("read"))
    };
    assert!(open(&id_y).is_err(), "sealed before store-y joined");
    let resealed = roost(&[
        "secret".as_ref(),
        "reseal".as_ref(),
        "--repo".as_ref(),
        fleet.as_os_str(),
        "--ca".as_ref(),
        ca.as_os_str(),
    ]);
    assert!(
        resealed
            .contains("resealed apps/web/_groups/us-south/secret.yaml.age for store-x, store-y"),
        "{resealed}"
    );
    for id in [&id, &id_y] {
        assert_eq!(open(id).expect("opens after reseal"), SECRET.as_bytes());
    }
    // Nothing printed the secret.
    assert!(!resealed.contains("hunter2"));

    // Retire store-x: its entry leaves the inventory, its store-scoped desired state is
    // tombstoned on the broker and forgotten by the fleet record, and its sealed file is
    // what reseal now refuses to touch.
    let store_scope = Scope::Store("store-x".into());
    let pinned = Topics::default().deployment(&store_scope, "web");
    let recorded_only = Topics::default().deployment(&store_scope, "menu");
    publish_web(&controller, &signer, &store_scope, 2, &git, &rev).await;
    let db_path = d.join("fleet.db");
    {
        let db = roost_fleet::db::FleetDb::open(&db_path).expect("fleet db");
        let menu = signer.rollout("menu", store_scope, 3, &git.url(), &rev, APP);
        db.record_desired(&recorded_only, &signer.sign(&menu))
            .expect("record");
    }
    let retired = roost(&[
        "store".as_ref(),
        "retire".as_ref(),
        "store-x".as_ref(),
        "--repo".as_ref(),
        fleet.as_os_str(),
        "--direct".as_ref(),
        "--broker".as_ref(),
        format!("mqtts://{}", cloud.tls).as_ref(),
        "--tls-ca".as_ref(),
        ca.join("ca.pem").as_os_str(),
        "--tls-cert".as_ref(),
        pair("roost-controller").cert.as_os_str(),
        "--tls-key".as_ref(),
        pair("roost-controller").key.as_os_str(),
        "--db".as_ref(),
        db_path.as_os_str(),
    ]);
    println!("{retired}");
    assert!(!fleet.join("stores/store-x.yaml").exists());
    assert!(fleet.join("stores/store-y.yaml").exists());
    assert_eq!(
        repo.head()
            .expect("head")
            .peel_to_commit()
            .expect("commit")
            .summary()
            .ok()
            .flatten(),
        Some("Retire store store-x")
    );
    for t in [&pinned, &recorded_only] {
        assert!(retired.contains(&format!("tombstoned {t}")), "{retired}");
    }
    let left = roost_fleet::cloud::read_retained(
        &cloud.plain.to_string(),
        std::slice::from_ref(&pinned),
        Duration::from_secs(2),
    )
    .await
    .expect("read");
    assert!(
        left.iter().all(|(_, p)| p.is_empty()),
        "the broker dropped the pin: {left:?}"
    );
    let db = roost_fleet::db::FleetDb::open(&db_path).expect("fleet db");
    assert!(
        db.desired()
            .expect("desired")
            .iter()
            .all(|(t, _)| !t.contains("/stores/store-x/")),
        "the fleet record forgot store-x's desired state"
    );
    let out = std::process::Command::new(harness::roost_bin())
        .args(["secret", "reseal", "--repo"])
        .arg(&fleet)
        .arg("--ca")
        .arg(&ca)
        .output()
        .expect("roost secret reseal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "left apps/web/_stores/store-x/secret.yaml.age: store-x is not in the inventory"
        ),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// Git over https with a private CA

/// An agent fetches from a real https Git server (`git http-backend` behind TLS, basic auth)
/// whose certificate a private CA signed, with `git.ca_file`: a wrong CA is refused with
/// `fetch_failed` saying why (verification is never switched off); once the file holds the
/// right CA (it is read on every fetch), a wrong token in `token_file` is refused with the
/// server's 401 explained, and once the file holds the right token (also read on every fetch)
/// the retried fetch converges. The token never shows in events or status. (https is roost's
/// rustls transport for libgit2, not OpenSSL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_over_https_with_a_private_ca() {
    harness::init();
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "git");
    let wrong = Pki::new(dir.path(), "wrong");
    let server = pki.issue("git-server", true, false);
    let files = web_app("https-1", Web::ConfigMap);
    let (mut git, _) = GitServer::start(&[("README", "apps\n")]);
    let rev = git.commit(&refs(&files), &[], "app over https");
    const TOKEN: &str = "https-token-b2f7c9";
    let root = git.path().parent().expect("root").to_owned();
    let https = roost_tests::https_git::HttpsGitServer::start(
        &root,
        &server.cert,
        &server.key,
        Some(("roost", TOKEN)),
    )
    .await;
    let cloud = roost_broker::spawn_free("cloud").expect("cloud");
    let signer = Signer::new(11);
    let obs = Observer::start(cloud).await;
    let name = "store-https";
    let allowed = https.url("");
    let mut store = StoreRig::new(name, &["all"], dir.path(), cloud, &signer, &allowed);
    let ca = dir.path().join("agent-git-ca.pem");
    std::fs::copy(wrong.ca_file(), &ca).expect("ca");
    store.agent_cfg.file.git.ca_file = Some(ca.clone());
    let token_file = dir.path().join("git-token");
    std::fs::write(&token_file, "not-the-token\n").expect("token file");
    store.agent_cfg.file.git.credentials = vec![roost_agent::config::GitCredential {
        url_prefix: allowed.clone(),
        username: Some("roost".into()),
        token: None,
        token_file: Some(token_file.clone()),
    }];
    store.start();
    let url = https.url("fleet.git");
    let r = signer.rollout("web", Scope::Fleet, 1, &url, &rev, APP);
    harness::publish(
        cloud,
        &Topics::default().deployment(&Scope::Fleet, "web"),
        signer.sign(&r),
    )
    .await;

    // The wrong CA: refused, with the reason, and retried.
    let failed = obs
        .wait_event(name, "dev.roost.fetch.failed", T, |_| true)
        .await;
    assert_eq!(failed.reason(), Some("fetch_failed"));
    let message = failed.data["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains(&format!(
            "the server's certificate is not signed by a CA in git.ca_file ({})",
            ca.display()
        )),
        "{message}"
    );
    assert!(obs.snapshot().of(name, "dev.roost.converged").is_empty());
    println!("git https: wrong CA refused: {message}");

    // The right CA, in the same file: the server is trusted and refuses the wrong token.
    std::fs::copy(pki.ca_file(), &ca).expect("ca");
    let refused = obs
        .wait_event(name, "dev.roost.fetch.failed", T, |e| {
            e.data["message"]
                .as_str()
                .is_some_and(|m| m.contains("HTTP 401"))
        })
        .await;
    let message = refused.data["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the server refused the credential in git.credentials"),
        "{message}"
    );
    assert!(obs.snapshot().of(name, "dev.roost.converged").is_empty());
    println!("git https: wrong token refused: {message}");

    // The right token, in the same file: the next retry fetches over https and converges.
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    obs.wait_converged(name, &rev, T).await;
    let live = std::fs::read_to_string(store.current("web").join("configmap.yaml"))
        .expect("applied from https");
    assert!(live.contains("https-1"), "{live}");
    let seen = obs.snapshot();
    let everything = serde_json::to_string(&seen.store_events(name)).expect("json")
        + &serde_json::to_string(&seen.status.get(name)).expect("json");
    assert!(
        !everything.contains(TOKEN),
        "the token stays out of events and status"
    );
    println!("git https: converged from {url} with git.ca_file and a token");
    store.stop_agent().await;
}
