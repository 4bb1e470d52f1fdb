//! The server's log: [`sink`] writes stderr and stdout from threads of
//! their own so a full pipe never stalls the server;
//! [`format`](mod@format) renders lines in Python `logging`'s format
//! (`-f`); [`ratelimit`] keeps warnings a peer can cause at will from
//! burying the log.

pub mod format;
pub(crate) mod ratelimit;
pub mod sink;
