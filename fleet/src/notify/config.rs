//! `roost fleet --notify FILE`: the notification sinks, read and checked whole before the
//! controller starts (a bad file, or a secret file that cannot be read, is a bad
//! configuration). Secrets and tokens are read from their files here and kept in memory
//! only; `Debug` never shows them.
//!
//! ```toml
//! coalesce_s = 5          # events gathered this long into one message per sink
//! stale_after_s = 600     # a store silent this long is told (store_stale); absent: never
//! retry_base_s = 1        # first retry after 1 s, doubling …
//! retry_max_s = 300       # … up to 5 minutes
//! max_attempts = 20       # then the message is given up (failed)
//! max_age_s = 86400       # events older than this when taken (no notifier ran) are not told
//!
//! [[sink]]
//! name = "ops"
//! kind = "webhook"        # webhook | slack | github
//! url = "https://hooks.example/roost"
//! secret_file = "/etc/roost/webhook-secret"   # HMAC-SHA256 key (webhook)
//! events = ["plan_aborted", "store_failed"]   # absent: every kind
//!
//! [[sink]]
//! name = "prs"
//! kind = "github"
//! url = "https://api.github.com/repos/acme/fleet"   # statuses go to {url}/statuses/{sha}
//! token_file = "/etc/roost/github-token"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Kind, NotifyError};

/// What a sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// A JSON body signed with HMAC-SHA256 (`X-Roost-Signature-256`).
    Webhook,
    /// A Slack-compatible incoming webhook (`{"text": …}`).
    Slack,
    /// Commit statuses through the GitHub-compatible API (GitHub, Gitea, Forgejo).
    Github,
}

impl SinkKind {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Github => "github",
        }
    }
}

/// One sink, as the file gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    name: String,
    kind: SinkKind,
    url: Option<String>,
    url_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    events: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyFile {
    #[serde(default)]
    sink: Vec<SinkFile>,
    coalesce_s: Option<f64>,
    stale_after_s: Option<u64>,
    retry_base_s: Option<f64>,
    retry_max_s: Option<u64>,
    max_attempts: Option<u32>,
    max_age_s: Option<u64>,
}

/// A secret read from a file: shown as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One sink, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Its name (unique; the database's messages name it).
    pub name: String,
    /// What it speaks.
    pub kind: SinkKind,
    /// Where it is (may hold a token: never logged; from `url_file` for such URLs).
    pub url: Secret,
    /// The HMAC key of a webhook.
    pub secret: Option<Secret>,
    /// The bearer token of a GitHub-compatible API.
    pub token: Option<Secret>,
    /// The kinds it wants (None: every one).
    pub events: Option<Vec<Kind>>,
    /// A CA to verify an https URL with (default: the system's).
    pub ca_file: Option<PathBuf>,
}

impl SinkConfig {
    /// Whether it wants events of `kind`.
    pub fn wants(&self, kind: Kind) -> bool {
        self.events.as_ref().is_none_or(|k| k.contains(&kind))
    }

    /// The host it sends to, for logs (no path, no credentials).
    pub fn host(&self) -> String {
        let u = self.url.expose();
        let rest = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
        let host = rest.split('/').next().unwrap_or_default();
        host.rsplit('@').next().unwrap_or_default().to_owned()
    }
}

/// The notification configuration, checked.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// The sinks.
    pub sinks: Vec<SinkConfig>,
    /// How long events are gathered into one message.
    pub coalesce: Duration,
    /// A store silent this long is told (None: never).
    pub stale_after: Option<Duration>,
    /// The first retry's delay (doubling).
    pub retry_base: Duration,
    /// The longest delay between retries.
    pub retry_max: Duration,
    /// Attempts before a message is given up.
    pub max_attempts: u32,
    /// Events recorded longer ago than this when the notifier takes them (while none ran:
    /// before `--notify` was given, or the leader was down) are not told.
    pub max_age: Duration,
}

fn read_secret(sink: &str, what: &'static str, path: &Path) -> Result<Secret, NotifyError> {
    let s = std::fs::read_to_string(path).map_err(|source| NotifyError::Secret {
        sink: sink.to_owned(),
        what,
        path: path.display().to_string(),
        source,
    })?;
    Ok(Secret(s.trim().to_owned()))
}

impl NotifyConfig {
    /// Reads and checks `path` (relative secret files are relative to it).
    pub fn read(path: &Path) -> Result<NotifyConfig, NotifyError> {
        let text = std::fs::read_to_string(path).map_err(|e| NotifyError::Config {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        NotifyConfig::parse(&text, path.parent().unwrap_or(Path::new(".")), path)
    }

    /// Parses and checks `text`; files are relative to `dir`.
    pub fn parse(text: &str, dir: &Path, path: &Path) -> Result<NotifyConfig, NotifyError> {
        let bad = |why: String| NotifyError::Config {
            path: path.display().to_string(),
            why,
        };
        let f: NotifyFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if f.sink.is_empty() {
            return Err(bad("no [[sink]]".into()));
        }
        let mut sinks = Vec::new();
        for s in f.sink {
            let n = s.name.clone();
            if n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(format!(
                    "sink name {n:?}: letters, digits, - and _ only"
                )));
            }
            if sinks.iter().any(|x: &SinkConfig| x.name == n) {
                return Err(bad(format!("sink {n}: named twice")));
            }
            let url = match (s.url, &s.url_file) {
                (Some(u), None) => Secret(u),
                (None, Some(p)) => read_secret(&n, "url_file", &dir.join(p))?,
                _ => return Err(bad(format!("sink {n}: one of url or url_file"))),
            };
            let scheme_ok =
                url.expose().starts_with("https://") || url.expose().starts_with("http://");
            if !scheme_ok {
                return Err(bad(format!(
                    "sink {n}: the URL must be http:// or https://"
                )));
            }
            let secret = s
                .secret_file
                .as_ref()
                .map(|p| read_secret(&n, "secret_file", &dir.join(p)))
                .transpose()?;
            let token = s
                .token_file
                .as_ref()
                .map(|p| read_secret(&n, "token_file", &dir.join(p)))
                .transpose()?;
            match s.kind {
                SinkKind::Webhook if secret.as_ref().is_none_or(|s| s.0.is_empty()) => {
                    return Err(bad(format!(
                        "sink {n}: a webhook needs a secret_file (its HMAC key), not empty"
                    )))
                }
                SinkKind::Github if token.is_none() => {
                    return Err(bad(format!("sink {n}: github needs a token_file")))
                }
                _ => {}
            }
            let events = s
                .events
                .map(|es| {
                    es.iter()
                        .map(|e| {
                            Kind::parse(e).ok_or_else(|| {
                                bad(format!(
                                    "sink {n}: unknown event {e:?} (one of {})",
                                    Kind::ALL.map(Kind::as_str).join(", ")
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            sinks.push(SinkConfig {
                name: n,
                kind: s.kind,
                url,
                secret,
                token,
                events,
                ca_file: s.ca_file.map(|p| dir.join(p)),
            });
        }
        let secs = |v: f64, what: &str| {
            if (0.0..86_400.0).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(bad(format!("{what}: between 0 and 86400 seconds")))
            }
        };
        let retry_base = secs(f.retry_base_s.unwrap_or(1.0), "retry_base_s")?;
        if retry_base.is_zero() {
            return Err(bad("retry_base_s: more than 0".into()));
        }
        Ok(NotifyConfig {
            sinks,
            coalesce: secs(f.coalesce_s.unwrap_or(5.0), "coalesce_s")?,
            stale_after: f.stale_after_s.map(Duration::from_secs),
            retry_base,
            retry_max: Duration::from_secs(f.retry_max_s.unwrap_or(300)).max(retry_base),
            max_attempts: f.max_attempts.unwrap_or(20).max(1),
            max_age: Duration::from_secs(f.max_age_s.unwrap_or(86_400).max(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dir: &Path, text: &str) -> Result<NotifyConfig, NotifyError> {
        NotifyConfig::parse(text, dir, &dir.join("notify.toml"))
    }

    #[test]
    fn a_configuration_is_checked_whole_and_secrets_come_from_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("secret"), "s3cret\n").expect("secret");
        std::fs::write(dir.path().join("token"), "tok").expect("token");
        let c = parse(
            dir.path(),
            r#"
            coalesce_s = 0.5
            stale_after_s = 60
            [[sink]]
            name = "ops"
            kind = "webhook"
            url = "http://127.0.0.1:9/hook"
            secret_file = "secret"
            events = ["plan_aborted", "store_failed"]
            [[sink]]
            name = "prs"
            kind = "github"
            url = "https://user:pw@git.example/api/v1/repos/a/fleet"
            token_file = "token"
            "#,
        )
        .expect("config");
        assert_eq!(c.sinks.len(), 2);
        assert_eq!(
            c.sinks[0].secret.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(c.sinks[0].wants(Kind::PlanAborted) && !c.sinks[0].wants(Kind::PlanDone));
        assert!(c.sinks[1].wants(Kind::PlanDone));
        assert_eq!(c.sinks[1].host(), "git.example");
        assert_eq!(c.coalesce, Duration::from_millis(500));
        assert_eq!(c.stale_after, Some(Duration::from_secs(60)));
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("tok\"") && !shown.contains("pw@"));

        for (bad, why) in [
            ("[[sink]]\nname='a'\nkind='webhook'\nurl='http://h/'", "secret_file"),
            ("[[sink]]\nname='a'\nkind='github'\nurl='http://h/'", "token_file"),
            ("[[sink]]\nname='a'\nkind='slack'\nurl='ftp://h/'", "http"),
            ("[[sink]]\nname='a'\nkind='slack'\nurl='http://h/'\nevents=['nope']", "unknown event"),
            ("[[sink]]\nname='a'\nkind='slack'\nurl='http://h/'\n[[sink]]\nname='a'\nkind='slack'\nurl='http://h/'", "twice"),
            ("[[sink]]\nname='a'\nkind='webhook'\nurl='http://h/'\nsecret_file='missing'", "cannot read"),
            ("[[sink]]\nname='a'\nkind='teams'\nurl='http://h/'", "kind"),
            ("", "no [[sink]]"),
        ] {
            let e = parse(dir.path(), bad).expect_err(bad);
            let text = roost_runtime::error_chain(&e);
            assert!(text.contains(why), "{bad}: {text}");
        }
    }
}
