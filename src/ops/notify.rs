//! Telling the service manager about the server: systemd's `sd_notify`
//! protocol, one datagram of `KEY=value` lines to the socket named by
//! `NOTIFY_SOCKET`.
//!
//! The server sends `READY=1` once it listens with a worker up (what
//! `Type=notify` waits for), and at a reload the old process, still the
//! service's main process, sends `MAINPID=<new pid>` before it starts to
//! drain: under `KillMode=mixed` the main process's exit would otherwise
//! stop the service and kill the new generation with it. Sent by the main
//! process, it needs no more than `NotifyAccess=main`. Without
//! `NOTIFY_SOCKET` (not under systemd) nothing is sent.
//!
//! The variable stays in the environment, so a new generation started by
//! a reload can notify too; systemd ignores what workers might send, as
//! they are not the main process.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable naming the service manager's socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `READY=1`) if the server runs under a service
/// manager that listens; a failure is logged at debug level and otherwise
/// ignored, since the server serves all the same.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = send(&path, state) {
        log::debug!(
            "cannot notify the service manager at {} ({state}): {e}",
            path.to_string_lossy()
        );
    }
}

/// One datagram to `path`: a file system path, or `@name` in the abstract
/// namespace.
fn send(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?
    } else {
        socket.send_to(state.as_bytes(), path)?
    };
    if sent != state.len() {
        return Err(io::Error::other("the datagram was cut short"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("ppserver-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ppserver-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "MAINPID=7").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=7");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
