//! End-to-end confirmation from the fleet database: `roost fleet` publishes, retained, on
//! `…/stores/{store}/confirmed` the highest roostseq up to which it has committed every event
//! of the store. Once the bridge has seen one for its store it keeps every event in its
//! outbox until a confirmation covers it, not just until the cloud broker's PUBACK (a broker
//! acknowledges from memory: mosquitto killed before its autosave, or a NATS node dying, loses
//! acknowledged messages). The unconfirmed tail goes again after every reconnect (the link
//! sends the outbox from its oldest row on every connection) and after a stall.
//!
//! The fallback for a fleet without a confirming `roost fleet` (an older controller): until the
//! first confirmation for the store arrives, events go at PUBACK as before, so the buffer never
//! waits for a confirmation that will not come. The switch is remembered in the outbox's
//! database (a restart keeps holding); an empty retained message on the topic (the operator
//! clearing it after moving back to an older controller) switches it off again.

use std::sync::Arc;
use std::time::Duration;

use roost_runtime::{LinkHandle, Outbox};
use roost_schemas::Confirmed;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::upward::UpwardStats;

/// The table remembering that the fleet confirms this store's events.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bridge_cloud_confirmed (id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL);";

/// How long unconfirmed events may wait with no confirmation advancing before the bridge
/// sends the outbox again (a confirmation or an event lost between the broker's PUBACK and
/// the fleet database, on a connection that stayed up).
pub const STALL: Duration = Duration::from_secs(15);

/// What a message on the confirmation topic means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Every event up to this roostseq is in the fleet database.
    Upto(u64),
    /// The topic was cleared: stop holding events for confirmation.
    Cleared,
    /// Not a confirmation (ignored).
    Invalid,
}

/// Reads a message on the confirmation topic. Pure.
pub fn parse(payload: &[u8]) -> Received {
    if payload.is_empty() {
        return Received::Cleared;
    }
    match serde_json::from_slice::<Confirmed>(payload) {
        Ok(c) => Received::Upto(c.roostseq),
        Err(_) => Received::Invalid,
    }
}

/// Whether to send the outbox again: the bridge holds events for confirmation, is connected,
/// its oldest unconfirmed event has waited longer than `stall`, no confirmation advanced for
/// `stall`, and the last resend is `stall` ago. Pure.
pub fn stalled(
    holding: bool,
    connected: bool,
    oldest_waiting: Option<Duration>,
    since_advance: Duration,
    since_resend: Duration,
    stall: Duration,
) -> bool {
    holding
        && connected
        && oldest_waiting.is_some_and(|w| w > stall)
        && since_advance > stall
        && since_resend > stall
}

/// Whether the bridge held events for confirmation when it last stopped.
pub async fn holding_at_open(outbox: &Outbox) -> Result<bool, crate::BridgeError> {
    Ok(outbox
        .read(|c| -> Result<bool, rusqlite::Error> {
            c.execute_batch(SCHEMA)?;
            Ok(c.query_row(
                "SELECT COUNT(*) FROM bridge_cloud_confirmed WHERE id = 1",
                [],
                |r| r.get::<_, i64>(0),
            )? > 0)
        })
        .await??)
}

/// The bridge's side of end-to-end confirmation: applies confirmations to the outbox and the
/// cloud link, and notices stalls.
pub struct Confirmations {
    outbox: Outbox,
    cloud: LinkHandle,
    holding: bool,
    upto: u64,
    advanced: watch::Sender<Instant>,
    stats: Arc<UpwardStats>,
}

impl Confirmations {
    /// Starts holding (or not) as the outbox remembers.
    pub fn new(
        outbox: Outbox,
        cloud: LinkHandle,
        holding: bool,
        stats: Arc<UpwardStats>,
    ) -> Confirmations {
        stats.confirmed(0, holding);
        Confirmations {
            outbox,
            cloud,
            holding,
            upto: 0,
            advanced: watch::channel(Instant::now()).0,
            stats,
        }
    }

    /// Whether events are held for confirmation now.
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Applies one message of the confirmation topic.
    pub async fn receive(&mut self, payload: &[u8]) {
        match parse(payload) {
            Received::Invalid => warn!("ignoring a malformed end-to-end confirmation"),
            Received::Cleared => {
                if self.holding {
                    info!("end-to-end confirmation cleared: events go at the broker's PUBACK");
                    self.holding = false;
                    let _ = self.cloud.set_confirm_events(false);
                    self.remember(None).await;
                }
                self.stats.confirmed(0, false);
            }
            Received::Upto(n) => {
                if !self.holding {
                    info!(
                        roostseq = n,
                        "the fleet confirms this store's events: holding them until confirmed"
                    );
                    self.holding = true;
                    let _ = self.cloud.set_confirm_events(true);
                    self.remember(Some(n)).await;
                }
                if n > self.upto {
                    self.upto = n;
                    self.advanced.send_replace(Instant::now());
                }
                self.outbox.confirm(n);
                self.stats.confirmed(n, true);
            }
        }
    }

    async fn remember(&self, upto: Option<u64>) {
        let res = self
            .outbox
            .read(move |c| -> Result<(), rusqlite::Error> {
                c.execute_batch(SCHEMA)?;
                match upto {
                    Some(n) => c.execute(
                        "INSERT INTO bridge_cloud_confirmed(id, upto) VALUES (1, ?1)
                         ON CONFLICT(id) DO UPDATE SET upto = excluded.upto",
                        [n as i64],
                    )?,
                    None => c.execute("DELETE FROM bridge_cloud_confirmed", [])?,
                };
                Ok(())
            })
            .await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "cannot remember the end-to-end confirmation mode"),
            Err(error) => warn!(%error, "cannot remember the end-to-end confirmation mode"),
        }
    }

    /// A watch of when the confirmation last advanced.
    pub fn advances(&self) -> watch::Receiver<Instant> {
        self.advanced.subscribe()
    }
}

/// Sends the outbox again whenever [`stalled`] says so, until `cancel`. `holding` tells
/// whether events are held for confirmation.
pub async fn watch_stalls(
    outbox: Outbox,
    cloud: LinkHandle,
    stats: Arc<UpwardStats>,
    holding: watch::Receiver<bool>,
    advances: watch::Receiver<Instant>,
    cancel: CancellationToken,
) {
    let mut last_resend = Instant::now();
    let mut tick = tokio::time::interval(STALL / 4);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let oldest = match outbox.stats().await {
            Ok(s) => s.oldest_created_ms,
            Err(error) => {
                warn!(%error, "cannot read the outbox");
                continue;
            }
        };
        let waited = oldest.map(|t| {
            Duration::from_millis(roost_runtime::outbox::now_ms().saturating_sub(t).max(0) as u64)
        });
        let now = Instant::now();
        if stalled(
            *holding.borrow(),
            cloud.is_connected(),
            waited,
            now - *advances.borrow(),
            now - last_resend,
            STALL,
        ) {
            warn!(
                waited_ms = waited.map(|w| w.as_millis() as u64),
                "no end-to-end confirmation for the buffered events: sending them again"
            );
            last_resend = now;
            stats.stall_resend();
            let _ = cloud.rewind();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_messages() {
        assert_eq!(parse(br#"{"roostseq": 12}"#), Received::Upto(12));
        assert_eq!(parse(br#"{"roostseq": 0, "x": 1}"#), Received::Upto(0));
        assert_eq!(parse(b""), Received::Cleared);
        assert_eq!(parse(b"{"), Received::Invalid);
        assert_eq!(parse(br#"{"roostseq": -1}"#), Received::Invalid);
    }

    #[test]
    fn a_resend_only_when_confirmation_stalls() {
        let s = Duration::from_secs;
        let stall = s(15);
        // (holding, connected, oldest waiting, since advance, since resend, resend?)
        let cases = [
            (true, true, Some(s(20)), s(20), s(20), true),
            (false, true, Some(s(20)), s(20), s(20), false), // not holding: PUBACK deletes
            (true, false, Some(s(20)), s(20), s(20), false), // a reconnect resends anyway
            (true, true, None, s(20), s(20), false),         // nothing waits
            (true, true, Some(s(3)), s(20), s(20), false),   // new events after a quiet time
            (true, true, Some(s(20)), s(2), s(20), false),   // confirmations advance
            (true, true, Some(s(20)), s(20), s(5), false),   // just resent
        ];
        for (h, c, w, a, r, want) in cases {
            assert_eq!(
                stalled(h, c, w, a, r, stall),
                want,
                "{h} {c} {w:?} {a:?} {r:?}"
            );
        }
    }
}
