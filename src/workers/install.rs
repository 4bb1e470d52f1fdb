//! Where the binary is installed: the interpreter beside it, whether it
//! can run workers (the probe, [`probe_worker`], which also reads the
//! worker package's version) and whether the `ppserver` beside it is this
//! binary.
//!
//! The wheel (`pip install ppserver-rs`) puts the binary into an
//! environment's `bin/`, next to the `python` that has the worker package.
//! Without `--python` the workers run with that interpreter when it can run
//! them, else with `python3` on PATH. The same `bin/` may hold a `ppserver`
//! that is ppft's or pp's Python script (whichever wheel was installed last
//! owns the name); `ppserver-rs` is always this server.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::workers::bootstrap::STARTUP_TIMEOUT;
use crate::workers::identity::Identity;
use crate::workers::reaper;

/// The wheel's distribution name, for the pip command in messages.
pub(crate) const DIST_NAME: &str = "ppserver-rs";
/// The wheel's second name for the binary, which no Python package installs.
const SECOND_NAME: &str = "ppserver-rs";
/// The name ppft's and pp's wheels install their Python server under too.
const SHARED_NAME: &str = "ppserver";
/// Run when `--python` is not given and no interpreter beside the binary can
/// run workers.
const FALLBACK_PYTHON: &str = "python3";
/// Interpreters looked for beside the binary, the first found per directory
/// being the one tried: `python3` first, as a system `bin/` may have a
/// `python` that is Python 2. A venv made by `pypy3 -m venv` has both, as
/// links to `pypy3`: its PyPy is found the same way.
const NEIGHBOUR_PYTHONS: &[&str] = &["python3", "python"];
/// Bytes found in every build of this server (the search for them keeps them
/// in the binary), so a `ppserver` that holds them is this server even when
/// it is another file: the wheel's two names are two builds.
static MARKER: &[u8] = concat!(
    "ppserver-rs: the Rust ppserver, version ",
    env!("CARGO_PKG_VERSION"),
    "."
)
.as_bytes();
/// A `ppserver` larger than this is not read for [`MARKER`]: ours is a few
/// MiB even unstripped.
const MAX_SCANNED: u64 = 256 << 20;
/// Most links followed from argv[0] (the kernel's own limit is 40).
const MAX_LINKS: usize = 40;
/// Kept in a file of its own so it reads (and can be tried) as Python.
const PROBE_SCRIPT: &str = include_str!("worker_probe.py");

/// The directories the binary was started from: the real file's, then,
/// when it was started through links (pathos runs `~/bin/ppserver.py`, a
/// link to the binary or to another link), the directory of each link on
/// the way, from the path it was invoked by.
pub(crate) fn install_dirs() -> Vec<PathBuf> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let invoked = std::env::args_os()
        .next()
        .and_then(|argv0| invoked_path(&argv0, std::env::var_os("PATH").as_deref(), &cwd));
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let links = invoked.as_deref().map(link_dirs).unwrap_or_default();
    for dir in exe_dir.into_iter().chain(links) {
        let canonical = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !seen.contains(&canonical) {
            seen.push(canonical);
            dirs.push(dir);
        }
    }
    dirs
}

/// The directory of `path` and of every link it leads through.
fn link_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut at = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let Some(dir) = at.parent().map(Path::to_path_buf) else {
            break;
        };
        dirs.push(dir.clone());
        match std::fs::read_link(&at) {
            // A relative target is relative to the link's directory.
            Ok(target) => at = dir.join(target),
            Err(_) => break,
        }
    }
    dirs
}

/// The file argv[0] names: a path (with a `/`) relative to `cwd`, or else a
/// name looked up in `path` as the shell did to run it.
fn invoked_path(argv0: &OsStr, path: Option<&OsStr>, cwd: &Path) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if argv0.as_encoded_bytes().contains(&b'/') {
        return Some(cwd.join(argv0));
    }
    std::env::split_paths(path?)
        .map(|dir| {
            // An empty PATH entry is the current directory.
            let dir = if dir.as_os_str().is_empty() {
                cwd.to_path_buf()
            } else {
                cwd.join(dir)
            };
            dir.join(argv0)
        })
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The interpreter found beside the binary in each of `dirs`, if any.
fn neighbour_pythons(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter_map(|dir| {
            NEIGHBOUR_PYTHONS
                .iter()
                .map(|name| dir.join(name))
                .find(|p| is_executable(p))
        })
        .collect()
}

/// `PYTHONPATH` for workers: the inherited entries, then the server's
/// working directory, without duplicates. pp workers import user modules
/// named in job packages relative to where the server was started.
pub(crate) fn worker_pythonpath(inherited: Option<&OsStr>, cwd: &Path) -> OsString {
    let mut parts: Vec<PathBuf> = inherited
        .map(|p| {
            std::env::split_paths(p)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !parts.iter().any(|p| p == cwd) {
        parts.push(cwd.to_path_buf());
    }
    std::env::join_paths(parts).unwrap_or_else(|_| cwd.as_os_str().to_owned())
}

/// The interpreter the workers run with, as the startup probe found it.
#[derive(Debug, Clone)]
pub(crate) struct Interpreter {
    /// The interpreter (`--python`, or the one found).
    pub(crate) python: PathBuf,
    /// The worker module it runs with `-m` (`--worker-module`, or the
    /// first it has).
    pub(crate) module: String,
    /// The worker package's `__version__`, what clients are told unless
    /// `--pp-version` says otherwise.
    pub(crate) version: String,
    /// `PYTHONPATH` for the workers ([`worker_pythonpath`]).
    pub(crate) pythonpath: OsString,
    /// The file the worker module is loaded from, if the probe said.
    pub(crate) origin: Option<PathBuf>,
}

/// What the probe found: the worker module an interpreter can run, its
/// package's version, and the file it is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probed {
    /// The worker module.
    pub(crate) module: String,
    /// Its package's `__version__`.
    pub(crate) version: String,
    /// The module's file (`spec.origin`), if it has one.
    pub(crate) origin: Option<PathBuf>,
}

/// Startup step: finds the workers' interpreter and worker module
/// (`--python`, `--worker-module`; see [`worker_python`]), probed with the
/// `PYTHONPATH` the workers will get.
pub(crate) async fn probe(
    given: Option<&Path>,
    module: Option<&str>,
) -> Result<Interpreter, ProbeError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let pythonpath = worker_pythonpath(std::env::var_os("PYTHONPATH").as_deref(), &cwd);
    let candidates: Vec<&str> = match module {
        Some(m) => vec![m],
        None => WORKER_MODULES.to_vec(),
    };
    let (python, probed) = worker_python(given, &candidates, &pythonpath).await?;
    Ok(Interpreter {
        python,
        module: probed.module,
        version: probed.version,
        pythonpath,
        origin: probed.origin,
    })
}

/// The interpreter for the workers, with the worker module it can run and
/// that package's version: `given` (`--python`) if any; else the first
/// interpreter beside the binary that can run a worker; else
/// [`FALLBACK_PYTHON`]. When none can, the error is about the interpreter
/// beside the binary if there is one: that is the environment the server
/// was installed into, where the worker package belongs.
pub(crate) async fn worker_python(
    given: Option<&Path>,
    candidates: &[&str],
    pythonpath: &OsStr,
) -> Result<(PathBuf, Probed), ProbeError> {
    if let Some(python) = given {
        let probed = probe_worker(python, candidates, pythonpath, None).await?;
        return Ok((python.to_path_buf(), probed));
    }
    let mut beside: Option<ProbeError> = None;
    for python in neighbour_pythons(&install_dirs()) {
        match probe_worker(&python, candidates, pythonpath, None).await {
            Ok(probed) => return Ok((python, probed)),
            Err(e) => {
                beside.get_or_insert(with_wheel_hint(e));
            }
        }
    }
    let fallback = PathBuf::from(FALLBACK_PYTHON);
    match probe_worker(&fallback, candidates, pythonpath, None).await {
        Ok(probed) => {
            if let Some(e) = beside {
                log::info!(
                    "workers run with {FALLBACK_PYTHON} from PATH, not beside this binary: {e}"
                );
            }
            Ok((fallback, probed))
        }
        Err(e) => Err(beside.unwrap_or(e)),
    }
}

/// Marks a missing worker package as one to install with the wheel's extra
/// when this server's wheel is installed beside that interpreter: `pip
/// install 'ppserver-rs[ppft]'` then keeps the installed server and adds
/// ppft to it.
fn with_wheel_hint(mut e: ProbeError) -> ProbeError {
    if let ProbeError::Missing { python, wheel, .. } = &mut e {
        *wheel = python
            .parent()
            .is_some_and(|dir| dir.join(SECOND_NAME).exists());
    }
    e
}

/// Warns (when info lines show: the startup line's company) about each
/// `ppserver` beside the binary that is another program: typing `ppserver`
/// there does not start this server.
pub(crate) fn warn_about_foreign_ppserver() {
    if !log::log_enabled!(log::Level::Info) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for dir in install_dirs() {
        let other = dir.join(SHARED_NAME);
        if other.exists() && !is_this_server(&other, &exe) {
            let ours = dir.join(SECOND_NAME);
            let instead = if is_this_server(&ours, &exe) {
                format!("; `{SECOND_NAME}` is always this server")
            } else {
                String::new()
            };
            log::warn!(
                "{} is another program, not this server (ppft's or pp's Python ppserver, \
                 installed after this one?): `{SHARED_NAME}` there runs it{instead}",
                other.display()
            );
        }
    }
}

/// Whether `path` is this server: the running file itself, or a file
/// holding [`MARKER`] (the wheel's other name, a copy).
fn is_this_server(path: &Path, exe: &Path) -> bool {
    let (Ok(a), Ok(b)) = (std::fs::metadata(path), std::fs::metadata(exe)) else {
        return false;
    };
    if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
        return true;
    }
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|f| f.take(MAX_SCANNED).read_to_end(&mut bytes));
    read.is_ok() && holds_marker(&bytes)
}

fn holds_marker(bytes: &[u8]) -> bool {
    // black_box: the comparison must read the marker from memory, so that
    // it stays one piece in the binary rather than becoming immediates.
    let marker = std::hint::black_box(MARKER);
    bytes.windows(marker.len()).any(|w| w == marker)
}

/// Worker modules tried, in order, when none is chosen: ppft's worker, then
/// pp 1.7's. (ppft also installs a `pp` shim, but it has no `_worker`.)
pub(crate) const WORKER_MODULES: &[&str] = &["ppft", "pp._worker"];

/// Finds which of `candidates` the interpreter can run as a worker, and the
/// `__version__` of its package (what clients compare against). This is
/// also the startup check that the worker package is installed at all,
/// and, run as a user's `identity`, that their uid can run the workers.
pub(crate) async fn probe_worker(
    python: &Path,
    candidates: &[&str],
    pythonpath: &OsStr,
    identity: Option<&Identity>,
) -> Result<Probed, ProbeError> {
    let mut cmd = Command::new(python);
    cmd.arg("-c")
        .arg(PROBE_SCRIPT)
        .args(candidates)
        .env("PYTHONPATH", pythonpath)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(identity) = identity {
        identity.set_env(&mut cmd);
        let identity = identity.clone();
        // SAFETY: `take` makes async-signal-safe calls only and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || identity.take());
        }
    }
    let run = async {
        let (child, _registered) = reaper::spawn(&mut cmd)?;
        child.wait_with_output().await
    };
    let python = python.to_path_buf();
    let out = match tokio::time::timeout(STARTUP_TIMEOUT, run).await {
        Err(_) => return Err(ProbeError::Timeout { python }),
        Ok(Err(source)) => return Err(ProbeError::Run { python, source }),
        Ok(Ok(out)) => out,
    };
    let answer = String::from_utf8_lossy(&out.stdout);
    let mut lines = answer.lines();
    let first = lines.next().unwrap_or("").trim();
    let origin = lines
        .next()
        .map(str::trim)
        .filter(|o| o.starts_with('/'))
        .map(PathBuf::from);
    match first.split_once(' ') {
        Some((module, version)) if out.status.success() && !version.is_empty() => {
            if !version.is_ascii() {
                return Err(ProbeError::NonAscii {
                    module: module.to_string(),
                    version: version.to_string(),
                });
            }
            Ok(Probed {
                module: module.to_string(),
                version: version.to_string(),
                origin,
            })
        }
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(ProbeError::Missing {
                python,
                candidates: candidates.iter().map(|c| c.to_string()).collect(),
                detail: err.lines().last().unwrap_or("").trim().to_string(),
                wheel: false,
            })
        }
    }
}

/// Why the worker interpreter cannot run workers.
#[derive(Debug)]
pub enum ProbeError {
    /// The interpreter could not be run at all.
    Run { python: PathBuf, source: io::Error },
    /// It ran but did not answer within [`STARTUP_TIMEOUT`].
    Timeout { python: PathBuf },
    /// None of `candidates` can be imported; `detail` is the last line the
    /// interpreter printed on stderr, if any.
    Missing {
        python: PathBuf,
        candidates: Vec<String>,
        detail: String,
        /// This server's wheel is installed beside the interpreter: the
        /// hint is its extra, which adds ppft to it ([`crate::workers::install`]).
        wheel: bool,
    },
    /// The package's `__version__` is not ASCII, and clients receive it in
    /// an ASCII frame.
    NonAscii { module: String, version: String },
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Run { python, source } => write!(
                f,
                "cannot run the worker interpreter {} (--python): {source}",
                python.display()
            ),
            ProbeError::Timeout { python } => write!(
                f,
                "the worker interpreter {} did not answer within {STARTUP_TIMEOUT:?}",
                python.display()
            ),
            ProbeError::Missing {
                python,
                candidates,
                detail,
                wheel,
            } => {
                let shown = python.display();
                write!(
                    f,
                    "the worker interpreter {shown} cannot import {}",
                    candidates.join(" or ")
                )?;
                if !detail.is_empty() {
                    write!(f, " ({detail})")?;
                }
                let package = if *wheel {
                    format!("'{}[ppft]'", DIST_NAME)
                } else {
                    "ppft==1.7.8 dill".to_string()
                };
                write!(
                    f,
                    "; install ppft with: {shown} -m pip install {package}  \
                     (or choose another with --python)"
                )
            }
            ProbeError::NonAscii { module, version } => {
                write!(f, "{module}'s __version__ is not ASCII: {version:?}")
            }
        }
    }
}

impl std::error::Error for ProbeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProbeError::Run { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythonpath_keeps_inherited_entries_first_and_adds_cwd_once() {
        let cwd = Path::new("/srv/app");
        assert_eq!(worker_pythonpath(None, cwd), OsString::from("/srv/app"));
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("/a:/b")), cwd),
            OsString::from("/a:/b:/srv/app")
        );
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("/srv/app:/a")), cwd),
            OsString::from("/srv/app:/a")
        );
        assert_eq!(
            worker_pythonpath(Some(OsStr::new("")), cwd),
            OsString::from("/srv/app")
        );
    }

    use std::ffi::OsString;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ppserver-install-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn executable(path: &Path) {
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn argv0_with_a_slash_is_a_path_from_cwd() {
        let cwd = Path::new("/home/u");
        assert_eq!(
            invoked_path(OsStr::new("bin/ppserver.py"), None, cwd),
            Some(PathBuf::from("/home/u/bin/ppserver.py"))
        );
        assert_eq!(
            invoked_path(OsStr::new("/opt/venv/bin/ppserver"), None, cwd),
            Some(PathBuf::from("/opt/venv/bin/ppserver"))
        );
        assert_eq!(invoked_path(OsStr::new(""), None, cwd), None);
    }

    #[test]
    fn a_bare_argv0_is_found_on_path_as_the_shell_found_it() {
        let root = scratch("path");
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // Not executable: the shell would have skipped it.
        std::fs::write(a.join("ppserver.py"), b"").unwrap();
        executable(&b.join("ppserver.py"));
        let path: OsString = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(
            invoked_path(OsStr::new("ppserver.py"), Some(&path), Path::new("/")),
            Some(b.join("ppserver.py"))
        );
        assert_eq!(
            invoked_path(OsStr::new("nothing-here"), Some(&path), Path::new("/")),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn every_link_from_argv0_to_the_binary_gives_its_directory() {
        let root = scratch("links");
        let (home, venv, build) = (
            root.join("home/bin"),
            root.join("venv/bin"),
            root.join("build"),
        );
        for d in [&home, &venv, &build] {
            std::fs::create_dir_all(d).unwrap();
        }
        executable(&build.join("ppserver"));
        // ~/bin/ppserver.py -> venv/bin/ppserver (relative) -> build/ppserver.
        std::os::unix::fs::symlink(build.join("ppserver"), venv.join("ppserver")).unwrap();
        std::os::unix::fs::symlink("../../venv/bin/ppserver", home.join("ppserver.py")).unwrap();
        let dirs: Vec<PathBuf> = link_dirs(&home.join("ppserver.py"))
            .iter()
            .map(|d| std::fs::canonicalize(d).unwrap())
            .collect();
        let canonical = |d: &Path| std::fs::canonicalize(d).unwrap();
        assert_eq!(
            dirs,
            vec![canonical(&home), canonical(&venv), canonical(&build)]
        );
        assert_eq!(link_dirs(&build.join("ppserver")), vec![build.clone()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_first_interpreter_found_per_directory_is_the_neighbour() {
        let root = scratch("neighbours");
        let (venv, sys, none) = (root.join("venv"), root.join("sys"), root.join("none"));
        for d in [&venv, &sys, &none] {
            std::fs::create_dir_all(d).unwrap();
        }
        executable(&venv.join("python3"));
        executable(&venv.join("python"));
        executable(&sys.join("python"));
        assert_eq!(
            neighbour_pythons(&[none, venv.clone(), sys.clone()]),
            vec![venv.join("python3"), sys.join("python")]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn in_a_pypy_venv_the_python3_link_is_the_neighbour() {
        // The bin/ of `pypy3 -m venv`: python3 -> pypy3 -> the interpreter
        // outside the venv. The link itself is run, not what it leads to:
        // only through the venv's path does PyPy find the venv's packages.
        let root = scratch("pypy-venv");
        let (system, venv) = (root.join("usr/bin"), root.join("venv/bin"));
        for d in [&system, &venv] {
            std::fs::create_dir_all(d).unwrap();
        }
        executable(&system.join("pypy3.9"));
        std::os::unix::fs::symlink(system.join("pypy3.9"), venv.join("pypy3")).unwrap();
        for name in ["pypy", "python", "python3", "python3.9"] {
            std::os::unix::fs::symlink("pypy3", venv.join(name)).unwrap();
        }
        assert_eq!(
            neighbour_pythons(std::slice::from_ref(&venv)),
            vec![venv.join("python3")]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_server_is_the_running_file_or_a_build_with_the_marker() {
        let root = scratch("marker");
        let exe = std::env::current_exe().unwrap();
        assert!(is_this_server(&exe, &exe));
        let copy = root.join("ppserver");
        let mut bytes = b"\x7fELF...".to_vec();
        bytes.extend_from_slice(MARKER);
        bytes.extend_from_slice(b"...");
        std::fs::write(&copy, &bytes).unwrap();
        assert!(is_this_server(&copy, &exe));
        let script = root.join("ppserver-py");
        std::fs::write(
            &script,
            b"#!/venv/bin/python\nfrom ppft.server import main\nmain()\n",
        )
        .unwrap();
        assert!(!is_this_server(&script, &exe));
        assert!(!is_this_server(&root.join("missing"), &exe));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
