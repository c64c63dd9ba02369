//! Transport security of an MQTT connection: TLS (rustls) with a CA, an optional client
//! certificate (mutual TLS) and username/password, plus plain-language diagnoses of TLS and
//! authentication failures for the logs.
//!
//! Files are checked once when a configuration is loaded ([`Security::validate`], naming the
//! field) and read again on every connection attempt ([`Security::apply`]), so a renewed
//! certificate, key, CA or password file is picked up on the next reconnect without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// A problem with the security settings or their files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SecurityError {
    /// The configuration field (`cloud.tls.ca_file`, `--tls-ca`, …).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl SecurityError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> SecurityError {
        SecurityError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The CA certificates a TLS client trusts: those in `ca_file` when it is given (then the
/// only trust), else the system trust store's. `field` names the setting in errors.
pub fn trust_anchors(
    field: &str,
    ca_file: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    match ca_file {
        Some(p) => read_certs(field, p),
        None => {
            let found = rustls_native_certs::load_native_certs().certs;
            if found.is_empty() {
                return Err(SecurityError::new(
                    field,
                    "not given, and the system trust store has no certificates",
                ));
            }
            Ok(found)
        }
    }
}

/// The TLS settings of a ureq client on the rustls (ring) the workspace builds, trusting
/// what [`trust_anchors`] reads.
#[cfg(feature = "http")]
pub fn ureq_tls(
    field: &str,
    ca_file: Option<&Path>,
) -> Result<ureq::tls::TlsConfig, SecurityError> {
    let roots: Vec<ureq::tls::Certificate<'static>> = trust_anchors(field, ca_file)?
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .build())
}

/// Where a client's trust comes from, for messages: `FIELD (PATH)` for a CA file, else
/// `the system trust store` (what [`trust_anchors`] reads).
pub fn trust_name(field: &str, ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(p) => format!("{field} ({})", p.display()),
        None => "the system trust store".to_owned(),
    }
}

/// Why a peer's certificate was refused, in plain words: `peer` is what we connected to
/// (`broker`, `server`), `trust` names where the CA certificates came from (`cloud.tls.ca_file
/// (…)`, `the system trust store`).
pub fn certificate_refused(c: &rustls::CertificateError, peer: &str, trust: &str) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer | C::BadSignature => format!(
            "the {peer}'s certificate is not signed by a CA in {trust}: wrong CA file, or the wrong {peer}"
        ),
        C::Expired | C::ExpiredContext { .. } => format!("the {peer}'s certificate has expired"),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("the {peer}'s certificate is not valid yet (check the clock)")
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "the {peer}'s certificate is not valid for the host name or address we connect to"
        ),
        C::Revoked => format!("the {peer}'s certificate is revoked"),
        other => format!("the {peer}'s certificate was not accepted: {other:?}"),
    }
}

/// TLS files of a connection, as configuration files give them:
/// `tls = { ca_file = "…", cert_file = "…", key_file = "…" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the CA certificate(s) that sign the broker's certificate. Absent: the
    /// system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file with this client's certificate chain (mutual TLS); needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Where a password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    /// Given in the configuration.
    Inline(String),
    /// Read from a file (trailing newline removed), on every connection attempt.
    File(PathBuf),
}

/// How a connection authenticates and encrypts. The default is plain MQTT without
/// credentials.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// TLS, if any.
    pub tls: Option<TlsFiles>,
    /// MQTT username.
    pub username: Option<String>,
    /// MQTT password (needs a username).
    pub password: Option<Password>,
    /// Prefix of field names in errors (`cloud.`, `broker.`, `--` for flags).
    pub field_prefix: String,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password itself.
        f.debug_struct("Security")
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field(
                "password",
                &match &self.password {
                    None => "none",
                    Some(Password::Inline(_)) => "inline",
                    Some(Password::File(_)) => "file",
                },
            )
            .finish()
    }
}

/// Field names for errors: configuration files say `cloud.tls.ca_file`, flags `--tls-ca`.
fn names(prefix: &str) -> [String; 5] {
    if prefix == "--" {
        [
            "--tls-ca".into(),
            "--tls-cert".into(),
            "--tls-key".into(),
            "--username".into(),
            "--password-file".into(),
        ]
    } else {
        [
            format!("{prefix}tls.ca_file"),
            format!("{prefix}tls.cert_file"),
            format!("{prefix}tls.key_file"),
            format!("{prefix}username"),
            format!("{prefix}password_file"),
        ]
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError::new(field, format!("{}: {e}", path.display())))
}

/// The PEM certificates of `path` (at least one), errors naming `field`.
pub fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::new(field, format!("{}: not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(SecurityError::new(
            field,
            format!("{}: no PEM certificate in the file", path.display()),
        ));
    }
    Ok(certs)
}

fn read_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, SecurityError> {
    let pem = read(field, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        SecurityError::new(
            field,
            format!("{}: no PEM private key in the file ({e})", path.display()),
        )
    })
}

fn read_password(field: &str, path: &Path) -> Result<String, SecurityError> {
    let bytes = read(field, path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| SecurityError::new(field, format!("{}: not UTF-8", path.display())))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

impl Security {
    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Checks the settings and every file they name (readable, PEM, a key that matches the
    /// certificate's kind), as a configuration error naming the field.
    pub fn validate(&self) -> Result<(), SecurityError> {
        let [ca, cert, key, user, pass] = names(&self.field_prefix);
        if self.password.is_some() && self.username.is_none() {
            return Err(SecurityError::new(
                user,
                "a password needs a username".to_owned(),
            ));
        }
        if let Some(Password::File(p)) = &self.password {
            read_password(&pass, p)?;
        }
        if let Some(t) = &self.tls {
            match (&t.cert_file, &t.key_file) {
                (Some(_), None) => {
                    return Err(SecurityError::new(
                        key,
                        "required with a client certificate",
                    ))
                }
                (None, Some(_)) => {
                    return Err(SecurityError::new(cert, "required with a client key"))
                }
                _ => {}
            }
            if let Some(p) = &t.ca_file {
                read_certs(&ca, p)?;
            }
            self.client_config()?;
        }
        Ok(())
    }

    /// The rustls client configuration, from the files as they are now.
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>, SecurityError> {
        let Some(t) = &self.tls else { return Ok(None) };
        let [ca, cert, key, _, _] = names(&self.field_prefix);
        let mut roots = rustls::RootCertStore::empty();
        for c in trust_anchors(&ca, t.ca_file.as_deref())? {
            // The system store may hold certificates rustls cannot use: those are skipped.
            if let (Some(p), Err(e)) = (&t.ca_file, roots.add(c)) {
                return Err(SecurityError::new(
                    &ca,
                    format!("{}: not a CA certificate: {e}", p.display()),
                ));
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => {
                let chain = read_certs(&cert, c)?;
                let private = read_key(&key, k)?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    SecurityError::new(
                        key,
                        format!("{} does not fit {}: {e}", k.display(), c.display()),
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    /// Sets the transport and the credentials of `o`, reading the files now.
    pub fn apply(&self, o: &mut MqttOptions) -> Result<(), SecurityError> {
        if let Some(config) = self.client_config()? {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        if let Some(user) = &self.username {
            let [_, _, _, _, pass] = names(&self.field_prefix);
            let password = match &self.password {
                None => String::new(),
                Some(Password::Inline(p)) => p.clone(),
                Some(Password::File(p)) => read_password(&pass, p)?,
            };
            o.set_credentials(user.clone(), password);
        }
        Ok(())
    }

    /// What a connection error means in terms of these settings, for the log: a wrong CA,
    /// an expired or rejected certificate, refused credentials. None when it is not a
    /// security problem (the broker is down, the network dropped).
    pub fn diagnose(&self, e: &ConnectionError) -> Option<String> {
        let [ca, cert, _, _, _] = names(&self.field_prefix);
        let ca_name = trust_name(&ca, self.tls.as_ref().and_then(|t| t.ca_file.as_deref()));
        let cert_name = match self.tls.as_ref().and_then(|t| t.cert_file.as_ref()) {
            Some(p) => format!("our client certificate {cert} ({})", p.display()),
            None => "our client certificate".to_owned(),
        };
        let has_cert = self.tls.as_ref().is_some_and(|t| t.cert_file.is_some());
        let io = match e {
            ConnectionError::ConnectionRefused(code) => {
                return Some(match code {
                    ConnectReturnCode::BadUserNamePassword => {
                        "the broker refused the username or password".to_owned()
                    }
                    ConnectReturnCode::NotAuthorized => format!(
                        "the broker refused to authorize this client (wrong username/password, or an identity it does not accept{})",
                        if has_cert { ", e.g. the client certificate's name" } else { "" }
                    ),
                    other => format!("the broker refused the connection: {other:?}"),
                })
            }
            ConnectionError::Tls(rumqttc::TlsError::DNSName(_)) => {
                return Some(
                    "the broker's host is not a valid name for TLS server verification".into(),
                )
            }
            ConnectionError::Tls(rumqttc::TlsError::Io(_)) => innermost_io(e)?,
            ConnectionError::Tls(other) => return Some(format!("TLS setup failed: {other}")),
            // The broker's TLS alert can arrive only when the CONNACK is read (TLS 1.3
            // finishes the client's side of the handshake first): it then comes wrapped in
            // the MQTT state error.
            _ => innermost_io(e)?,
        };
        let Some(tls) = io.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) else {
            if !self.is_tls() {
                return None;
            }
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => Some(format!(
                    "the broker closed the TLS connection before accepting it (it may require a client certificate{}, or refuse {})",
                    if has_cert { "" } else { ", and none is configured" },
                    cert_name
                )),
                _ => None,
            };
        };
        use rustls::AlertDescription as A;
        Some(match tls {
            rustls::Error::InvalidCertificate(c) => certificate_refused(c, "broker", &ca_name),
            rustls::Error::AlertReceived(a) => match a {
                A::CertificateExpired => format!("the broker rejected {cert_name}: it has expired"),
                A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError => {
                    format!("the broker rejected {cert_name}: not signed by a CA it trusts ({a:?})")
                }
                A::CertificateRevoked => format!("the broker rejected {cert_name}: revoked"),
                A::CertificateRequired | A::HandshakeFailure if !has_cert => {
                    "the broker requires a client certificate (set the TLS cert and key files)"
                        .to_owned()
                }
                other => format!("the broker ended the TLS handshake: {other:?}"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                "the broker did not answer with TLS (is this a plain MQTT port?)".to_owned()
            }
            other => format!("TLS failed: {other}"),
        })
    }
}

/// The I/O error somewhere in `e`'s chain of causes (an io::Error hides its own inner error
/// from `source()`, so the chain ends there and the caller looks inside with `get_ref`).
fn innermost_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_the_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Security {
            tls: Some(TlsFiles {
                ca_file: Some(dir.path().join("nope.pem")),
                ..TlsFiles::default()
            }),
            field_prefix: "cloud.".into(),
            ..Security::default()
        };
        let e = s.validate().expect_err("missing CA");
        assert_eq!(e.field, "cloud.tls.ca_file");
        assert!(e.to_string().contains("nope.pem"), "{e}");

        let flags = Security {
            field_prefix: "--".into(),
            ..s.clone()
        };
        assert_eq!(flags.validate().expect_err("missing").field, "--tls-ca");

        std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write");
        let junk = Security {
            tls: Some(TlsFiles {
                ca_file: Some(dir.path().join("junk.pem")),
                ..TlsFiles::default()
            }),
            field_prefix: "broker.".into(),
            ..Security::default()
        };
        let e = junk.validate().expect_err("junk");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let half = Security {
            tls: Some(TlsFiles {
                cert_file: Some(dir.path().join("c.pem")),
                ..TlsFiles::default()
            }),
            field_prefix: "edge.".into(),
            ..Security::default()
        };
        assert_eq!(
            half.validate().expect_err("half").field,
            "edge.tls.key_file"
        );

        let nouser = Security {
            password: Some(Password::Inline("x".into())),
            field_prefix: "cloud.".into(),
            ..Security::default()
        };
        assert_eq!(nouser.validate().expect_err("user").field, "cloud.username");
    }

    #[test]
    fn passwords_come_from_files_without_the_newline_and_never_show() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").expect("write");
        let s = Security {
            username: Some("store-0001".into()),
            password: Some(Password::File(p)),
            ..Security::default()
        };
        s.validate().expect("valid");
        let mut o = MqttOptions::new("c", "127.0.0.1", 1);
        s.apply(&mut o).expect("apply");
        let login = o.credentials().expect("credentials");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("store-0001", "s3cret")
        );
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn refused_credentials_are_explained() {
        let s = Security::default();
        let d = s
            .diagnose(&ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword,
            ))
            .expect("diagnosed");
        assert!(d.contains("username or password"), "{d}");
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let tls = Security {
            tls: Some(TlsFiles {
                ca_file: Some("/etc/roost/ca.pem".into()),
                ..TlsFiles::default()
            }),
            field_prefix: "cloud.".into(),
            ..Security::default()
        };
        let d = tls.diagnose(&ConnectionError::Io(io)).expect("diagnosed");
        assert!(
            d.contains("not signed by a CA in cloud.tls.ca_file (/etc/roost/ca.pem)"),
            "{d}"
        );
        assert!(s
            .diagnose(&ConnectionError::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            )))
            .is_none());
    }
}
