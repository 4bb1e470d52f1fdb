//! The connection budgets (`--max-connections`, `--max-handshakes`)
//! fitted into the open-file limit at startup: the config's side of
//! [`crate::ops::openfiles`], which does the arithmetic on plain numbers.
//! Budgets left at their defaults are lowered to fit; one given by a flag
//! or key that cannot fit is a startup error ([`NoRoom`]) naming it.

use crate::config::{BudgetOrigins, Config};
use crate::ops::openfiles::{self, Budget, OpenFiles, Unfit};
use crate::ops::scrapes::MAX_SCRAPES;

/// Connection budgets that cannot fit the open-file limit, with the
/// numbers for the startup error.
#[derive(Debug)]
pub struct NoRoom {
    /// The arithmetic's verdict, with the limit and the budgets.
    pub unfit: Unfit,
    /// The hard open-file limit.
    pub hard: u64,
    /// What the reserve is made of: descriptors open at startup, workers,
    /// the metrics port's cap (0 without `--metrics`).
    pub open_at_start: usize,
    /// See `open_at_start`.
    pub workers: usize,
    /// See `open_at_start`.
    pub metrics: usize,
    /// Where each budget was given, if it was.
    pub origins: BudgetOrigins,
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = &self.unfit;
        let conns = self.origins.max_connections.as_ref();
        let hands = self.origins.max_handshakes.as_ref();
        match (conns, hands) {
            (Some(c), Some(h)) => write!(
                f,
                "{c} {} plus {h} {} need {} open files for client connections",
                u.connections.value,
                u.handshakes.value,
                u.connections.value.saturating_add(u.handshakes.value)
            )?,
            (Some(c), None) => write!(
                f,
                "{c} {} plus at least 1 connection in its handshake need {} open files \
                 for client connections",
                u.connections.value,
                u.connections.value.saturating_add(1)
            )?,
            (None, Some(h)) => write!(
                f,
                "{h} {} plus at least 1 authenticated connection need {} open files for \
                 client connections",
                u.handshakes.value,
                u.handshakes.value.saturating_add(1)
            )?,
            (None, None) => f.write_str(
                "client connections need at least 2 open files (one authenticated, one in \
                 its handshake)",
            )?,
        }
        write!(
            f,
            ", but the open-file limit is {} (hard limit {}) and the server keeps {} for \
             itself ({} open at startup, {} for {} workers, {} for the metrics port, {} to \
             spare), which leaves {}",
            u.limit,
            self.hard,
            u.reserved,
            self.open_at_start,
            self.workers * openfiles::FDS_PER_WORKER,
            self.workers,
            self.metrics,
            openfiles::MARGIN,
            u.room,
        )?;
        match (conns, hands) {
            (Some(c), None) if u.room >= 2 => write!(f, "; lower {c} to at most {}", u.room - 1)?,
            (None, Some(h)) if u.room >= 2 => write!(f, "; lower {h} to at most {}", u.room - 1)?,
            (Some(c), Some(h)) => write!(f, "; lower {c} and {h} to at most {} together", u.room)?,
            _ => {}
        }
        f.write_str(", or raise the hard limit (ulimit -Hn; LimitNOFILE= under systemd)")
    }
}

impl Config {
    /// Startup step, once everything the server holds for itself is open
    /// (but the workers, which are counted apart): fits
    /// `--max-connections` and `--max-handshakes` into the open-file limit
    /// beside what the server keeps for itself ([`openfiles::fit`]),
    /// lowering the defaults if need be. Returns what to add to the
    /// startup line: empty when nothing was lowered.
    pub fn fit_open_files(&mut self, files: &OpenFiles) -> Result<String, Box<NoRoom>> {
        // Unreadable /proc: assume a small process, and let the margin
        // absorb the error.
        let open_at_start = openfiles::open_now().unwrap_or(16);
        let metrics = if self.metrics.is_some() {
            MAX_SCRAPES
        } else {
            0
        };
        let reserved = openfiles::reserved(open_at_start, self.workers, metrics);
        let budget = |value, origin: &Option<_>| Budget {
            value,
            given: origin.is_some(),
        };
        let fitted = openfiles::fit(
            files.limit(),
            reserved,
            budget(self.max_connections, &self.budget_origins.max_connections),
            budget(self.max_handshakes, &self.budget_origins.max_handshakes),
        )
        .map_err(|unfit| {
            Box::new(NoRoom {
                unfit,
                hard: files.hard,
                open_at_start,
                workers: self.workers,
                metrics,
                origins: self.budget_origins.clone(),
            })
        })?;
        let mut lowered = Vec::new();
        if fitted.connections < self.max_connections {
            lowered.push(format!("--max-connections to {}", fitted.connections));
        }
        if fitted.handshakes < self.max_handshakes {
            lowered.push(format!("--max-handshakes to {}", fitted.handshakes));
        }
        self.max_connections = fitted.connections;
        self.max_handshakes = fitted.handshakes;
        log::debug!(
            "open files: limit {}, {reserved} kept for the server ({open_at_start} open at \
             startup, {} workers, metrics port {metrics}, {} to spare), {} + {} for client \
             connections",
            files.limit(),
            self.workers,
            openfiles::MARGIN,
            fitted.connections,
            fitted.handshakes,
        );
        Ok(if lowered.is_empty() {
            String::new()
        } else {
            format!(
                ", open-file limit {}: lowered {} to fit",
                files.limit(),
                lowered.join(" and ")
            )
        })
    }
}
