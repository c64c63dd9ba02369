//! Embedded MQTT broker (rumqttd) from a TOML configuration file, and helpers to run one on a
//! free loopback port for `roost up`, benchmarks and tests.
//!
//! rumqttd cannot report the port it bound and `Broker::start()` never returns, so an embedded
//! broker runs on its own thread for the life of the process (`roost broker` too: on SIGTERM
//! or SIGINT the process ends and the broker with it); a test that must restart a broker runs
//! `roost broker` as a child process instead.

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
    /// The broker failed.
    #[error("broker: {0}")]
    Run(String),
    /// No free port / the broker did not start listening.
    #[error("broker did not start listening on {0}")]
    NotListening(SocketAddr),
}

/// Parses a rumqttd TOML configuration.
pub fn parse_config(text: &str, path: &str) -> Result<rumqttd::Config, BrokerError> {
    let cfg: rumqttd::Config = toml::from_str(text).map_err(|e| BrokerError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if cfg.v4.as_ref().map(|m| m.is_empty()).unwrap_or(true) && cfg.v5.is_none() {
        return Err(BrokerError::Config {
            path: path.to_owned(),
            message: "no [v4.*] or [v5.*] listener configured".into(),
        });
    }
    Ok(cfg)
}

/// Loads a rumqttd TOML configuration file, optionally overriding the first v4 listener.
pub fn load_config(
    path: &Path,
    listen: Option<SocketAddr>,
) -> Result<rumqttd::Config, BrokerError> {
    let text = std::fs::read_to_string(path).map_err(|e| BrokerError::Config {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut cfg = parse_config(&text, &path.display().to_string())?;
    if let Some(addr) = listen {
        if let Some(v4) = cfg.v4.as_mut() {
            if let Some(first) = v4.values_mut().next() {
                first.listen = addr;
            }
        }
    }
    Ok(cfg)
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
        .ok_or_else(|| BrokerError::Run("no v4 listener".into()))?;
    std::thread::Builder::new()
        .name(format!("rumqttd-{}", addr.port()))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(error) = broker.start() {
                tracing::error!(%error, "broker stopped");
            }
        })
        .map_err(|e| BrokerError::Run(e.to_string()))?;
    wait_listening(addr, Duration::from_secs(10))?;
    Ok(addr)
}

/// Starts a built-in profile broker on a free loopback port.
pub fn spawn_free(profile: &str) -> Result<SocketAddr, BrokerError> {
    let mut last = None;
    for _ in 0..5 {
        let port = free_port().map_err(|e| BrokerError::Run(e.to_string()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        match spawn(builtin_config(profile, addr)?) {
            Ok(a) => return Ok(a),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::Run("no port".into())))
}

/// Runs a broker on the calling thread (never returns unless it fails).
pub fn run_forever(cfg: rumqttd::Config) -> Result<(), BrokerError> {
    let mut broker = rumqttd::Broker::new(cfg);
    broker.start().map_err(|e| BrokerError::Run(e.to_string()))
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
}
