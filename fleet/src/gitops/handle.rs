//! How operator requests (pause, resume, abort, sync) reach a controller in the same process:
//! a [`ControllerHandle`] sends them over a channel and the controller acts at once, instead
//! of finding them in the fleet database's request table at its next poll. The table stays
//! for requests from other processes (`roost plan pause`, `roost fleet sync`, an API served
//! by another `roost fleet` on the same database).

use tokio::sync::mpsc;

use crate::db::Request;

/// Requests waiting in the channel at most; a sender beyond waits.
const CAPACITY: usize = 64;

/// Sends operator requests to a controller in this process (the API holds one).
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
}

/// The controller's end of a [`ControllerHandle`]: give it to
/// [`super::run_with_handle`].
#[derive(Debug)]
pub struct ControllerInbox {
    rx: mpsc::Receiver<Request>,
}

/// The controller that owned the inbox has stopped: the request was not delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the GitOps controller has stopped")]
pub struct ControllerGone(
    /// The request.
    pub Request,
);

impl ControllerHandle {
    /// A handle and the inbox for the controller.
    pub fn channel() -> (ControllerHandle, ControllerInbox) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        (ControllerHandle { tx }, ControllerInbox { rx })
    }

    /// Hands `request` to the controller, which acts on it at its next step (at once when
    /// idle).
    pub async fn send(&self, request: Request) -> Result<(), ControllerGone> {
        self.tx.send(request).await.map_err(|e| ControllerGone(e.0))
    }
}

/// The next request from the inbox; pending forever without one (None: every handle was
/// dropped).
pub(super) async fn recv(inbox: &mut Option<ControllerInbox>) -> Option<Request> {
    match inbox {
        Some(i) => i.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `first` and every request waiting behind it.
pub(super) fn drain(first: Request, inbox: &mut Option<ControllerInbox>) -> Vec<Request> {
    let mut out = vec![first];
    if let Some(i) = inbox {
        while let Ok(r) = i.rx.try_recv() {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_arrive_in_order_and_a_stopped_controller_is_reported() {
        let (h, inbox) = ControllerHandle::channel();
        let mut inbox = Some(inbox);
        h.send(Request::Pause("web".into())).await.expect("send");
        h.send(Request::Sync).await.expect("send");
        let first = recv(&mut inbox).await.expect("first");
        assert_eq!(
            drain(first, &mut inbox),
            vec![Request::Pause("web".into()), Request::Sync]
        );
        drop(inbox);
        let gone = h.send(Request::Abort("web".into())).await;
        assert_eq!(gone.expect_err("gone").0, Request::Abort("web".into()));
    }
}
