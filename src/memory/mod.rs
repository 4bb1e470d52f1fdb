//! Memory held for clients: [`budget`] admits every client frame against
//! `--memory-limit`; [`mapped`] keeps large frames in mappings of their
//! own ([`mapping`]) and hands them to workers by `vmsplice`, without a
//! copy; [`spares`] keeps a few of those mappings for the next large
//! frames, inside the budget.

pub(crate) mod budget;
pub(crate) mod mapped;
pub(crate) mod mapping;
pub(crate) mod spares;
