//! The users file (`--users PATH`): several people share one server, each
//! with a secret of their own, and with their own limits and uid.
//!
//! The pp handshake carries no user name, but it need not: the client
//! answers `sha1(nonce + secret)`, so a server that knows several secrets
//! tells which one the client holds by computing each user's answer
//! ([`Users::login`]). Unmodified clients become distinct users by their
//! secret alone.
//!
//! The file is INI, one section per user:
//!
//! ```ini
//! [alice]
//! secret = ...          # required; unique across users
//! uid = 1001            # run this user's workers as this uid (number or name)
//! gid = 1001            # default: the uid's primary group, or the uid itself
//! max_workers = 4       # at most this many workers run this user's jobs at once
//! max_queued = 1000     # at most this many of this user's jobs wait at once
//! weight = 2            # fair share between users, in proportion (default 1)
//! job_timeout = 600     # overrides --job-timeout for this user
//! ```
//!
//! Every mistake (a missing or repeated secret, an unknown key, a bad
//! value, an unreadable file) is an error naming the file, the line and
//! the user. The `-s`/`--secret-file` secret, when given, is one more user
//! named `default`; a server without `--users` has that user alone, so
//! the rest of the server always deals in users.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::inifile;
use crate::protocol::auth;

/// The name of the user who holds the `-s` (or `--secret-file`) secret.
pub const DEFAULT_USER: &str = "default";

/// The keys a user's section may have, each with what it does: the one
/// list the parser checks against and `ppserver.conf(5)` describes.
pub const KEYS: &[(&str, &str)] = &[
    (
        "secret",
        "Required. The secret this user's clients hold (pp.Server(..., secret=...)); no \
         two users, and not the -s secret either, may share one.",
    ),
    (
        "uid",
        "Run this user's workers as this uid: a number (no passwd entry needed) or a \
         user name. Needs a server running as root; the uid must be able to enter the \
         server's working directory, run the workers' interpreter and read the worker \
         package (checked at startup). Not 0. Default: the server's own uid.",
    ),
    (
        "gid",
        "The workers' group: a number or a group name. Default: the uid's primary \
         group, or the uid itself for a number with no passwd entry. Supplementary \
         groups are the named user's own, else none.",
    ),
    (
        "max_workers",
        "At most this many workers run this user's jobs at once. At least 1. Default: \
         no limit.",
    ),
    (
        "max_queued",
        "At most this many of this user's jobs wait for a worker at once; past it the \
         server reads no more jobs from this user's clients until one starts. At least \
         1. Default: no limit.",
    ),
    (
        "weight",
        "This user's share of the workers against other users with jobs waiting, in \
         proportion to the weights. 1 to 1000. Default: 1.",
    ),
    (
        "job_timeout",
        "Overrides --job-timeout for this user's jobs, in whole seconds. At least 1. \
         Default: --job-timeout.",
    ),
];

/// Largest `weight`: shares are counted in integers, and a weight far
/// beyond the number of users only starves the others.
const MAX_WEIGHT: u32 = 1000;

/// One user: who may log in with which secret, and what their jobs get.
#[derive(Clone, PartialEq)]
pub struct User {
    /// The section's name; `default` for the `-s` secret.
    pub name: String,
    /// Position in [`Users::all`], a small key for per-user tables.
    pub index: usize,
    /// The secret, never printed ([`std::fmt::Debug`] leaves it out).
    secret: String,
    /// Run this user's workers as this uid and gid (`uid`, `gid`).
    pub credentials: Option<Credentials>,
    /// At most this many workers run this user's jobs at once.
    pub max_workers: Option<usize>,
    /// At most this many of this user's jobs wait for a worker at once.
    pub max_queued: Option<usize>,
    /// Share of the workers against other users with jobs waiting.
    pub weight: u32,
    /// Overrides `--job-timeout` for this user's jobs.
    pub job_timeout: Option<Duration>,
    /// Whether users come from a users file: log lines and `/status` then
    /// name them; without one there is only `default`, and they read as
    /// they always have.
    pub named: bool,
}

impl User {
    /// The name as log lines and `/status` show it: `None` where users are
    /// not named (no users file).
    pub fn shown(&self) -> Option<&str> {
        self.named.then_some(self.name.as_str())
    }
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("credentials", &self.credentials)
            .field("max_workers", &self.max_workers)
            .field("max_queued", &self.max_queued)
            .field("weight", &self.weight)
            .field("job_timeout", &self.job_timeout)
            .field("named", &self.named)
            .finish_non_exhaustive()
    }
}

/// The uid and groups a user's workers run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups: the named user's own, else none.
    pub groups: Vec<u32>,
    /// For a uid with a passwd entry: its name and home directory, which
    /// the worker gets as `USER`/`LOGNAME` and `HOME`.
    pub account: Option<(String, PathBuf)>,
}

/// The named users read from a users file, before the `-s` secret joins
/// them (see [`Users::new`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsersFile {
    /// The file, for messages.
    pub path: PathBuf,
    /// The users in the file's order.
    pub users: Vec<Arc<User>>,
    /// Group or others may read the file: a warning at startup.
    pub readable_by_others: bool,
}

/// Every user who may log in.
#[derive(Debug, Clone)]
pub struct Users {
    /// In the order of the file, `default` (if any) first.
    all: Vec<Arc<User>>,
    /// Whether the users came from a users file: log lines then name the
    /// user; without one they read as they always have.
    named: bool,
}

/// A mistake in the users file, or in the users as a whole.
#[derive(Debug)]
pub enum UsersError {
    /// The file cannot be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not INI.
    Syntax {
        path: PathBuf,
        source: inifile::SyntaxError,
    },
    /// A user's entry is wrong.
    Entry {
        path: PathBuf,
        line: usize,
        user: String,
        why: String,
    },
    /// Two users hold the same secret, so a login could not tell them
    /// apart.
    SameSecret {
        path: PathBuf,
        first: String,
        second: String,
        line: usize,
    },
    /// `--users` with no user in it, and no `-s` secret either.
    NoUsers { path: PathBuf },
}

impl std::fmt::Display for UsersError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsersError::Read { path, source } => {
                write!(
                    f,
                    "cannot read the users file {} (--users): {source}",
                    path.display()
                )
            }
            UsersError::Syntax { path, source } => {
                write!(f, "users file {} (--users): {source}", path.display())
            }
            UsersError::Entry {
                path,
                line,
                user,
                why,
            } => write!(
                f,
                "users file {}, line {line}, user {user:?}: {why}",
                path.display()
            ),
            UsersError::SameSecret {
                path,
                first,
                second,
                line,
            } => write!(
                f,
                "users file {}, line {line}, user {second:?}: the same secret as user \
                 {first:?}; every user needs a secret of their own",
                path.display()
            ),
            UsersError::NoUsers { path } => write!(
                f,
                "users file {} (--users) has no user, and no -s or --secret-file secret \
                 was given: nobody could log in",
                path.display()
            ),
        }
    }
}

impl std::error::Error for UsersError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UsersError::Read { source, .. } => Some(source),
            UsersError::Syntax { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads and checks a users file.
pub fn load(path: &Path) -> Result<UsersFile, UsersError> {
    let read_err = |source| UsersError::Read {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let mode = std::fs::metadata(path)
        .map_err(read_err)?
        .permissions()
        .mode();
    let mut file = parse(path, &text)?;
    file.readable_by_others = mode & 0o044 != 0;
    Ok(file)
}

/// The users of a users file's text; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<UsersFile, UsersError> {
    let sections = inifile::parse(text).map_err(|source| UsersError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    let mut users = Vec::new();
    let mut by_secret: HashMap<String, String> = HashMap::new();
    // In the file's order: the map is sorted by name.
    let mut names: Vec<(usize, &String)> = sections
        .keys()
        .map(|name| (header_line(text, name), name))
        .collect();
    names.sort();
    for (header, name) in names {
        let keys = &sections[name];
        let entry = |line: usize, why: String| UsersError::Entry {
            path: path.to_path_buf(),
            line,
            user: name.clone(),
            why,
        };
        if name == DEFAULT_USER {
            return Err(entry(
                header,
                format!(
                    "the name {DEFAULT_USER:?} is kept for the -s (--secret-file) secret's user"
                ),
            ));
        }
        let known = |k: &str| KEYS.iter().any(|(name, _)| *name == k);
        if let Some((key, (_, line))) = keys.iter().find(|(k, _)| !known(k)) {
            let names: Vec<&str> = KEYS.iter().map(|(name, _)| *name).collect();
            return Err(entry(
                *line,
                format!("unknown key {key:?} (known: {})", names.join(", ")),
            ));
        }
        let Some((secret, secret_line)) = keys.get("secret").filter(|(s, _)| !s.is_empty()) else {
            return Err(entry(header, "no secret (secret = ...)".into()));
        };
        if let Some(first) = by_secret.insert(secret.clone(), name.clone()) {
            return Err(UsersError::SameSecret {
                path: path.to_path_buf(),
                first,
                second: name.clone(),
                line: *secret_line,
            });
        }
        let number = |key: &str, min: u64| -> Result<Option<u64>, UsersError> {
            let Some((value, line)) = keys.get(key) else {
                return Ok(None);
            };
            match value.trim().parse::<u64>() {
                Ok(n) if n >= min => Ok(Some(n)),
                _ => Err(entry(
                    *line,
                    format!("{key} = {value:?}: expected a whole number, at least {min}"),
                )),
            }
        };
        let weight = number("weight", 1)?.unwrap_or(1);
        if weight > u64::from(MAX_WEIGHT) {
            let line = keys.get("weight").map_or(header, |(_, l)| *l);
            return Err(entry(
                line,
                format!("weight = {weight}: at most {MAX_WEIGHT}"),
            ));
        }
        let credentials = credentials(keys).map_err(|(line, why)| entry(line, why))?;
        users.push(User {
            name: name.clone(),
            index: 0,
            secret: secret.clone(),
            credentials,
            max_workers: number("max_workers", 1)?.map(|n| n as usize),
            max_queued: number("max_queued", 1)?.map(|n| n as usize),
            weight: weight as u32,
            job_timeout: number("job_timeout", 1)?.map(Duration::from_secs),
            named: true,
        });
    }
    Ok(UsersFile {
        path: path.to_path_buf(),
        users: users.into_iter().map(Arc::new).collect(),
        readable_by_others: false,
    })
}

/// The line of `[name]`'s header, for errors about the section as a whole.
fn header_line(text: &str, name: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim()
                .strip_prefix('[')
                .and_then(|r| r.split('#').next())
                .and_then(|r| r.trim_end().strip_suffix(']'))
                .is_some_and(|n| n.trim() == name)
        })
        .map_or(0, |i| i + 1)
}

/// The `uid` and `gid` keys: a uid by number (with or without a passwd
/// entry) or by name; the gid by number or group name, else the named
/// user's primary group, else the uid itself. Errors carry the line.
fn credentials(
    keys: &std::collections::BTreeMap<String, (String, usize)>,
) -> Result<Option<Credentials>, (usize, String)> {
    let gid_given = keys.get("gid");
    let Some((uid_text, uid_line)) = keys.get("uid") else {
        return match gid_given {
            Some((_, line)) => Err((*line, "gid without uid".into())),
            None => Ok(None),
        };
    };
    let uid_text = uid_text.trim();
    let entry = if let Ok(n) = uid_text.parse::<u32>() {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(n))
            .ok()
            .flatten()
            .map(|u| (n, Some(u)))
            .unwrap_or((n, None))
    } else {
        match nix::unistd::User::from_name(uid_text) {
            Ok(Some(u)) => (u.uid.as_raw(), Some(u)),
            _ => {
                return Err((
                    *uid_line,
                    format!("uid = {uid_text:?}: no such user (give a number or a user name)"),
                ))
            }
        }
    };
    let (uid, account) = entry;
    if uid == 0 {
        return Err((
            *uid_line,
            "uid = 0: jobs must not run as root (leave uid out to run them as the server's \
             uid)"
                .into(),
        ));
    }
    let gid = match gid_given {
        Some((text, line)) => {
            let text = text.trim();
            match text.parse::<u32>() {
                Ok(n) => n,
                Err(_) => match nix::unistd::Group::from_name(text) {
                    Ok(Some(g)) => g.gid.as_raw(),
                    _ => {
                        return Err((
                            *line,
                            format!(
                                "gid = {text:?}: no such group (give a number or a group name)"
                            ),
                        ))
                    }
                },
            }
        }
        None => account.as_ref().map_or(uid, |u| u.gid.as_raw()),
    };
    let groups = match &account {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes()).unwrap_or_default();
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid])
        }
        None => Vec::new(),
    };
    Ok(Some(Credentials {
        uid,
        gid,
        groups,
        account: account.map(|u| (u.name, u.dir)),
    }))
}

/// The user `default`, who holds the `-s` secret: no limits, no uid.
fn default_user(secret: &str, named: bool) -> User {
    User {
        name: DEFAULT_USER.into(),
        index: 0,
        secret: secret.into(),
        credentials: None,
        max_workers: None,
        max_queued: None,
        weight: 1,
        job_timeout: None,
        named,
    }
}

impl Users {
    /// Every user who may log in: the `-s` secret's user `default`, when a
    /// secret was given or there is no users file, then the file's users.
    /// The default secret may not be a named user's too.
    pub fn new(
        file: Option<&UsersFile>,
        secret: &str,
        secret_given: bool,
    ) -> Result<Users, UsersError> {
        let Some(file) = file else {
            return Ok(Users::single(secret));
        };
        let mut all: Vec<User> = Vec::new();
        if secret_given {
            all.push(default_user(secret, true));
        }
        for user in &file.users {
            if all.first().is_some_and(|d| d.secret == user.secret) {
                return Err(UsersError::SameSecret {
                    path: file.path.clone(),
                    first: format!("{DEFAULT_USER} (-s or --secret-file)"),
                    second: user.name.clone(),
                    line: 0,
                });
            }
            all.push(User::clone(user));
        }
        if all.is_empty() {
            return Err(UsersError::NoUsers {
                path: file.path.clone(),
            });
        }
        for (i, u) in all.iter_mut().enumerate() {
            u.index = i;
        }
        Ok(Users {
            all: all.into_iter().map(Arc::new).collect(),
            named: true,
        })
    }

    /// The one user of a server without a users file: `default`, with
    /// the `-s` secret (or pp's public one), no limits, not named in logs.
    pub fn single(secret: &str) -> Users {
        Users {
            all: vec![Arc::new(default_user(secret, false))],
            named: false,
        }
    }

    /// The user whose secret gives `answer` to `nonce`, if any. Every
    /// user's answer is computed and compared in constant time, so how
    /// long a login takes says nothing about which user (or none) matched.
    pub fn login(&self, nonce: &[u8], answer: &[u8]) -> Option<Arc<User>> {
        let mut found = None;
        for user in &self.all {
            let expected = auth::expected_answer(nonce, user.secret.as_bytes());
            if auth::answer_matches(&expected, answer) && found.is_none() {
                found = Some(user.clone());
            }
        }
        found
    }

    /// Every user, `default` first if there is one.
    pub fn all(&self) -> &[Arc<User>] {
        &self.all
    }

    /// Whether a users file named them (log lines then name the user).
    pub fn named(&self) -> bool {
        self.named
    }

    /// Whether any user has a uid of their own.
    pub fn any_credentials(&self) -> bool {
        self.all.iter().any(|u| u.credentials.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<UsersFile, UsersError> {
        parse(Path::new("/etc/ppserver/users"), text)
    }

    fn err(text: &str) -> String {
        parsed(text).unwrap_err().to_string()
    }

    #[test]
    fn a_file_gives_each_user_their_settings() {
        let f = parsed(
            "[bob]\nsecret = b\n\n[alice]\nsecret = a\nuid = 64001\nmax_workers = 4\n\
             max_queued = 1000\nweight = 2\njob_timeout = 600\n",
        )
        .unwrap();
        let names: Vec<&str> = f.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["bob", "alice"], "the file's order");
        let alice = &f.users[1];
        assert_eq!(alice.max_workers, Some(4));
        assert_eq!(alice.max_queued, Some(1000));
        assert_eq!(alice.weight, 2);
        assert_eq!(alice.job_timeout, Some(Duration::from_secs(600)));
        let c = alice.credentials.as_ref().unwrap();
        assert_eq!(
            (c.uid, c.gid),
            (64001, 64001),
            "no entry: the gid is the uid"
        );
        assert!(c.groups.is_empty() && c.account.is_none());
        assert_eq!(f.users[0].weight, 1);
        assert!(f.users[0].credentials.is_none());
        assert!(!format!("{alice:?}").contains("secret: "), "{alice:?}");
    }

    #[test]
    fn mistakes_name_the_file_line_and_user() {
        assert_eq!(
            err("[a]\nsecret = x\n[b]\nsecret = x\n"),
            "users file /etc/ppserver/users, line 4, user \"b\": the same secret as user \
             \"a\"; every user needs a secret of their own"
        );
        assert_eq!(
            err("[a]\nsecret = x\n[b]\nweight = 2\n"),
            "users file /etc/ppserver/users, line 3, user \"b\": no secret (secret = ...)"
        );
        let e = err("[a]\nsecret = x\nmax_worker = 2\n");
        assert!(
            e.contains("line 3, user \"a\": unknown key \"max_worker\""),
            "{e}"
        );
        let e = err("[a]\nsecret = x\nweight = 0\n");
        assert!(e.contains("line 3") && e.contains("at least 1"), "{e}");
        let e = err("[a]\nsecret = x\nuid = no-such-user-here\n");
        assert!(e.contains("line 3") && e.contains("no such user"), "{e}");
        let e = err("[a]\nsecret = x\nuid = 0\n");
        assert!(e.contains("not run as root"), "{e}");
        let e = err("[default]\nsecret = x\n");
        assert!(e.contains("line 1") && e.contains("kept for the -s"), "{e}");
        let e = err("[a]\nsecret = x\nthis is not ini\n");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn the_s_secret_is_the_default_user_and_logins_find_their_user() {
        let file = parsed("[alice]\nsecret = a\n[bob]\nsecret = b\n").unwrap();
        let users = Users::new(Some(&file), "s", true).unwrap();
        let names: Vec<&str> = users.all().iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["default", "alice", "bob"]);
        assert!(users.named());
        let nonce = b"abcdefghijklmnopqrstuvwx";
        for (secret, name) in [("s", "default"), ("a", "alice"), ("b", "bob")] {
            let answer = auth::expected_answer(nonce, secret.as_bytes());
            let user = users.login(nonce, &answer).unwrap();
            assert_eq!(user.name, name);
            assert_eq!(users.all()[user.index].name, name);
        }
        assert!(users
            .login(nonce, &auth::expected_answer(nonce, b"c"))
            .is_none());
        // Without -s, only the file's users.
        let users = Users::new(Some(&file), "ignored", false).unwrap();
        assert_eq!(users.all().len(), 2);
        let answer = auth::expected_answer(nonce, b"ignored");
        assert!(users.login(nonce, &answer).is_none());
        // The -s secret may not be a named user's.
        let e = Users::new(Some(&file), "a", true).unwrap_err().to_string();
        assert!(e.contains("the same secret as user \"default"), "{e}");
        // No file: the one user, not named in logs.
        let users = Users::new(None, "s", false).unwrap();
        assert_eq!(users.all().len(), 1);
        assert!(!users.named());
    }
}
