//! One module per `roost` command: its arguments and what it runs. The work itself lives in
//! the libraries (`roost-fleet`, `roost-agent`, `roost-bridge`, `roost-broker`, `roost-sim`).

pub mod agent;
pub mod bench;
pub mod bridge;
pub mod broker;
pub mod ca;
pub mod events;
pub mod fleet;
pub mod git_serve;
pub mod keygen;
pub mod plan;
pub mod promote;
pub mod rollout;
pub mod secret;
pub mod sim;
pub mod status;
pub mod store;
pub mod up;

use std::path::PathBuf;

use clap::Args;
use roost_fleet::cloud;

/// TLS and credentials for the cloud broker (`roost fleet`, `rollout`, `status`, `events`).
#[derive(Args, Clone, Default)]
pub struct BrokerSecurity {
    /// CA certificate(s) (PEM) that sign the broker's certificate; implies TLS. Without it,
    /// an `mqtts://` broker is checked against the system's trust store.
    #[arg(long, env = "ROOST_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its Common Name is the identity that
    /// mosquitto-acl.conf authorizes (`roost-controller`).
    #[arg(long, env = "ROOST_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ROOST_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// MQTT username.
    #[arg(long, env = "ROOST_USERNAME")]
    username: Option<String>,
    /// A file holding the MQTT password (read on every connection attempt).
    #[arg(
        long,
        env = "ROOST_PASSWORD_FILE",
        value_name = "FILE",
        requires = "username"
    )]
    password_file: Option<PathBuf>,
}

impl BrokerSecurity {
    fn security(&self) -> roost_runtime::Security {
        let tls =
            (self.tls_ca.is_some() || self.tls_cert.is_some()).then(|| roost_runtime::TlsFiles {
                ca_file: self.tls_ca.clone(),
                cert_file: self.tls_cert.clone(),
                key_file: self.tls_key.clone(),
            });
        roost_runtime::Security {
            tls,
            username: self.username.clone(),
            password: self
                .password_file
                .clone()
                .map(roost_runtime::Password::File),
            field_prefix: "--".into(),
        }
    }

    /// The broker address with this security, its files checked.
    pub fn target(&self, broker: &str) -> Result<cloud::BrokerTarget, cloud::CloudError> {
        cloud::BrokerTarget::parse(broker, self.security())
    }
}
