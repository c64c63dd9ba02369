//! What each kind of sink is sent, and sending it: the bodies (pure), the HMAC-SHA256
//! signature of a webhook, and the HTTP request (blocking, over ureq and the rustls the
//! workspace already uses; run on the blocking pool).
//!
//! Every request carries `X-Roost-Delivery: <idempotency key>` and `Idempotency-Key` (the
//! same value): the same message sent again after a lost answer or a restart carries the
//! same key, so a receiver can drop the second copy.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;

use super::config::{SinkConfig, SinkKind};
use super::{counts, truncate, Kind, Message, NotifyError, NotifyEvent, MAX_LISTED};

/// The header of a webhook's signature: `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "X-Roost-Signature-256";
/// The header carrying a message's idempotency key.
pub const DELIVERY_HEADER: &str = "X-Roost-Delivery";

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as a webhook's
/// [`SIGNATURE_HEADER`] carries it (GitHub's `X-Hub-Signature-256` scheme).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook's body: the coalesced events with counts (the first [`MAX_LISTED`] listed).
pub fn webhook_body(key: &str, events: &[&NotifyEvent]) -> String {
    let listed: Vec<&&NotifyEvent> = events.iter().take(MAX_LISTED).collect();
    json!({
        "id": key,
        "source": "roost fleet",
        "summary": summary(events),
        "counts": counts(events.iter().copied()),
        "events": listed,
        "omitted": events.len().saturating_sub(MAX_LISTED),
    })
    .to_string()
}

/// One line over the events: `plan aborted: web; 2000 × store failed`.
fn summary(events: &[&NotifyEvent]) -> String {
    match events {
        [one] => one.summary.clone(),
        _ => counts(events.iter().copied())
            .iter()
            .map(|(k, n)| format!("{n} × {}", k.replace('_', " ")))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A Slack-compatible incoming webhook's body: `{"text": …}`, a summary line and one line
/// per event (the first [`MAX_LISTED`]).
pub fn slack_body(events: &[&NotifyEvent]) -> String {
    let mut text = format!("*roost*: {}", summary(events));
    if events.len() > 1 {
        for e in events.iter().take(MAX_LISTED) {
            let mark = if e.kind.is_failure() { "✗" } else { "✓" };
            text.push_str(&format!("\n{mark} {}", e.summary));
        }
        if events.len() > MAX_LISTED {
            text.push_str(&format!("\n… and {} more", events.len() - MAX_LISTED));
        }
    }
    json!({ "text": text }).to_string()
}

/// The context of a commit status: `roost/<deployment>`, or `roost/fleet` for the file.
pub fn status_context(e: &NotifyEvent) -> String {
    match &e.deployment {
        Some(d) => format!("roost/{d}"),
        None => "roost/fleet".into(),
    }
}

/// A commit status's body for the newest event about a commit and deployment:
/// `pending` while the plan runs, `success` when done, `failure` when aborted or the commit
/// is invalid; the description is the waves' progress (`canary 1/1, half 48/50`).
pub fn github_body(e: &NotifyEvent) -> String {
    let state = match e.kind {
        Kind::PlanDone => "success",
        Kind::PlanStarted | Kind::WaveDone => "pending",
        _ => "failure",
    };
    let description = match e.kind {
        Kind::PlanAborted => format!(
            "aborted: {} failed; {}",
            e.failed.unwrap_or(0),
            e.progress.clone().unwrap_or_default()
        ),
        Kind::InvalidCommit => format!("invalid: {}", e.reason.clone().unwrap_or_default()),
        _ => match e.progress.as_deref() {
            Some(p) if !p.is_empty() => p.to_owned(),
            _ => e.summary.clone(),
        },
    };
    // GitHub refuses a description over 140 characters.
    json!({
        "state": state,
        "context": status_context(e),
        "description": truncate(&description, 140),
    })
    .to_string()
}

/// The HTTP client of one sink.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
}

impl Client {
    /// A client for `sink` (its CA, or the system's roots for https).
    pub fn new(sink: &SinkConfig, timeout: Duration) -> Result<Client, NotifyError> {
        let tls = roost_runtime::security::ureq_tls("notify.ca_file", sink.ca_file.as_deref())
            .map_err(|e| NotifyError::Send(format!("sink {}: {e}", sink.name)))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .user_agent(concat!("roost-fleet/", env!("CARGO_PKG_VERSION")))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client { agent })
    }

    /// Sends `m` to `sink` once; Ok when it answered 2xx. The error names the status or
    /// what failed, never a secret or the URL's path.
    pub fn send(&self, sink: &SinkConfig, m: &Message) -> Result<(), NotifyError> {
        let base = sink.url.expose().trim_end_matches('/');
        let url = match sink.kind {
            SinkKind::Github => format!("{base}/statuses/{}", m.target),
            _ => sink.url.expose().to_owned(),
        };
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header(DELIVERY_HEADER, &m.key)
            .header("Idempotency-Key", &m.key);
        if let Some(secret) = &sink.secret {
            req = req.header(
                SIGNATURE_HEADER,
                &signature(secret.expose().as_bytes(), m.body.as_bytes()),
            );
        }
        if let Some(token) = &sink.token {
            req = req
                .header("Authorization", &format!("token {}", token.expose()))
                .header("Accept", "application/vnd.github+json");
        }
        match req.send(m.body.as_bytes()) {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(NotifyError::Send(format!(
                "{} answered {}",
                sink.host(),
                r.status()
            ))),
            Err(e) => Err(NotifyError::Send(format!(
                "{}: {}",
                sink.host(),
                redact(&e.to_string(), sink)
            ))),
        }
    }
}

/// `text` without the sink's URL or secrets in it (an error may quote the URL).
fn redact(text: &str, sink: &SinkConfig) -> String {
    let mut t = text.replace(sink.url.expose(), &sink.host());
    for s in [&sink.secret, &sink.token].into_iter().flatten() {
        if !s.expose().is_empty() {
            t = t.replace(s.expose(), "<redacted>");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_githubs_scheme() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn slack_lists_events_and_how_many_were_left_out() {
        let es: Vec<NotifyEvent> = (0..25)
            .map(|i| {
                super::super::stale_events(&[(format!("s{i}"), 0)], 10_000, Duration::from_secs(1))
                    .remove(0)
            })
            .collect();
        let refs: Vec<&NotifyEvent> = es.iter().collect();
        let v: serde_json::Value = serde_json::from_str(&slack_body(&refs)).expect("json");
        let text = v["text"].as_str().expect("text");
        assert!(text.starts_with("*roost*: 25 × store stale"), "{text}");
        assert!(text.ends_with("… and 5 more"), "{text}");
    }
}
