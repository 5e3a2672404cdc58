//! Graceful shutdown: stop accepting, let open connections finish up to a deadline.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub struct Drain {
    signal: watch::Sender<bool>,
    tracker: Mutex<Option<mpsc::Sender<()>>>,
    done: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// Held by every open connection; the drain completes when all are dropped.
pub struct DrainGuard {
    _tx: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Drain {
            signal: watch::channel(false).0,
            tracker: Mutex::new(Some(tx)),
            done: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Drain {
    /// Flips to `true` when draining starts.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A guard for a new connection; `None` once draining has started.
    pub fn guard(&self) -> Option<DrainGuard> {
        let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        tracker.as_ref().map(|tx| DrainGuard { _tx: tx.clone() })
    }

    /// Signals drain and waits until every guard is gone or `deadline` passes.
    /// Returns whether all connections finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.signal.send_replace(true);
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut done = self.done.lock().await;
        tokio::time::timeout(deadline, done.recv()).await.is_ok()
    }
}
