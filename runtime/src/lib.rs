//! Shared runtime for roost's store-side components: the durable SQLite outbox and the MQTT
//! link task that drains it, plus reconnect backoff. The agent and the bridge both use these,
//! so that delivery guarantees are implemented (and tested) once.

pub mod backoff;
pub mod link;
pub mod outbox;
pub mod sqlite;

pub use backoff::Backoff;
pub use link::{DirectMessage, Endpoint, Incoming, Link, LinkConfig, LinkError, LinkHandle, Will};
pub use outbox::{NewMessage, Outbox, OutboxConfig, OutboxError, OutboxStats, Payload};
