//! What goes over the wire, and nothing else: the 8-byte-length frame
//! ([`wire`]) spoken on client sockets and worker pipes alike, the secret
//! handshake that opens every client connection ([`auth`]), the one pickle
//! the server writes itself ([`pickle`]) and the hex digests both use
//! ([`hex`]). No module here owns a socket's life or a job: they parse,
//! encode and check.

pub mod auth;
pub(crate) mod hex;
pub(crate) mod pickle;
pub mod wire;
