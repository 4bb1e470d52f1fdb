//! Startup checks for the users file's `uid` keys: that the server can
//! run workers as each user's uid, and that each such uid can run them
//! ([`check`]).
//!
//! Only root can become another uid, so a `uid` in the file needs a
//! server running as root. And each uid must be able to enter the
//! server's working directory (where the workers run), run the workers'
//! interpreter and read the worker package. Both are asked of the kernel
//! as that uid: a child of the server drops to it and calls `access(2)`
//! for every directory on the way to each of them, in order, so that the
//! first refusal names the directory that stops the uid (the usual one:
//! a venv, or pyenv's interpreters, under a home directory of mode 0700
//! such as `/root`); then the worker probe is run as the uid, which
//! catches whatever else it cannot read (a standard library, a
//! dependency of the worker package).
//!
//! Until the pool starts each slot's worker for the user whose job it
//! runs, every user must share one uid (or have none): [`check`] returns
//! it, for the pool's workers ([`crate::workers::pool::PoolContext`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::process::Command;

use crate::config::users::{Credentials, Users};
use crate::workers::identity::Identity;
use crate::workers::install::{self, Interpreter, ProbeError};
use crate::workers::reaper;

/// Most paths one check asks about: each refusal is told by the child's
/// exit code, which has room for 254 of them.
const MAX_NEEDS: usize = 254;

/// Why a user's `uid` cannot be used.
#[derive(Debug)]
pub enum UidError {
    /// The server does not run as root.
    NotRoot {
        file: Option<PathBuf>,
        user: String,
        uid: u32,
        server_uid: u32,
    },
    /// The uid cannot reach a path the workers need.
    Denied { user: String, uid: u32, need: Need },
    /// The worker probe, run as the uid, failed.
    Probe {
        user: String,
        uid: u32,
        python: PathBuf,
        error: ProbeError,
    },
    /// The check itself could not be made.
    Check {
        user: String,
        uid: u32,
        error: io::Error,
    },
    /// Users with different uids (or a uid and none): not yet served.
    Mixed {
        file: Option<PathBuf>,
        first: String,
        second: String,
    },
}

/// A path a user's workers need, and what they need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The path.
    pub path: PathBuf,
    /// `access(2)`'s mode: `R_OK`, `X_OK` or both.
    mode: i32,
    /// Whether it is a directory on the way, or the thing itself.
    on_the_way: bool,
    /// What it is on the way to.
    to: What,
}

/// What a [`Need`] is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    /// The server's working directory, where the workers run.
    WorkingDirectory(PathBuf),
    /// The workers' interpreter.
    Interpreter(PathBuf),
    /// The worker module's file.
    Package(PathBuf),
}

impl std::fmt::Display for UidError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UidError::NotRoot {
                file,
                user,
                uid,
                server_uid,
            } => {
                if let Some(file) = file {
                    write!(f, "users file {} (--users): ", file.display())?;
                }
                write!(
                    f,
                    "user {user:?} has uid = {uid}, and only a server running as root can \
                     run workers as another uid (this one runs as uid {server_uid}): start it \
                     as root, or leave uid out"
                )
            }
            UidError::Denied { user, uid, need } => {
                let verb = match (need.mode, need.on_the_way) {
                    (m, _) if m == nix::libc::R_OK | nix::libc::X_OK => "list",
                    (m, _) if m == nix::libc::R_OK => "read",
                    (_, true) => "search",
                    (_, false) => match need.to {
                        What::WorkingDirectory(_) => "enter",
                        _ => "run",
                    },
                };
                write!(
                    f,
                    "user {user:?} (uid = {uid}): uid {uid} cannot {verb} {}",
                    need.path.display()
                )?;
                match &need.to {
                    What::WorkingDirectory(cwd) => {
                        if need.on_the_way {
                            write!(f, ", on the way to {}", cwd.display())?;
                        }
                        write!(
                            f,
                            ", the server's working directory, where the workers run: start \
                             the server in a directory every user's uid can enter (such as /)"
                        )
                    }
                    What::Interpreter(python) | What::Package(python) => {
                        let what = match &need.to {
                            What::Interpreter(_) => "the workers' interpreter",
                            _ => "the worker package",
                        };
                        if need.path == *python {
                            write!(f, ", {what}")?;
                        } else {
                            write!(f, ", on the way to {what} {}", python.display())?;
                        }
                        write!(
                            f,
                            "; the usual cause is a venv or interpreter under a home directory \
                             of mode 0700, such as /root: install them where uid {uid} can \
                             read them (see --python)"
                        )
                    }
                }
            }
            UidError::Probe {
                user,
                uid,
                python,
                error,
            } => {
                let why = match error {
                    ProbeError::Missing {
                        candidates, detail, ..
                    } => {
                        let mut why = format!("cannot import {}", candidates.join(" or "));
                        if !detail.is_empty() {
                            why.push_str(&format!(" ({detail})"));
                        }
                        why
                    }
                    other => other.to_string(),
                };
                write!(
                    f,
                    "user {user:?} (uid = {uid}): the workers' interpreter {}, run as uid \
                     {uid}, {why}; the usual cause is a venv or interpreter under a home \
                     directory of mode 0700, such as /root: install them where uid {uid} can \
                     read them (see --python)",
                    python.display()
                )
            }
            UidError::Check { user, uid, error } => write!(
                f,
                "user {user:?} (uid = {uid}): cannot check what uid {uid} can reach: {error}"
            ),
            UidError::Mixed {
                file,
                first,
                second,
            } => {
                if let Some(file) = file {
                    write!(f, "users file {} (--users): ", file.display())?;
                }
                write!(
                    f,
                    "users {first:?} and {second:?} run as different uids (or one without a \
                     uid); with --isolate none workers are shared between users, so every \
                     user must have the same uid and gid, or none (--isolate user, the \
                     default with --users, starts each user's workers as its own uid)"
                )
            }
        }
    }
}

impl std::error::Error for UidError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UidError::Probe { error, .. } => Some(error),
            UidError::Check { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Startup step: checks every user's `uid` (see the module's text), and
/// returns the credentials all users share, which a worker started for
/// nobody runs with; `None` when no user has a uid, or when users differ
/// and workers are kept to one user each (`isolated`: each user's are
/// started as its own uid). Users that differ while workers are shared
/// are an error.
pub(crate) async fn check(
    users: &Users,
    file: Option<&Path>,
    interpreter: &Interpreter,
    isolated: bool,
) -> Result<Option<Arc<Credentials>>, UidError> {
    let with_uid: Vec<_> = users
        .all()
        .iter()
        .filter_map(|u| Some((u.name.as_str(), u.credentials.as_ref()?)))
        .collect();
    let Some(&(first_name, first)) = with_uid.first() else {
        return Ok(None);
    };
    let server_uid = nix::unistd::geteuid();
    if !server_uid.is_root() {
        return Err(UidError::NotRoot {
            file: file.map(Path::to_path_buf),
            user: first_name.to_string(),
            uid: first.uid,
            server_uid: server_uid.as_raw(),
        });
    }
    let cwd = std::env::current_dir().map_err(|error| UidError::Check {
        user: first_name.to_string(),
        uid: first.uid,
        error,
    })?;
    let needs = needs(&cwd, interpreter);
    let mut checked: Vec<&Credentials> = Vec::new();
    for &(name, credentials) in &with_uid {
        if checked.contains(&credentials) {
            continue;
        }
        checked.push(credentials);
        let identity = Identity::of(credentials);
        let denied = first_denied(&identity, &needs)
            .await
            .map_err(|error| UidError::Check {
                user: name.to_string(),
                uid: credentials.uid,
                error,
            })?;
        if let Some(need) = denied {
            return Err(UidError::Denied {
                user: name.to_string(),
                uid: credentials.uid,
                need: need.clone(),
            });
        }
        let module = interpreter.module.as_str();
        install::probe_worker(
            &interpreter.python,
            &[module],
            &interpreter.pythonpath,
            Some(&identity),
        )
        .await
        .map_err(|error| UidError::Probe {
            user: name.to_string(),
            uid: credentials.uid,
            python: interpreter.python.clone(),
            error,
        })?;
    }
    if let Some(other) = users
        .all()
        .iter()
        .find(|u| u.credentials.as_ref() != Some(first))
    {
        if isolated {
            return Ok(None);
        }
        return Err(UidError::Mixed {
            file: file.map(Path::to_path_buf),
            first: first_name.to_string(),
            second: other.name.clone(),
        });
    }
    Ok(Some(Arc::new(first.clone())))
}

/// What every worker needs to reach, in the order asked: the working
/// directory `cwd`, the interpreter (the file it really is, then the path
/// it is named by, through links), the worker module's file. Each path
/// comes after the directories on the way to it.
fn needs(cwd: &Path, interpreter: &Interpreter) -> Vec<Need> {
    use nix::libc::{R_OK, X_OK};
    let mut needs: Vec<Need> = Vec::new();
    let mut add = |path: &Path, mode: i32, to: &What| {
        let mut on_the_way: Vec<PathBuf> =
            path.ancestors().skip(1).map(Path::to_path_buf).collect();
        on_the_way.reverse();
        let mut want = |path: PathBuf, mode: i32, on_the_way: bool| {
            // A directory listed is searched too: asked once.
            if !needs
                .iter()
                .any(|n| n.path == path && n.mode & mode == mode)
            {
                needs.push(Need {
                    path,
                    mode,
                    on_the_way,
                    to: to.clone(),
                });
            }
        };
        for dir in on_the_way {
            want(dir, X_OK, true);
        }
        want(path.to_path_buf(), mode, false);
    };
    add(cwd, X_OK, &What::WorkingDirectory(cwd.to_path_buf()));
    if let Some(python) = find_program(&interpreter.python, cwd) {
        let to = What::Interpreter(python.clone());
        if let Ok(real) = std::fs::canonicalize(&python) {
            add(&real, X_OK, &to);
        }
        add(&python, X_OK, &to);
    }
    if let Some(origin) = &interpreter.origin {
        let origin = std::fs::canonicalize(origin).unwrap_or_else(|_| origin.clone());
        let to = What::Package(origin.clone());
        // The import lists the module's directory and the one above it
        // (the package's, and site-packages for a package's __init__).
        for dir in origin
            .ancestors()
            .skip(1)
            .take(2)
            .collect::<Vec<_>>()
            .iter()
            .rev()
        {
            add(dir, R_OK | X_OK, &to);
        }
        add(&origin, R_OK, &to);
    }
    needs.truncate(MAX_NEEDS);
    needs
}

/// The absolute path of `program`: as given if it holds a `/` (from
/// `cwd` if relative), else the first executable of that name on `PATH`,
/// as the spawn finds it.
fn find_program(program: &Path, cwd: &Path) -> Option<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Some(cwd.join(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| cwd.join(dir).join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
}

/// The first of `needs` that `identity`'s uid is refused, asked of the
/// kernel: a child of the server drops to the uid and calls `access(2)`
/// on each in turn, and exits with the number of the first refused (1
/// for the first), or 0. It never runs anything else.
async fn first_denied<'a>(identity: &Identity, needs: &'a [Need]) -> io::Result<Option<&'a Need>> {
    let paths: Vec<(CString, i32)> = needs
        .iter()
        .filter_map(|n| Some((CString::new(n.path.as_os_str().as_bytes()).ok()?, n.mode)))
        .collect();
    if paths.len() != needs.len() {
        return Err(io::Error::other("a path holds a NUL byte"));
    }
    let identity = identity.clone();
    // Never run: the child exits in pre_exec.
    let mut cmd = Command::new("/");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child and makes only
    // async-signal-safe calls (setgroups, setresgid, setresuid, access,
    // _exit) on memory prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            identity.take()?;
            for (i, (path, mode)) in paths.iter().enumerate() {
                if nix::libc::access(path.as_ptr(), *mode) != 0 {
                    nix::libc::_exit(i as i32 + 1);
                }
            }
            nix::libc::_exit(0)
        });
    }
    let (mut child, _registered) = reaper::spawn(&mut cmd)?;
    let status = child.wait().await?;
    match status.code() {
        Some(0) => Ok(None),
        Some(n) => needs
            .get(n as usize - 1)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("the check exited with code {n}"))),
        None => Err(io::Error::other(format!("the check ended: {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc::{R_OK, X_OK};

    fn interpreter(python: &str, origin: Option<&str>) -> Interpreter {
        Interpreter {
            python: python.into(),
            module: "ppft".into(),
            version: "1.7.8".into(),
            pythonpath: "/srv".into(),
            origin: origin.map(PathBuf::from),
        }
    }

    #[test]
    fn every_directory_on_the_way_comes_before_what_it_leads_to() {
        let needs = needs(
            Path::new("/srv/jobs"),
            &interpreter(
                "/no/such/venv/bin/python",
                Some("/no/such/venv/lib/ppft/__init__.py"),
            ),
        );
        let asked: Vec<(&str, i32, bool)> = needs
            .iter()
            .map(|n| (n.path.to_str().unwrap(), n.mode, n.on_the_way))
            .collect();
        assert_eq!(
            asked,
            [
                ("/", X_OK, true),
                ("/srv", X_OK, true),
                ("/srv/jobs", X_OK, false),
                ("/no", X_OK, true),
                ("/no/such", X_OK, true),
                ("/no/such/venv", X_OK, true),
                ("/no/such/venv/bin", X_OK, true),
                ("/no/such/venv/bin/python", X_OK, false),
                ("/no/such/venv/lib", R_OK | X_OK, false),
                ("/no/such/venv/lib/ppft", R_OK | X_OK, false),
                ("/no/such/venv/lib/ppft/__init__.py", R_OK, false),
            ]
        );
    }

    #[test]
    fn a_refused_directory_is_named_with_what_it_leads_to_and_the_usual_cause() {
        let need = Need {
            path: "/root".into(),
            mode: X_OK,
            on_the_way: true,
            to: What::Interpreter("/root/venv/bin/python".into()),
        };
        let e = UidError::Denied {
            user: "alice".into(),
            uid: 64001,
            need,
        }
        .to_string();
        assert!(
            e.starts_with(
                "user \"alice\" (uid = 64001): uid 64001 cannot search /root, on the way to \
                 the workers' interpreter /root/venv/bin/python; the usual cause is a venv or \
                 interpreter under a home directory of mode 0700, such as /root"
            ),
            "{e}"
        );
    }

    /// Whether this test process may drop to another uid in a child.
    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("not root: test skipped");
        }
        root
    }

    #[tokio::test]
    async fn the_kernel_is_asked_as_the_uid_and_names_the_first_refusal() {
        if !root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ppserver-access-{}", std::process::id()));
        let private = dir.join("private");
        std::fs::create_dir_all(&private).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let open = dir.join("open");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let to = What::Package(open.clone());
        let need = |path: &Path, mode| Need {
            path: path.to_path_buf(),
            mode,
            on_the_way: false,
            to: to.clone(),
        };
        let asked = [
            need(&dir, X_OK),
            need(&open, R_OK),
            need(&private, X_OK),
            need(&open, X_OK),
        ];
        let uid = Identity::of(&Credentials {
            uid: 64011,
            gid: 64011,
            groups: Vec::new(),
            account: None,
        });
        let refused = first_denied(&uid, &asked).await.unwrap();
        assert_eq!(refused, Some(&asked[2]), "the 0700 directory, as uid 64011");
        let refused = first_denied(&uid, &asked[..2]).await.unwrap();
        assert_eq!(refused, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
