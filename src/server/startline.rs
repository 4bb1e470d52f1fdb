//! The startup line: what the server says once it is set up, before the
//! port listens. Launchers and people read it (the address, the workers
//! and their interpreter, the pp version clients must run, how workers
//! start, the memory budget and limit), so its wording is part of the
//! interface. Also the warning about pp's public default secret, which
//! waits for the first client where the startup line is not shown.

use std::net::SocketAddr;

use crate::config::users::Users;
use crate::config::Config;
use crate::front::discovery;
use crate::ops::metrics::metrics;
use crate::workers::install::{self, Interpreter};
use crate::workers::memlimit::MemoryLimit;

/// What the startup line tells.
pub(crate) struct StartupFacts<'a> {
    /// The settled config.
    pub(crate) cfg: &'a Config,
    /// Where the port is bound.
    pub(crate) local: SocketAddr,
    /// The workers' interpreter and package.
    pub(crate) interpreter: &'a Interpreter,
    /// Workers come from the fork-server.
    pub(crate) forked: bool,
    /// The open-file note: budgets lowered to fit, or empty.
    pub(crate) lowered: &'a str,
    /// `--worker-memory-limit`, as set up.
    pub(crate) memory_limit: Option<&'a MemoryLimit>,
    /// Who may log in.
    pub(crate) users: &'a Users,
    /// The pid of the process a reload started this one from.
    pub(crate) taking_over_from: Option<u32>,
}

/// Logs the startup line (and the default-secret warning, and a foreign
/// `ppserver` beside the binary). Returns whether the default-secret
/// warning is still owed: held back until the first client connects when
/// the log shows no info lines (a launcher's pipe), since the server
/// prints nothing at startup there.
pub(crate) fn log(facts: &StartupFacts<'_>) -> bool {
    let cfg = facts.cfg;
    // With a users file and no -s, pp's public secret is nobody's: no
    // warning is owed.
    let public = cfg.secret_is_default && cfg.users.is_none();
    let owed = public && !log::log_enabled!(log::Level::Info);
    if public && !owed {
        warn_default_secret();
    }
    install::warn_about_foreign_ppserver();
    if let Some(file) = &cfg.users {
        if file.readable_by_others {
            log::warn!(
                "the users file {} (--users) can be read by group or others: it holds every \
                 user's secret; chmod 600 it",
                file.path.display()
            );
        }
    }
    for user in facts.users.all() {
        metrics().add_user(&user.name);
    }
    let interpreter = facts.interpreter;
    let version = cfg.pp_version.as_ref().unwrap_or(&interpreter.version);
    log::info!(
        "ppserver listening on {} with {} workers ({} -u -m {}), advertising pp version \
         {version}{}, {}{}{}, memory limit {}{}{}{}{}",
        facts.local,
        cfg.workers,
        interpreter.python.display(),
        interpreter.module,
        if cfg.pp_version.is_some() {
            format!(
                " (--pp-version; the worker package is {})",
                interpreter.version
            )
        } else {
            String::new()
        },
        worker_start(cfg, facts.forked),
        match cfg.advertise_ncpus {
            Some(n) => format!(", telling clients {n} CPUs (--advertise-ncpus)"),
            None => String::new(),
        },
        discovery::summary(cfg),
        crate::memory::budget::human(cfg.memory_limit),
        facts.lowered,
        match facts.memory_limit {
            Some(m) => format!(", {}", m.describe()),
            None => String::new(),
        },
        users_summary(cfg, facts.users),
        match facts.taking_over_from {
            // Both generations' workers hold memory for a while.
            Some(pid) => format!(
                "; a reload: taking over from pid {pid} once a worker is up, while its \
                 workers run on until its connections drain"
            ),
            None => String::new(),
        },
    );
    owed
}

/// The startup line's part about `--users`: how many users, and whether
/// workers are kept to one user each; empty without a users file.
fn users_summary(cfg: &Config, users: &Users) -> String {
    let Some(file) = &cfg.users else {
        return String::new();
    };
    let names: Vec<&str> = users.all().iter().map(|u| u.name.as_str()).collect();
    let shown = if names.len() <= 8 {
        names.join(", ")
    } else {
        format!("{}, ...", names[..8].join(", "))
    };
    format!(
        ", {} users from {} ({shown}){}",
        names.len(),
        file.path.display(),
        if cfg.isolates_users() {
            ", workers kept to one user each"
        } else {
            ""
        }
    )
}

/// The warning about pp's public default secret.
pub(crate) fn warn_default_secret() {
    log::warn!(
        "no secret given (-s): using pp's public default secret; anyone who can reach \
         this port can run code here"
    );
}

/// How workers start, for the startup line.
fn worker_start(cfg: &Config, forked: bool) -> String {
    if !forked {
        return "workers spawned".to_string();
    }
    if cfg.preload.is_empty() {
        "workers forked from a fork-server".to_string()
    } else {
        format!(
            "workers forked from a fork-server with {} preloaded",
            cfg.preload.join(", ")
        )
    }
}
