//! Memory held for clients: [`budget`] admits every client frame against
//! `--memory-limit`; [`mapped`] keeps large frames in mappings of their
//! own and hands them to workers by `vmsplice`, without a copy.

pub(crate) mod budget;
pub(crate) mod mapped;
