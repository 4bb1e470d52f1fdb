//! The Python text the server starts its interpreters with, kept in files
//! of their own so that they read (and can be tried) as Python: the
//! worker bootstrap (`worker_bootstrap.py`), which runs the worker module
//! as `-m` would with the stop signals ignored, and the fork-server
//! (`forkserver.py`), which is the bootstrap's definition followed by its
//! own text, so that every worker it forks goes through the same
//! bootstrap as a spawned one.
//!
//! Both are passed with `-c` without their comment lines, which would
//! only lengthen every command line in `ps`.

use std::sync::OnceLock;
use std::time::Duration;

/// How long a new interpreter may take to announce itself (importing ppft
/// and dill, or the `--preload` modules, on a loaded machine can take
/// seconds).
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

const BOOTSTRAP: &str = include_str!("worker_bootstrap.py");
const FORKSERVER: &str = include_str!("forkserver.py");
/// The bootstrap's last line, which runs it; the fork-server calls it
/// itself, in each worker.
const BOOTSTRAP_CALL: &str = "_bootstrap()";

/// A spawned worker's `-c` text.
pub(crate) fn worker_code() -> &'static str {
    static CODE: OnceLock<String> = OnceLock::new();
    CODE.get_or_init(|| without_comment_lines(BOOTSTRAP))
}

/// The fork-server's `-c` text: the bootstrap's definition (without the
/// line that calls it), then the fork-server's.
pub(crate) fn forkserver_code() -> &'static str {
    static CODE: OnceLock<String> = OnceLock::new();
    CODE.get_or_init(|| {
        let definition = BOOTSTRAP
            .trim_end()
            .strip_suffix(BOOTSTRAP_CALL)
            .expect("worker_bootstrap.py ends with the line that runs it");
        without_comment_lines(&format!("{definition}\n{FORKSERVER}"))
    })
}

/// `source` without the lines that hold only a comment.
fn without_comment_lines(source: &str) -> String {
    source
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_texts_lose_only_their_comment_lines() {
        let code = without_comment_lines("# a\n  # b\nx = 1  # c\n\ny = '#'\n");
        assert_eq!(code, "x = 1  # c\n\ny = '#'\n");
        for code in [worker_code(), forkserver_code()] {
            assert!(!code.lines().any(|l| l.trim_start().starts_with('#')));
        }
    }

    #[test]
    fn a_worker_runs_the_bootstrap_and_the_fork_server_only_defines_it() {
        assert!(worker_code().trim_end().ends_with(BOOTSTRAP_CALL));
        let code = forkserver_code();
        assert!(code.contains("def _bootstrap(module=None):"), "{code}");
        assert!(code.contains("def _forkserver("), "{code}");
        assert!(code.trim_end().ends_with("_main()"), "{code}");
        assert!(!code.lines().any(|l| l.trim() == BOOTSTRAP_CALL));
    }
}
