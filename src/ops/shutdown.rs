//! Stopping the server: the requests to stop (SIGTERM, SIGINT, SIGHUP) and
//! the drain they start.
//!
//! On the first request the server stops accepting (listener, autodiscovery
//! and ready file go at once), every job already received is run and
//! answered, and each connection is closed as soon as it has no job
//! pending, so jobs sent after the request never start here: their clients
//! find the connection closed and send them elsewhere or again. The drain
//! ends when every connection has closed, after `--drain-timeout`, or on a
//! second request, whichever comes first (signals within
//! [`REPEAT_WINDOW`] of the first are the same request); then the remaining connections
//! are closed (pp clients resubmit a job whose connection broke, so none
//! is lost, where an answer of `None` would be a silent wrong value) and
//! the workers are stopped.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Default `--drain-timeout`: long enough for typical jobs to finish, and
/// shorter than systemd's default stop timeout (90 s) and the unit's 30 s.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Stop signals this soon after the first one are the same request, not a
/// second one that cuts the drain short: Slurm's time limit sends SIGTERM
/// to every process of the job twice within milliseconds.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// Requests to stop, in the order they arrive.
#[derive(Debug)]
pub struct StopRequests {
    /// What asked (e.g. "SIGTERM"), once per request.
    rx: mpsc::UnboundedReceiver<&'static str>,
    /// When the first request came.
    first: Option<Instant>,
    /// Keeps the channel open when no sender is left, so a server whose
    /// signal handlers could not be installed waits instead of stopping.
    _keep: Option<mpsc::UnboundedSender<&'static str>>,
}

impl StopRequests {
    /// Requests made through the returned sender; for tests and embedders.
    pub fn channel() -> (mpsc::UnboundedSender<&'static str>, StopRequests) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            StopRequests {
                rx,
                first: None,
                _keep: None,
            },
        )
    }

    /// SIGINT, SIGTERM and SIGHUP, each delivery a request. SIGHUP means
    /// the terminal or ssh session that started the server went away: a
    /// clean stop, not death where it stands. A server started with SIGHUP
    /// ignored (`nohup`) keeps ignoring it. Must be called inside the
    /// runtime.
    pub fn from_signals() -> StopRequests {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = mpsc::unbounded_channel();
        let mut kinds = vec![
            (SignalKind::interrupt(), "SIGINT"),
            (SignalKind::terminate(), "SIGTERM"),
        ];
        if !hangup_ignored() {
            kinds.push((SignalKind::hangup(), "SIGHUP"));
        }
        for (kind, name) in kinds {
            match signal(kind) {
                Ok(mut stream) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while stream.recv().await.is_some() {
                            if tx.send(name).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(e) => log::error!("cannot handle {name}: {e}"),
            }
        }
        StopRequests {
            rx,
            first: None,
            _keep: Some(tx),
        }
    }

    /// The next request; logs it. Signals within [`REPEAT_WINDOW`] of the
    /// first request are logged and passed over.
    pub async fn next(&mut self) {
        loop {
            let Some(what) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            let now = Instant::now();
            match self.first {
                None => self.first = Some(now),
                Some(first) if now.duration_since(first) < REPEAT_WINDOW => {
                    log::info!(
                        "{what} received again within {REPEAT_WINDOW:?} of the first stop \
                         request: the same request"
                    );
                    continue;
                }
                Some(_) => {}
            }
            log::info!("{what} received");
            return;
        }
    }
}

/// Whether SIGHUP was ignored when the server started (as `nohup` does).
fn hangup_ignored() -> bool {
    // SAFETY: a null new action only reads the current disposition into
    // `old`, a plain C struct that a zeroed value initialises.
    unsafe {
        let mut old: nix::libc::sigaction = std::mem::zeroed();
        nix::libc::sigaction(nix::libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == nix::libc::SIG_IGN
    }
}

/// The drain as sessions see it: they close once they have no job
/// pending.
#[derive(Debug, Clone)]
pub(crate) struct Draining(watch::Receiver<bool>);

impl Draining {
    /// Whether the drain has begun (or the server is gone).
    pub(crate) fn has_begun(&self) -> bool {
        self.0.has_changed().is_err() || *self.0.borrow()
    }

    /// Completes once the drain has begun (at once if it has).
    pub(crate) async fn begun(&mut self) {
        // An error means the server is gone: as good as draining.
        let _ = self.0.wait_for(|&d| d).await;
    }
}

/// Starts the drain; see [`Draining`].
#[derive(Debug)]
pub(crate) struct DrainSwitch(watch::Sender<bool>);

impl DrainSwitch {
    /// A switch not yet thrown.
    pub(crate) fn new() -> DrainSwitch {
        DrainSwitch(watch::channel(false).0)
    }

    /// Tells every session the drain has begun.
    pub(crate) fn begin(&self) {
        self.0.send_replace(true);
    }

    /// What a new session watches.
    pub(crate) fn watch(&self) -> Draining {
        Draining(self.0.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_arrive_one_by_one() {
        let (tx, mut stops) = StopRequests::channel();
        tx.send("first").unwrap();
        stops.next().await;
        tokio::time::advance(REPEAT_WINDOW).await;
        tx.send("second").unwrap();
        stops.next().await;
        drop(tx);
        let pending = tokio::time::timeout(Duration::from_millis(10), stops.next()).await;
        assert!(pending.is_err(), "no sender left: waits forever");
    }

    #[tokio::test(start_paused = true)]
    async fn signals_right_after_the_first_are_the_same_request() {
        let (tx, mut stops) = StopRequests::channel();
        tx.send("SIGTERM").unwrap();
        tx.send("SIGTERM").unwrap();
        stops.next().await;
        let again = tokio::time::timeout(Duration::from_millis(10), stops.next()).await;
        assert!(again.is_err(), "the repeat is not a second request");
        tokio::time::advance(REPEAT_WINDOW).await;
        tx.send("SIGINT").unwrap();
        stops.next().await;
    }

    #[tokio::test]
    async fn sessions_see_the_drain_begin() {
        let switch = DrainSwitch::new();
        let mut draining = switch.watch();
        let early = tokio::time::timeout(Duration::from_millis(10), draining.begun()).await;
        assert!(early.is_err(), "not begun yet");
        let mut other = draining.clone();
        assert!(!draining.has_begun());
        switch.begin();
        assert!(draining.has_begun());
        draining.begun().await;
        other.begun().await;
        switch.watch().begun().await;
    }
}
