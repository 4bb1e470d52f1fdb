//! Every setting that a flag or a config-file key can give, and the
//! checks each value passes before it reaches [`Config`]. Which flag and
//! key give which setting is [`crate::config::options`]'s table.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::inifile;
use crate::config::users;
use crate::config::{
    Config, ConfigError, Isolate, Origin, WorkerMemoryLimit, WorkerStart, MAX_LOGIN_DELAY,
    MAX_MAX_FRAME, MIN_MAX_FRAME, MIN_MEMORY_LIMIT, MIN_WORKER_MEMORY_LIMIT,
};
use crate::logging::format::LogFormat;

/// A setting that can come from a flag or from the config file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Setting {
    Secret,
    Debug,
    Workers,
    Proto,
    Restart,
    PidFile,
    Quiet,
    Python,
    SecretFile,
    WorkerModule,
    PpVersion,
    MaxFrameSize,
    MaxConnections,
    Verbose,
    ReadyFile,
    DrainTimeout,
    MemoryLimit,
    Metrics,
    MaxJobsPerWorker,
    KeepAbandoned,
    JobTimeout,
    Autodiscovery,
    Interface,
    Broadcast,
    Announce,
    AdvertiseNcpus,
    Port,
    IdleExit,
    SocketTimeout,
    MaxHandshakes,
    MaxHandshakesPerAddress,
    Allow,
    ProxyProtocol,
    LoginDelay,
    WorkerStart,
    Preload,
    WorkerMemoryLimit,
    LogFormat,
    Users,
    Isolate,
}

pub(crate) fn invalid(at: &Origin, value: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        at: Box::new(at.clone()),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn number<T: std::str::FromStr>(name: &Origin, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(name, value, "expected a number in range"))
}

fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(
    name: &Origin,
    value: &str,
) -> Result<T, ConfigError> {
    let n: T = number(name, value)?;
    if n < T::from(1) {
        return Err(invalid(name, value, "must be at least 1"));
    }
    Ok(n)
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers
/// of 1024; `k`, `KB`, `KiB` alike).
fn size(name: &Origin, value: &str) -> Result<usize, ConfigError> {
    let v = value.trim();
    let digits = v.len() - v.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = v.split_at(digits);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return Err(invalid(
                name,
                value,
                "expected bytes, or a number with K, M, G or T",
            ))
        }
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| invalid(name, value, "expected bytes, or a number with K, M, G or T"))
}

fn boolean(name: &Origin, value: &str) -> Result<bool, ConfigError> {
    inifile::as_bool(value)
        .ok_or_else(|| invalid(name, value, "expected true/false, yes/no, on/off or 1/0"))
}

/// Sets one setting from text; `name` is the flag or key, for messages.
pub(crate) fn apply(
    cfg: &mut Config,
    setting: Setting,
    name: &Origin,
    value: &str,
) -> Result<(), ConfigError> {
    match setting {
        Setting::Secret => {
            cfg.secret = value.to_string();
            cfg.secret_is_default = false;
        }
        Setting::Debug => cfg.debug = boolean(name, value)?,
        Setting::LogFormat => {
            cfg.log_format = LogFormat::parse(value).map_err(|e| invalid(name, value, &e))?
        }
        Setting::Workers => cfg.workers = at_least_one(name, value)?,
        Setting::Proto => {
            let proto: i32 = number(name, value)?;
            if !(-1..=5).contains(&proto) {
                return Err(invalid(
                    name,
                    value,
                    "pickle protocols are 0 to 5 (or -1 for the highest)",
                ));
            }
            cfg.proto = Some(proto);
        }
        Setting::Restart => cfg.restart = boolean(name, value)?,
        Setting::PidFile => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.pid_file = Some(PathBuf::from(value));
        }
        Setting::Quiet => cfg.quiet = boolean(name, value)?,
        Setting::Verbose => cfg.verbose = boolean(name, value)?,
        Setting::ReadyFile => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.ready_file = Some(PathBuf::from(value));
        }
        Setting::DrainTimeout => cfg.drain_timeout = Duration::from_secs(number(name, value)?),
        Setting::MemoryLimit => {
            let bytes = size(name, value)?;
            if bytes < MIN_MEMORY_LIMIT {
                return Err(invalid(name, value, "must be at least 1M"));
            }
            cfg.memory_limit = bytes;
        }
        Setting::MaxJobsPerWorker => cfg.max_jobs_per_worker = number(name, value)?,
        Setting::KeepAbandoned => cfg.keep_abandoned = boolean(name, value)?,
        Setting::Metrics => {
            cfg.metrics =
                Some(value.trim().parse().map_err(|_| {
                    invalid(name, value, "expected ADDRESS:PORT, e.g. 127.0.0.1:9464")
                })?)
        }
        Setting::Python => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.python = Some(PathBuf::from(value));
        }
        Setting::SecretFile => {
            cfg.secret = secret_from_file(Path::new(value))?;
            cfg.secret_is_default = false;
        }
        Setting::WorkerStart => {
            cfg.worker_start = match value.trim() {
                "fork" => WorkerStart::Fork,
                "spawn" => WorkerStart::Spawn,
                _ => return Err(invalid(name, value, "expected fork or spawn")),
            }
        }
        Setting::Preload => {
            let modules = list(name, value, preload_module)?;
            // As with --allow: the file's list replaces what flags before
            // -c gave; each --preload adds.
            if matches!(name, Origin::Key { .. }) {
                cfg.preload.clear();
            }
            for m in modules {
                if !cfg.preload.contains(&m) {
                    cfg.preload.push(m);
                }
            }
        }
        Setting::WorkerMemoryLimit => {
            let bytes = size(name, value)?;
            cfg.worker_memory_limit = match bytes {
                0 => None,
                b if b < MIN_WORKER_MEMORY_LIMIT => {
                    return Err(invalid(
                        name,
                        value,
                        "must be at least 16M (or 0: no limit)",
                    ))
                }
                b => Some(WorkerMemoryLimit {
                    bytes: b as u64,
                    text: value.trim().to_string(),
                }),
            };
        }
        Setting::WorkerModule => {
            if !is_module_name(value) {
                return Err(invalid(
                    name,
                    value,
                    "expected a Python module name such as ppft or pp._worker",
                ));
            }
            cfg.worker_module = Some(value.to_string());
        }
        Setting::PpVersion => {
            if value.is_empty() || !value.is_ascii() {
                return Err(invalid(name, value, "must be non-empty ASCII"));
            }
            cfg.pp_version = Some(value.to_string());
        }
        Setting::MaxFrameSize => {
            let bytes = size(name, value)?;
            if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&bytes) {
                return Err(invalid(
                    name,
                    value,
                    &format!("must be from {MIN_MAX_FRAME} to {MAX_MAX_FRAME} bytes"),
                ));
            }
            cfg.max_frame_size = bytes;
        }
        Setting::MaxConnections => {
            cfg.max_connections = at_least_one(name, value)?;
            cfg.budget_origins.max_connections = Some(name.clone());
        }
        Setting::Users => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty path"));
            }
            cfg.users = Some(std::sync::Arc::new(
                users::load(Path::new(value)).map_err(ConfigError::Users)?,
            ));
        }
        Setting::Isolate => {
            cfg.isolate = Some(match value.trim() {
                "user" => Isolate::User,
                "none" => Isolate::None,
                _ => return Err(invalid(name, value, "expected user or none")),
            })
        }
        Setting::JobTimeout => {
            let secs: u64 = number(name, value)?;
            cfg.job_timeout = (secs > 0).then(|| Duration::from_secs(secs));
        }
        Setting::Autodiscovery => cfg.autodiscovery = boolean(name, value)?,
        Setting::Interface => {
            if value.is_empty() {
                return Err(invalid(name, value, "empty address"));
            }
            cfg.interface = value.to_string();
        }
        Setting::Broadcast => {
            let addrs = list(name, value, broadcast_address)?;
            // As with --allow: the file's list replaces what flags before
            // -c gave; each -b adds one (the first replaces the default).
            if matches!(name, Origin::Key { .. }) {
                cfg.broadcast.clear();
            }
            cfg.broadcast.extend(addrs);
        }
        Setting::Announce => {
            let hosts = list(name, value, announce_host)?;
            if matches!(name, Origin::Key { .. }) {
                cfg.announce.clear();
            }
            cfg.announce.extend(hosts);
        }
        Setting::AdvertiseNcpus => cfg.advertise_ncpus = Some(at_least_one(name, value)?),
        Setting::Port => cfg.port = number(name, value)?,
        Setting::IdleExit => cfg.idle_exit = Some(Duration::from_secs(at_least_one(name, value)?)),
        Setting::SocketTimeout => {
            cfg.socket_timeout = Duration::from_secs(at_least_one(name, value)?)
        }
        Setting::MaxHandshakes => {
            cfg.max_handshakes = at_least_one(name, value)?;
            cfg.budget_origins.max_handshakes = Some(name.clone());
        }
        Setting::MaxHandshakesPerAddress => {
            cfg.max_handshakes_per_address = Some(at_least_one(name, value)?)
        }
        Setting::LoginDelay => {
            let secs: f64 = number(name, value)?;
            if !(0.0..=MAX_LOGIN_DELAY.as_secs_f64()).contains(&secs) {
                return Err(invalid(
                    name,
                    value,
                    &format!("must be from 0 to {} seconds", MAX_LOGIN_DELAY.as_secs()),
                ));
            }
            cfg.login_delay = Duration::from_secs_f64(secs);
        }
        Setting::Allow => {
            // The file's list replaces one given by flags before -c; each
            // --allow adds to the list.
            if matches!(name, Origin::Key { .. }) {
                cfg.allow.clear();
            }
            cfg.allow
                .extend_from(value)
                .map_err(|why| invalid(name, value, &why))?;
        }
        Setting::ProxyProtocol => {
            // As --allow: the file's list replaces earlier flags'.
            if matches!(name, Origin::Key { .. }) {
                cfg.proxy_protocol.clear();
            }
            cfg.proxy_protocol
                .extend_from(value)
                .map_err(|why| invalid(name, value, &why))?;
        }
    }
    Ok(())
}

/// A comma-separated list, each item checked by `item` (which says why it
/// is wrong); an empty list is an error.
fn list<T>(
    name: &Origin,
    value: &str,
    item: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().all(|i| i.is_empty()) {
        return Err(invalid(name, value, "empty list"));
    }
    items
        .into_iter()
        .map(|i| item(i).map_err(|why| invalid(name, value, &why)))
        .collect()
}

/// A dotted Python module name: `ppft`, `pp._worker`, `numpy.random`.
fn is_module_name(value: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    value.split('.').all(part)
}

/// A `--preload` module.
fn preload_module(text: &str) -> Result<String, String> {
    if is_module_name(text) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a Python module name"))
    }
}

/// A `-b` address: any IPv4 address a datagram can be sent to.
fn broadcast_address(text: &str) -> Result<Ipv4Addr, String> {
    match text.parse::<Ipv4Addr>() {
        Ok(ip) if ip.is_unspecified() => Err("0.0.0.0 is no destination".into()),
        Ok(ip) => Ok(ip),
        Err(_) => Err(format!("{text:?} is not an IPv4 address")),
    }
}

/// An `--announce` host: an IPv4 address or a host name, without a port
/// (announcements go to the server's own port, where clients listen).
/// Whether a name resolves is checked at startup.
fn announce_host(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("empty host".into());
    }
    if text.contains(':') {
        return Err(format!(
            "{text:?}: give an IPv4 address or host name without a port \
             (announcements go to the server's port)"
        ));
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        if ip.is_unspecified() {
            return Err("0.0.0.0 is no destination".into());
        }
        return Ok(text.to_string());
    }
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if text.len() > 253 || !text.trim_end_matches('.').split('.').all(label) {
        return Err(format!("{text:?} is not an IPv4 address or host name"));
    }
    Ok(text.to_string())
}

/// Reads a secret from the first line of a file.
pub(crate) fn secret_from_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag: "--secret-file",
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_end_matches('\r')
        .to_string();
    if secret.is_empty() {
        return Err(ConfigError::EmptySecret {
            path: path.to_path_buf(),
        });
    }
    Ok(secret)
}
