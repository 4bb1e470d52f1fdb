//! The server's log: [`sink`] writes stderr and stdout from threads of
//! their own so a full pipe never stalls the server;
//! [`format`](mod@format) renders lines in Python `logging`'s format
//! (`-f`); [`ratelimit`] keeps warnings a peer can cause at will from
//! burying the log; [`panics`] sends panic messages through the sink too.

pub mod format;
pub mod panics;
pub(crate) mod ratelimit;
pub mod sink;
