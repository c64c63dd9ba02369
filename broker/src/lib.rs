//! Embedded MQTT broker (rumqttd) from a TOML configuration file, and helpers to run one on a
//! free loopback port for `roost up`, benchmarks and tests.
//!
//! rumqttd cannot report the port it bound and `Broker::start()` never returns, so an embedded
//! broker runs on its own thread for the life of the process (`roost broker` too: on SIGTERM
//! or SIGINT the process ends and the broker with it); a test that must restart a broker runs
//! `roost broker` as a child process instead.
//!
//! Before a configuration runs, [`check_config`] makes sure its TLS files are usable (rumqttd
//! itself reads them only when a client connects, and then fails every connection) and that no
//! listener is reachable from other hosts without TLS and authentication. rumqttd has no topic
//! ACLs (rumqtt issue 495): any authenticated client may publish and subscribe anywhere, so
//! per-store authorization needs mosquitto (or another broker with ACLs) as the cloud broker.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors of the broker subsystem.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration file could not be read or parsed.
    #[error("broker configuration {path}: {message}")]
    Config {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration has no MQTT v4 listener to start.
    #[error("broker configuration: no [v4.*] listener")]
    NoListener,
    /// The broker's thread could not be started, or no free port was found.
    #[error("broker: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// rumqttd stopped with an error (its error type is not public: boxed).
    #[error("broker stopped")]
    Run(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The configuration file could not be read.
    #[error("broker configuration {path}")]
    Read {
        /// File.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not valid rumqttd TOML.
    #[error("broker configuration {path}")]
    Parse {
        /// File.
        path: String,
        /// What is wrong.
        #[source]
        source: toml::de::Error,
    },
    /// No free port / the broker did not start listening.
    #[error("broker did not start listening on {0}")]
    NotListening(SocketAddr),
    /// A listener would be reachable from other hosts without TLS and authentication.
    #[error("{0}")]
    Exposed(String),
}

/// Parses a rumqttd TOML configuration.
pub fn parse_config(text: &str, path: &str) -> Result<rumqttd::Config, BrokerError> {
    let cfg: rumqttd::Config = toml::from_str(text).map_err(|source| BrokerError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if cfg.v4.as_ref().map(|m| m.is_empty()).unwrap_or(true) && cfg.v5.is_none() {
        return Err(BrokerError::Config {
            path: path.to_owned(),
            message: "no [v4.*] or [v5.*] listener configured".into(),
        });
    }
    Ok(cfg)
}

/// Loads a rumqttd TOML configuration file, optionally overriding the address of the first
/// v4 listener (in name order: `[v4.1]` before `[v4.2]`).
pub fn load_config(
    path: &Path,
    listen: Option<SocketAddr>,
) -> Result<rumqttd::Config, BrokerError> {
    let text = std::fs::read_to_string(path).map_err(|source| BrokerError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut cfg = parse_config(&text, &path.display().to_string())?;
    if let Some(addr) = listen {
        if let Some(v4) = cfg.v4.as_mut() {
            if let Some(first) = v4.keys().min().cloned().and_then(|k| v4.get_mut(&k)) {
                first.listen = addr;
            }
        }
    }
    Ok(cfg)
}

/// Every MQTT listener of a configuration as (`v4.1`, settings), in name order.
fn listeners(cfg: &rumqttd::Config) -> Vec<(String, &rumqttd::ServerSettings)> {
    let mut out = Vec::new();
    for (kind, map) in [("v4", &cfg.v4), ("v5", &cfg.v5), ("ws", &cfg.ws)] {
        for (name, s) in map.iter().flatten() {
            out.push((format!("{kind}.{name}"), s));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Checks a configuration before it runs: every TLS listener's files are readable PEM (and it
/// has a `capath`: roost's rumqttd verifies client certificates on every TLS listener), and,
/// unless `insecure`, no listener on a non-loopback address lacks TLS or authentication
/// (client certificates, or `connections.auth`). Errors name the listener and say why.
pub fn check_config(cfg: &rumqttd::Config, path: &str, insecure: bool) -> Result<(), BrokerError> {
    let config_err = |message: String| BrokerError::Config {
        path: path.to_owned(),
        message,
    };
    let mut exposed = Vec::new();
    for (name, s) in listeners(cfg) {
        let mut client_certs = false;
        match &s.tls {
            None => {}
            Some(rumqttd::TlsConfig::Rustls {
                capath,
                certpath,
                keypath,
            }) => {
                let Some(capath) = capath else {
                    return Err(config_err(format!(
                        "{name}.tls.capath: required (a CA certificate that signs the clients' certificates: roost's broker verifies client certificates on every TLS listener)"
                    )));
                };
                pem_certs(&format!("{name}.tls.capath"), capath).map_err(config_err)?;
                pem_certs(&format!("{name}.tls.certpath"), certpath).map_err(config_err)?;
                pem_key(&format!("{name}.tls.keypath"), keypath).map_err(config_err)?;
                client_certs = true;
            }
            Some(rumqttd::TlsConfig::NativeTls { .. }) => {
                return Err(config_err(format!(
                    "{name}.tls: pkcs12path is not supported (this build uses rustls: give capath, certpath and keypath as PEM files)"
                )));
            }
        }
        if s.listen.ip().is_loopback() {
            continue;
        }
        let passwords = s.connections.auth.as_ref().is_some_and(|a| !a.is_empty());
        let mut missing = Vec::new();
        if s.tls.is_none() {
            missing.push("TLS");
        }
        if !client_certs && !passwords {
            missing.push("authentication");
        }
        if !missing.is_empty() {
            exposed.push(format!(
                "listener {name} ({}) on {} has no {}",
                s.name,
                s.listen,
                missing.join(" and no ")
            ));
        }
    }
    if let Some(console) = &cfg.console {
        let local = console
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !local {
            exposed.push(format!(
                "the console on {} has no authentication at all",
                console.listen
            ));
        }
    }
    if !exposed.is_empty() && !insecure {
        return Err(BrokerError::Exposed(format!(
            "refusing to start: {}. It is reachable from other hosts, and anyone who reaches it could read every store's traffic and publish rollouts, status and events in their name. Give the listener a [..tls] section (certpath, keypath, capath: clients need certificates signed by capath) and/or [..connections.auth] users, bind it to 127.0.0.1, or pass --insecure to run it anyway. (rumqttd has no topic ACLs either: for per-store authorization use mosquitto with broker-config/mosquitto-acl.conf as the cloud broker.)",
            exposed.join("; ")
        )));
    }
    for e in &exposed {
        tracing::warn!(problem = %e, "running an exposed listener because of --insecure");
    }
    Ok(())
}

fn read_file(field: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: {path}: {e}"))
}

fn pem_certs(field: &str, path: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    let pem = read_file(field, path)?;
    let n = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {path}: not PEM: {e}"))?
        .len();
    if n == 0 {
        return Err(format!("{field}: {path}: no PEM certificate in the file"));
    }
    Ok(())
}

fn pem_key(field: &str, path: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    let pem = read_file(field, path)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map(|_| ())
        .map_err(|e| format!("{field}: {path}: no PEM private key in the file ({e})"))
}

/// The edge/cloud broker configuration shipped in `broker-config/`, for a listen address.
/// `profile` is `cloud` or `edge`.
pub fn builtin_config(profile: &str, listen: SocketAddr) -> Result<rumqttd::Config, BrokerError> {
    let text = match profile {
        "cloud" => include_str!("../../broker-config/cloud.toml"),
        _ => include_str!("../../broker-config/edge.toml"),
    };
    let mut cfg = parse_config(text, profile)?;
    if let Some(v4) = cfg.v4.as_mut() {
        for s in v4.values_mut() {
            s.listen = listen;
        }
    }
    Ok(cfg)
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race remains, as with any
/// server that cannot take a pre-bound socket).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<(), BrokerError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}

/// Starts a broker on its own thread and waits until it listens.
pub fn spawn(cfg: rumqttd::Config) -> Result<SocketAddr, BrokerError> {
    let addr = cfg
        .v4
        .as_ref()
        .and_then(|m| m.values().next())
        .map(|s| s.listen)
        .ok_or(BrokerError::NoListener)?;
    std::thread::Builder::new()
        .name(format!("rumqttd-{}", addr.port()))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(error) = broker.start() {
                tracing::error!(%error, "broker stopped");
            }
        })
        .map_err(|source| BrokerError::Io {
            what: "start the broker thread",
            source,
        })?;
    wait_listening(addr, Duration::from_secs(10))?;
    Ok(addr)
}

/// Starts a built-in profile broker on a free loopback port.
pub fn spawn_free(profile: &str) -> Result<SocketAddr, BrokerError> {
    let mut last = None;
    for _ in 0..5 {
        let port = free_port().map_err(|source| BrokerError::Io {
            what: "find a free port",
            source,
        })?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        match spawn(builtin_config(profile, addr)?) {
            Ok(a) => return Ok(a),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(BrokerError::NoListener))
}

/// Runs a broker on the calling thread (never returns unless it fails).
pub fn run_forever(cfg: rumqttd::Config) -> Result<(), BrokerError> {
    let mut broker = rumqttd::Broker::new(cfg);
    broker.start().map_err(|e| BrokerError::Run(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        for p in ["cloud", "edge"] {
            let cfg = builtin_config(p, "127.0.0.1:1".parse().expect("addr")).expect(p);
            assert!(cfg.v4.is_some());
        }
        assert!(parse_config("id = 0\n[router]\nmax_connections = 1\nmax_outgoing_packet_count = 1\nmax_segment_size = 1024\nmax_segment_count = 1\n", "x").is_err());
    }

    #[test]
    fn exposed_listeners_are_refused_unless_insecure() {
        let any: SocketAddr = "0.0.0.0:1883".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        check_config(&builtin_config("edge", local).expect("cfg"), "edge", false)
            .expect("loopback is fine");
        let cfg = builtin_config("cloud", any).expect("cfg");
        let e = check_config(&cfg, "cloud", false).expect_err("exposed");
        let m = e.to_string();
        assert!(
            m.contains("listener v4.1 (cloud-v4) on 0.0.0.0:1883 has no TLS and no authentication"),
            "{m}"
        );
        assert!(m.contains("--insecure") && m.contains("ACL"), "{m}");
        check_config(&cfg, "cloud", true).expect("--insecure");
        // Passwords alone are authentication, but not TLS.
        let mut pw = cfg.clone();
        for s in pw.v4.iter_mut().flat_map(|m| m.values_mut()) {
            s.connections.auth = Some([("u".to_owned(), "p".to_owned())].into());
        }
        let m = check_config(&pw, "cloud", false)
            .expect_err("no TLS")
            .to_string();
        assert!(m.contains("has no TLS"), "{m}");
        assert!(!m.contains("no authentication"), "{m}");
    }

    #[test]
    fn tls_files_are_checked_before_start() {
        let text = include_str!("../../broker-config/cloud-tls.toml");
        let cfg = parse_config(text, "cloud-tls.toml").expect("parses");
        let m = check_config(&cfg, "cloud-tls.toml", false)
            .expect_err("the example paths do not exist here")
            .to_string();
        assert!(m.contains("v4.1.tls.capath: /etc/roost/tls/ca.pem"), "{m}");
    }
}
