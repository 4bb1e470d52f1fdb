//! Files the server writes for the tools that launch it: the pid file
//! (`-P`) and the ready file (`--ready-file`). Each is a guard that
//! removes its file when dropped, so every way the server stops cleans up.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A file the server owns while it runs; removed on drop.
#[derive(Debug)]
pub struct RunFile {
    /// Where it was written.
    path: PathBuf,
    /// For the warning when it cannot be removed (`-P`, `--ready-file`).
    flag: &'static str,
    /// Left in place when dropped ([`RunFile::disown`]).
    disowned: bool,
}

impl RunFile {
    /// The `-P` pid file, as ppft writes it: the pid and a newline.
    pub fn pid(path: &Path) -> io::Result<RunFile> {
        write_atomically(path, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(RunFile {
            path: path.to_path_buf(),
            flag: "-P",
            disowned: false,
        })
    }

    /// The `--ready-file`: `host:port` and a newline, where a client can
    /// reach the server.
    pub fn ready(path: &Path, listening: SocketAddr) -> io::Result<RunFile> {
        write_atomically(path, format!("{}\n", reachable_at(listening)).as_bytes())?;
        Ok(RunFile {
            path: path.to_path_buf(),
            flag: "--ready-file",
            disowned: false,
        })
    }
}

impl RunFile {
    /// Lets go of the file without removing it: a new generation of the
    /// server, started by a reload, has written its own in its place.
    pub fn disown(mut self) {
        self.disowned = true;
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        if self.disowned {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove {} ({}): {e}", self.path.display(), self.flag);
        }
    }
}

/// Writes `content` to `path` so that a reader sees either no file or the
/// whole content: a launcher polling for the file must never read it half
/// written. The temporary file sits in the same directory, so the rename
/// stays on one file system. The directory may be shared (`/tmp`, a
/// world-writable run directory), so the temporary name is unpredictable
/// and the file is made new (`O_EXCL`) without following a symlink: a
/// name planted by another user makes the open fail, and a new name is
/// tried, rather than the server writing through it. `rename` replaces a
/// symlink at `path` itself rather than following it.
fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..TEMP_TRIES {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{:016x}", unpredictable()?));
        let tmp = PathBuf::from(tmp);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        return file
            .write_all(content)
            .and_then(|()| std::fs::rename(&tmp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            });
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// How many temporary names are tried: each is taken only if someone
/// planted it, which a random name makes a matter of guessing 64 bits.
const TEMP_TRIES: usize = 8;

/// 64 bits from the kernel's random source, for a temporary name.
fn unpredictable() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we pass.
    let n = unsafe { nix::libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::other(format!(
            "no random bytes for a temporary name: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(u64::from_ne_bytes(bytes))
}

/// `host:port` for a listener: the host's name when it listens on every
/// address (`-i 0.0.0.0`), since `0.0.0.0` reaches nothing from another
/// host; else the address it listens on.
fn reachable_at(listening: SocketAddr) -> String {
    if listening.ip().is_unspecified() {
        if let Ok(name) = nix::unistd::gethostname() {
            if let Some(name) = name.to_str().filter(|n| !n.is_empty()) {
                return format!("{name}:{}", listening.port());
            }
        }
    }
    listening.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ppserver-runfiles-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_hold_their_content_and_go_when_dropped() {
        let dir = temp_dir("content");
        let pid = dir.join("pid");
        let ready = dir.join("ready");
        let guards = (
            RunFile::pid(&pid).unwrap(),
            RunFile::ready(&ready, "127.0.0.1:61000".parse().unwrap()).unwrap(),
        );
        assert_eq!(
            std::fs::read_to_string(&pid).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert_eq!(
            std::fs::read_to_string(&ready).unwrap(),
            "127.0.0.1:61000\n"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temp file left"
        );
        drop(guards);
        assert!(!pid.exists() && !ready.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_disowned_file_stays() {
        let dir = temp_dir("disown");
        let pid = dir.join("pid");
        RunFile::pid(&pid).unwrap().disown();
        assert!(pid.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlink_planted_at_a_temp_name_is_never_written_through() {
        // Regression: the temp name was PATH.tmp<pid>, written with
        // fs::write, so a symlink planted there by another user made the
        // server write its pid into the file the link pointed to, and the
        // pid file became that user's symlink.
        use std::os::unix::fs::symlink;
        let dir = temp_dir("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let pid = dir.join("pid");
        let mut planted = pid.as_os_str().to_owned();
        planted.push(format!(".tmp{}", std::process::id()));
        symlink(&victim, &planted).unwrap();
        // A symlink at the pid file's own name is replaced, not followed.
        let ready = dir.join("ready");
        symlink(&victim, &ready).unwrap();

        let guards = (
            RunFile::pid(&pid).unwrap(),
            RunFile::ready(&ready, "127.0.0.1:61000".parse().unwrap()).unwrap(),
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        for written in [&pid, &ready] {
            let meta = std::fs::symlink_metadata(written).unwrap();
            assert!(
                meta.file_type().is_file(),
                "{} is a plain file",
                written.display()
            );
        }
        assert_eq!(
            std::fs::read_to_string(&pid).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(guards);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temp_names_differ_every_time() {
        assert_ne!(unpredictable().unwrap(), unpredictable().unwrap());
    }

    #[test]
    fn every_address_is_reported_as_the_host_name() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert_eq!(
            reachable_at("0.0.0.0:61000".parse().unwrap()),
            format!("{host}:61000")
        );
        assert_eq!(reachable_at("[::1]:7".parse().unwrap()), "[::1]:7");
    }
}
