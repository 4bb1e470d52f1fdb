//! Open files: the server's `RLIMIT_NOFILE`, and connection budgets that
//! fit inside it.
//!
//! Every client connection is a descriptor. Under ssh, a login shell or
//! pathos the soft limit is usually 1024 while the hard one is far higher
//! (systemd's default is 1024:524288), and the default budgets
//! (`--max-connections` 4096 plus `--max-handshakes` 1024) need more. A
//! server out of descriptors can accept no one and cannot replace a worker
//! that dies. So, as Go programs do, [`raise`] lifts the soft limit to the
//! hard one at startup, and workers get the original soft limit back
//! before they exec ([`restore_in_child`]), so jobs see what they would
//! see under ppft's server (some C libraries still use `select`, which
//! breaks past 1024).
//!
//! If even the hard limit cannot hold the budgets, [`fit`] lowers the
//! budgets left at their defaults until they fit beside what the server
//! keeps for itself ([`reserved`]); a budget given by a flag or config key
//! that cannot fit is an error instead ([`Unfit`]), since the operator
//! asked for it.
//!
//! Here in `ops` rather than in `config` or `server`: it is about the host
//! the server is run on, like the pid and ready files, and it depends on
//! nothing but numbers, so the config, the server's wiring and the
//! workers' spawn can all use it without importing each other.

use std::io;
use std::sync::OnceLock;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for each worker: its stdin, stdout and stderr pipes
/// and its pidfd (4), and as many again for a replacement started while
/// the old worker's pipes are still held (a child its job left may keep
/// stderr open for a while).
pub const FDS_PER_WORKER: usize = 8;
/// Descriptors kept for everything short-lived: the pipes of a worker
/// being spawned, the reaper's reads of `/proc`, the pid and ready files,
/// a connection accepted only to be refused, and room to spare.
pub const MARGIN: usize = 32;

/// The open-file limits after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with, given back to workers.
    pub original_soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit now: the hard one, unless raising it failed.
    pub soft: u64,
}

impl OpenFiles {
    /// The limits (soft, hard) a worker gets before it execs: the soft
    /// limit the server started with, when it raised its own; `None`: the
    /// server's own, unchanged.
    pub fn for_workers(&self) -> Option<(u64, u64)> {
        (self.original_soft < self.soft).then_some((self.original_soft, self.hard))
    }

    /// The soft limit now, as a count of descriptors.
    pub fn limit(&self) -> usize {
        usize::try_from(self.soft).unwrap_or(usize::MAX)
    }
}

/// The limits the process started with, read once: a second server in
/// the same process (the integration tests start many) must give its
/// workers the limit the process had before the first one raised it.
static ORIGINAL: OnceLock<(u64, u64)> = OnceLock::new();

/// Raises the soft open-file limit to the hard one; returns the limits,
/// or the error of `getrlimit`/`setrlimit` with the limits as they are
/// (the caller logs it and fits the budgets to the unraised limit).
pub fn raise() -> Result<OpenFiles, (io::Error, OpenFiles)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| {
        let unknown = OpenFiles {
            original_soft: u64::MAX,
            hard: u64::MAX,
            soft: u64::MAX,
        };
        (io::Error::from(e), unknown)
    })?;
    let (original_soft, _) = *ORIGINAL.get_or_init(|| (soft, hard));
    let limits = OpenFiles {
        original_soft,
        hard,
        soft,
    };
    if soft >= hard {
        return Ok(limits);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Ok(OpenFiles {
            soft: hard,
            ..limits
        }),
        Err(e) => Err((io::Error::from(e), limits)),
    }
}

/// Startup step, before anything is opened: [`raise`], with a failure
/// logged (the budgets then fit the limit as it is).
pub fn raise_logged() -> OpenFiles {
    match raise() {
        Ok(files) => {
            if files.original_soft < files.soft {
                log::debug!(
                    "open files: soft limit raised from {} to the hard limit {}; workers get {} \
                     back",
                    files.original_soft,
                    files.soft,
                    files.original_soft
                );
            }
            files
        }
        Err((e, files)) => {
            log::warn!(
                "cannot raise the open-file limit from {} to the hard limit {}: {e}",
                files.soft,
                files.hard
            );
            files
        }
    }
}

/// Sets the soft open-file limit back to `soft` (the hard one stays
/// `hard`); for a worker, in its `pre_exec`. Makes one system call and
/// allocates nothing, so it is safe between fork and exec.
pub fn restore_in_child(soft: u64, hard: u64) -> io::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard).map_err(io::Error::from)
}

/// How many descriptors the process has open now, from `/proc/self/fd`;
/// `None` where that cannot be read.
pub fn open_now() -> Option<usize> {
    // The directory's own descriptor is listed too.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1),
    )
}

/// Descriptors the server keeps for itself beside client connections:
/// those open at startup (stdio, the runtime, the listeners, whatever was
/// inherited), the workers', the metrics port's connections, and
/// [`MARGIN`].
pub fn reserved(open_at_start: usize, workers: usize, metrics_connections: usize) -> usize {
    open_at_start
        .saturating_add(workers.saturating_mul(FDS_PER_WORKER))
        .saturating_add(metrics_connections)
        .saturating_add(MARGIN)
}

/// A connection budget and whether it was given (by a flag or config
/// key) or is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Connections at once.
    pub value: usize,
    /// Given explicitly: it may not be lowered.
    pub given: bool,
}

/// The budgets that fit: `--max-connections` and `--max-handshakes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fitted {
    /// Authenticated connections at once.
    pub connections: usize,
    /// Connections in their handshake at once.
    pub handshakes: usize,
}

/// Budgets that cannot fit the limit, with the numbers for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfit {
    /// The open-file limit.
    pub limit: usize,
    /// What the server keeps for itself ([`reserved`]).
    pub reserved: usize,
    /// What is left for client connections.
    pub room: usize,
    /// The budgets asked for.
    pub connections: Budget,
    /// See `connections`.
    pub handshakes: Budget,
}

/// Budgets that fit in `limit` descriptors beside `reserved` ones: as
/// asked when they fit; otherwise the default ones lowered to fill the
/// room left, the two defaults in their default proportion (the
/// handshakes' share of the sum, at least 1 each), a default beside a
/// given one taking what the given one leaves. An error when a given
/// budget leaves no room for the other, or the room holds fewer than one
/// connection of each kind.
pub fn fit(
    limit: usize,
    reserved: usize,
    connections: Budget,
    handshakes: Budget,
) -> Result<Fitted, Unfit> {
    let room = limit.saturating_sub(reserved);
    let asked = Fitted {
        connections: connections.value,
        handshakes: handshakes.value,
    };
    if connections.value.saturating_add(handshakes.value) <= room {
        return Ok(asked);
    }
    let unfit = Unfit {
        limit,
        reserved,
        room,
        connections,
        handshakes,
    };
    let fitted = match (connections.given, handshakes.given) {
        (true, true) => None,
        (true, false) => room
            .checked_sub(connections.value)
            .filter(|&h| h >= 1)
            .map(|h| Fitted {
                handshakes: h,
                ..asked
            }),
        (false, true) => room
            .checked_sub(handshakes.value)
            .filter(|&c| c >= 1)
            .map(|c| Fitted {
                connections: c,
                ..asked
            }),
        (false, false) => (room >= 2).then(|| {
            let sum = connections.value.saturating_add(handshakes.value).max(1);
            // room < sum here, so the product cannot overflow a u128.
            let share = (room as u128 * handshakes.value as u128 / sum as u128) as usize;
            let handshakes = share.clamp(1, room - 1);
            Fitted {
                connections: room - handshakes,
                handshakes,
            }
        }),
    };
    fitted.ok_or(unfit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default(value: usize) -> Budget {
        Budget {
            value,
            given: false,
        }
    }

    fn given(value: usize) -> Budget {
        Budget { value, given: true }
    }

    #[test]
    fn budgets_that_fit_are_kept() {
        let f = fit(20000, 100, default(4096), default(1024)).unwrap();
        assert_eq!((f.connections, f.handshakes), (4096, 1024));
        // Exactly full still fits.
        let f = fit(5220, 100, given(4096), given(1024)).unwrap();
        assert_eq!((f.connections, f.handshakes), (4096, 1024));
    }

    #[test]
    fn defaults_shrink_in_their_proportion_to_fill_the_room() {
        let reserved = reserved(13, 2, 0);
        assert_eq!(reserved, 13 + 16 + 32);
        let f = fit(512, reserved, default(4096), default(1024)).unwrap();
        assert_eq!(f.connections + f.handshakes, 512 - reserved);
        assert_eq!(f.handshakes, (512 - reserved) / 5);
        assert!(f.connections >= 4 * f.handshakes);
    }

    #[test]
    fn a_default_beside_a_given_budget_takes_what_is_left() {
        let f = fit(512, 62, given(300), default(1024)).unwrap();
        assert_eq!((f.connections, f.handshakes), (300, 150));
        let f = fit(512, 62, default(4096), given(50)).unwrap();
        assert_eq!((f.connections, f.handshakes), (400, 50));
    }

    #[test]
    fn a_given_budget_that_cannot_fit_is_an_error_with_the_numbers() {
        let e = fit(512, 62, given(4096), default(1024)).unwrap_err();
        assert_eq!((e.limit, e.reserved, e.room), (512, 62, 450));
        assert_eq!(e.connections, given(4096));
        // A given budget that leaves nothing for the other.
        assert!(fit(512, 62, given(450), default(1024)).is_err());
        assert!(fit(512, 62, default(4096), given(450)).is_err());
        assert!(fit(512, 62, given(400), given(100)).is_err());
    }

    #[test]
    fn no_room_for_one_connection_of_each_kind_is_an_error() {
        assert!(fit(60, 62, default(4096), default(1024)).is_err());
        assert!(fit(63, 62, default(4096), default(1024)).is_err());
        let f = fit(64, 62, default(4096), default(1024)).unwrap();
        assert_eq!((f.connections, f.handshakes), (1, 1));
    }

    #[test]
    fn raising_keeps_the_original_soft_limit_for_workers() {
        let Ok(first) = raise() else { return };
        assert_eq!(first.soft, first.hard);
        let again = raise().unwrap();
        assert_eq!(again.original_soft, first.original_soft);
        assert!(open_now().is_some_and(|n| n >= 3));
    }
}
