//! The Python workers that run the jobs: [`install`] finds the interpreter
//! and checks, by a probe it runs, that it has the worker package;
//! [`pool`] keeps one supervisor per slot that feeds its worker jobs and
//! replaces it when it dies; [`worker`] is one worker process (started,
//! handshake, run a job, stop and reap), forked by the [`forkserver`] or
//! spawned, each way through the Python text of [`bootstrap`], and held
//! as a [`process`], as its user's uid if the users file gives one
//! ([`identity`]; [`access`] checks at startup that each uid can run
//! them); [`memlimit`] holds each worker to
//! `--worker-memory-limit` (a memory cgroup per slot, else polling);
//! [`reaper`] deals with what jobs leave behind: orphans reaped, and all
//! killed when the server stops.

pub(crate) mod access;
pub(crate) mod bootstrap;
pub(crate) mod forkserver;
pub(crate) mod identity;
pub(crate) mod install;
pub(crate) mod memlimit;
pub(crate) mod pool;
pub(crate) mod process;
pub mod reaper;
pub(crate) mod worker;
