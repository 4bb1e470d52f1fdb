//! `ppserver-rs`: the `ppserver` binary under a second name, the one the
//! wheel installs that no Python package takes (ppft's and pp's wheels
//! install a `ppserver` script of their own into the same `bin/`).

#[path = "../main.rs"]
mod ppserver_main;

fn main() -> std::process::ExitCode {
    ppserver_main::main()
}
