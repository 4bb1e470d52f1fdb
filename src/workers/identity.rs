//! A worker as a user's uid: what a new worker process takes on before it
//! reads its first job, when its user has a `uid` in the users file
//! ([`crate::config::users::Credentials`]).
//!
//! The drop happens in the new process itself, after the fork and before
//! any of the job's code can run: a spawned worker does it in its
//! `pre_exec` ([`crate::workers::process::prepare`]), a forked one in the
//! fork-server's fork, which gets the uid, groups and environment in the
//! request ([`Identity::fork_request`]); the fork-server itself stays the
//! server's uid. Either way the order is supplementary groups, then the
//! gid, then the uid, each real, effective and saved at once
//! (`setresgid`, `setresuid`): with the saved uid gone too, and the
//! capabilities a root process loses when all of its uids leave 0, no
//! job can take root back.
//!
//! The kernel clears `PR_SET_PDEATHSIG` when a process's credentials
//! change, so a worker sets its death signal after the drop, and checks
//! its parent again then.
//!
//! The environment follows the uid: `HOME`, `USER` and `LOGNAME` from the
//! passwd entry of a named user; for a number with no entry, `HOME=/` and
//! no `USER` or `LOGNAME`, rather than the server's, which name root.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;

use tokio::process::Command;

use crate::config::users::Credentials;

/// Who a new worker becomes, prepared in the server so that the child
/// only makes system calls ([`Identity::take`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    uid: nix::libc::uid_t,
    gid: nix::libc::gid_t,
    groups: Vec<nix::libc::gid_t>,
    /// Variables set (`Some`) or removed (`None`).
    env: Vec<(&'static str, Option<OsString>)>,
}

impl Identity {
    /// The identity of a user's workers.
    pub(crate) fn of(credentials: &Credentials) -> Identity {
        let env = match &credentials.account {
            Some((name, home)) => vec![
                ("HOME", Some(home.as_os_str().to_owned())),
                ("USER", Some(OsString::from(name))),
                ("LOGNAME", Some(OsString::from(name))),
            ],
            None => vec![
                ("HOME", Some(OsString::from("/"))),
                ("USER", None),
                ("LOGNAME", None),
            ],
        };
        Identity {
            uid: credentials.uid,
            gid: credentials.gid,
            groups: credentials.groups.clone(),
            env,
        }
    }

    /// Gives `cmd`'s child this identity's environment.
    pub(crate) fn set_env(&self, cmd: &mut Command) {
        for (name, value) in &self.env {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
    }

    /// Becomes this identity: groups, gid, uid. Run in a forked child
    /// before exec: async-signal-safe, nothing allocated. An error leaves
    /// the child to fail its start; it never runs on as the server's uid.
    pub(crate) fn take(&self) -> io::Result<()> {
        // SAFETY: setgroups reads `len` gids from a buffer that outlives
        // the call; the others take plain numbers.
        let failed = unsafe {
            nix::libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || nix::libc::setresgid(self.gid, self.gid, self.gid) != 0
                || nix::libc::setresuid(self.uid, self.uid, self.uid) != 0
        };
        if failed {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The fork-server's request for a worker with this identity, after the
    /// request byte `U` ([`crate::workers::forkserver`]): one line of
    /// tab-separated fields, `UID`, `GID`, the groups joined by commas,
    /// then one field per variable, `NAME=HEX` to set it (the value in
    /// hex, so that no byte of it can break the line) or `NAME` to remove
    /// it.
    pub(crate) fn fork_request(&self) -> Vec<u8> {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        let mut line = format!("{}\t{}\t{}", self.uid, self.gid, groups.join(","));
        for (name, value) in &self.env {
            line.push('\t');
            line.push_str(name);
            if let Some(value) = value {
                line.push('=');
                line.push_str(&hex(value.as_bytes()));
            }
        }
        line.push('\n');
        line.into_bytes()
    }
}

/// `bytes` in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    crate::protocol::hex::encode_into(bytes, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn numeric() -> Credentials {
        Credentials {
            uid: 64001,
            gid: 64005,
            groups: Vec::new(),
            account: None,
        }
    }

    #[test]
    fn a_number_without_an_entry_gets_no_name_and_the_root_directory_as_home() {
        let id = Identity::of(&numeric());
        assert_eq!(
            id.fork_request(),
            b"64001\t64005\t\tHOME=2f\tUSER\tLOGNAME\n".to_vec()
        );
    }

    #[test]
    fn a_named_user_gets_its_home_name_and_groups() {
        let named = Credentials {
            uid: 1001,
            gid: 1001,
            groups: vec![1001, 27],
            account: Some(("alice".into(), PathBuf::from("/home/al\tice"))),
        };
        let line = String::from_utf8(Identity::of(&named).fork_request()).unwrap();
        let fields: Vec<&str> = line.trim_end().split('\t').collect();
        assert_eq!(fields[..3], ["1001", "1001", "1001,27"]);
        assert_eq!(
            fields[3],
            format!("HOME={}", hex(b"/home/al\tice")),
            "a tab in a value cannot split the line"
        );
        assert_eq!(fields[4..], ["USER=616c696365", "LOGNAME=616c696365"]);
    }
}
