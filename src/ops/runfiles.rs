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
}

impl RunFile {
    /// The `-P` pid file, as ppft writes it: the pid and a newline.
    pub fn pid(path: &Path) -> io::Result<RunFile> {
        write_atomically(path, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(RunFile {
            path: path.to_path_buf(),
            flag: "-P",
        })
    }

    /// The `--ready-file`: `host:port` and a newline, where a client can
    /// reach the server.
    pub fn ready(path: &Path, listening: SocketAddr) -> io::Result<RunFile> {
        write_atomically(path, format!("{}\n", reachable_at(listening)).as_bytes())?;
        Ok(RunFile {
            path: path.to_path_buf(),
            flag: "--ready-file",
        })
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove {} ({}): {e}", self.path.display(), self.flag);
        }
    }
}

/// Writes `content` to `path` so that a reader sees either no file or the
/// whole content: a launcher polling for the file must never read it half
/// written. The temporary file sits in the same directory, so the rename
/// stays on one file system.
fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
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
    fn every_address_is_reported_as_the_host_name() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert_eq!(
            reachable_at("0.0.0.0:61000".parse().unwrap()),
            format!("{host}:61000")
        );
        assert_eq!(reachable_at("[::1]:7".parse().unwrap()), "[::1]:7");
    }
}
