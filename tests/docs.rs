//! The generated files in the repository (`docs/man/ppserver.1`,
//! `docs/man/ppserver.conf.5`, `docs/ppserver.conf.sample`) are what the
//! option table makes today: a definition changed without regenerating
//! fails here, and so does a metric list in `docs/operating.md` that is
//! not what the registry serves. `PPSERVER_REGENERATE_DOCS=1 cargo test --test docs`
//! rewrites them.

use std::path::Path;

use ppserver::config::docs;

fn check(relative: &str, fresh: String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if std::env::var_os("PPSERVER_REGENERATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    if shipped != fresh {
        let line = shipped
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| shipped.lines().count().min(fresh.lines().count()))
            + 1;
        panic!(
            "{relative} is stale: it differs from what the code generates (the option table, \
             src/config/options.rs, or the metrics registry, src/ops/metrics.rs) \
             from line {line}.\nRegenerate it with:\n    \
             PPSERVER_REGENERATE_DOCS=1 cargo test --test docs\nand commit the result."
        );
    }
}

#[test]
fn man_page_is_current() {
    check("docs/man/ppserver.1", docs::man_page());
}

#[test]
fn config_man_page_is_current() {
    check("docs/man/ppserver.conf.5", docs::conf_man_page());
}

#[test]
fn sample_config_is_current() {
    check("docs/ppserver.conf.sample", docs::sample_config());
}

/// The sample's keys, uncommented where it gives a value, make a config
/// file the server reads without a warning.
#[test]
fn sample_config_uncommented_is_read_cleanly() {
    use ppserver::config::flags::{parse_args_with, Env};
    use ppserver::config::Command;
    let text: String = docs::sample_config()
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(setting) if !setting.starts_with(' ') && !setting.trim_end().ends_with('=') => {
                format!("{setting}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(text.contains("\nport = 60000\n"), "{text}");
    let path = std::env::temp_dir().join(format!("ppserver-sample-{}.conf", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let parsed = parse_args_with(["-c", path.to_str().unwrap()], &Env::default());
    let _ = std::fs::remove_file(&path);
    match parsed {
        Ok(Command::Run(c)) => assert!(c.notes.is_empty(), "{:?}", c.notes),
        other => panic!("{other:?}\n{text}"),
    }
}

/// The metric list between the `metrics` markers of `docs/operating.md`
/// is what the registry serves.
#[test]
fn metric_list_is_current() {
    let relative = "docs/operating.md";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let page = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"));
    let (begin, end) = ("<!-- metrics:begin -->\n", "<!-- metrics:end -->");
    let (Some(a), Some(b)) = (page.find(begin), page.find(end)) else {
        panic!("{relative} has no {begin:?} ... {end:?} markers");
    };
    let fresh = format!(
        "{}{begin}{}{}",
        &page[..a],
        ppserver::ops::metrics_reference(ppserver::config::users::DEFAULT_USER),
        &page[b..]
    );
    check(relative, fresh);
}
