//! The `-h` text (ppft's layout: its flags first, each on one line, then
//! ours) and the `--help` text (every option with its long text, default
//! and bounds, then the environment, signals and exit statuses), both
//! rendered from [`crate::config::options`].

use crate::config::options::{Action, DefaultIs, Opt, ENVIRONMENT, EXIT_STATUS, OPTIONS, SIGNALS};
use crate::config::settings::Setting;
use crate::config::FALLBACK_MEMORY_LIMIT;

/// Width the texts are wrapped to.
const WIDTH: usize = 79;
/// Where `-h`'s texts start, after the `-p port            : ` column.
const COLUMN: usize = 19;

/// `ppserver X.Y.Z`, from Cargo.toml.
pub fn version() -> String {
    format!("ppserver {}", env!("CARGO_PKG_VERSION"))
}

/// Greedy word wrap: `first` before the first line, `indent` before the
/// others, no line past `width` unless one word is longer.
pub(crate) fn wrap(text: &str, first: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    // ASCII whitespace only: a non-breaking space holds a word together.
    for word in text.split_ascii_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out
}

/// The command line's shape: `[-hdqvar] [-f format] ... [--allow CIDR]...`.
pub fn synopsis() -> String {
    unbroken_synopsis().replace('\u{a0}', " ")
}

/// [`synopsis`] with non-breaking spaces within each item.
fn unbroken_synopsis() -> String {
    let switches: String = OPTIONS
        .iter()
        .filter(|o| o.value.is_none())
        .filter_map(|o| o.short)
        .map(|s| s.trim_start_matches('-'))
        .collect();
    let mut parts = vec![format!("[-{switches}]")];
    for o in OPTIONS {
        let name = match (o.short, o.long, o.value) {
            (Some(_), _, None) => continue,
            (Some(s), _, Some(v)) => format!("{s} {v}"),
            (None, Some(l), None) => l.to_string(),
            (None, Some(l), Some(v)) => format!("{l} {v}"),
            (None, None, _) => continue,
        };
        // Non-breaking within an item, so wrapping never splits one.
        let name = name.replace(' ', "\u{a0}");
        parts.push(format!("[{name}]{}", if o.repeatable { "..." } else { "" }));
    }
    parts.join(" ")
}

/// `-h`'s text for an option: its brief and default, and for a default
/// that depends on the machine, what it is on this one (the generated
/// pages cannot say that).
fn brief_with_default(o: &Opt) -> String {
    let here = match o.action {
        Action::Value(Setting::Workers) => Some(num_cpus::get().max(1).to_string()),
        Action::Value(Setting::MemoryLimit) => Some(
            crate::memory::budget::default_limit()
                .unwrap_or(FALLBACK_MEMORY_LIMIT)
                .to_string(),
        ),
        _ => None,
    };
    match (o.default, here) {
        (DefaultIs::Unsaid, _) => o.brief.to_string(),
        (DefaultIs::Value(v) | DefaultIs::Text(v), None) => format!("{} (default: {v})", o.brief),
        (DefaultIs::Value(v) | DefaultIs::Text(v), Some(here)) => {
            format!("{} (default: {v}; here {here})", o.brief)
        }
    }
}

/// The synopsis after `first`, wrapped under itself.
fn synopsis_lines(first: &str) -> String {
    wrap(&unbroken_synopsis(), first, &" ".repeat(first.len()), WIDTH).replace('\u{a0}', " ")
}

/// The `-h` text, in ppft's layout, with our options after its flags.
pub fn usage() -> String {
    let mut out = format!(
        "Parallel Python Network Server ({}, Rust)\n{}\n\nOptions:\n",
        version(),
        synopsis_lines("Usage: ppserver ")
    );
    let hang = format!("{}  ", " ".repeat(COLUMN));
    for o in OPTIONS {
        let name = o.synopsis();
        let text = brief_with_default(o);
        let row = if name.len() < COLUMN {
            wrap(&text, &format!("{name:<COLUMN$}: "), &hang, WIDTH)
        } else {
            format!(
                "{name}\n{}",
                wrap(&text, &format!("{}: ", " ".repeat(COLUMN)), &hang, WIDTH)
            )
        };
        out.push_str(&row);
        out.push('\n');
    }
    let names: Vec<&str> = ENVIRONMENT.iter().map(|(n, _)| *n).collect();
    out.push_str(&wrap(
        &format!(
            "Environment: {}. SIGUSR1 prints the job statistics; SIGUSR2 reloads (a new \
             process takes over the port); SIGTERM, SIGINT and SIGHUP stop the server \
             after a drain. ppserver --help and man ppserver describe every option, \
             variable and exit status.",
            names.join(", ")
        ),
        "\n",
        "",
        WIDTH,
    ));
    out.push_str(
        "\nClients must run the pp version the server advertises and use its secret.\n\
         Due to the security concerns always use a non-trivial secret key.",
    );
    out
}

/// The line under an option's text in `--help` and the man pages: its
/// default, what it accepts, and its config key or flag.
pub(crate) fn facts(o: &Opt, with_key: bool, with_flag: bool) -> String {
    let mut facts = Vec::new();
    if let Some(d) = o.default_text() {
        facts.push(format!("Default: {d}."));
    }
    if !o.bounds.is_empty() {
        facts.push(format!("Accepts: {}.", o.bounds));
    }
    if with_key {
        if let Some((section, key)) = o.key {
            facts.push(format!("Config key: {key} in [{}].", section.name()));
        }
    }
    if with_flag {
        let flags: Vec<&str> = o.flags().collect();
        if !flags.is_empty() {
            facts.push(format!("Flag: {}.", flags.join(", ")));
        }
    }
    if o.repeatable {
        facts.push("A list: a config file's list replaces earlier flags; each flag adds.".into());
    }
    facts.join(" ")
}

/// The `--help` text: every option with its long text, default, bounds
/// and config key, then the environment, signals and exit statuses.
pub fn long_usage() -> String {
    let indent = " ".repeat(6);
    let mut out = format!(
        "{} - Parallel Python network server, a drop-in for ppft's ppserver\n\n{}\n\nOPTIONS\n",
        version(),
        synopsis_lines("Usage: ppserver ")
    );
    for o in OPTIONS {
        out.push_str(&format!("  {}\n", o.synopsis()));
        out.push_str(&wrap(&o.long_text(), &indent, &indent, WIDTH));
        out.push('\n');
        let facts = facts(o, true, false);
        if !facts.is_empty() {
            out.push_str(&wrap(&facts, &indent, &indent, WIDTH));
            out.push('\n');
        }
        out.push('\n');
    }
    for (title, rows) in [
        ("ENVIRONMENT", ENVIRONMENT),
        ("SIGNALS", SIGNALS),
        ("EXIT STATUS", EXIT_STATUS),
    ] {
        out.push_str(title);
        out.push('\n');
        for (name, text) in rows {
            out.push_str(&format!(
                "  {name}\n{}\n",
                wrap(text, &indent, &indent, WIDTH)
            ));
        }
        out.push('\n');
    }
    out.push_str("See also ppserver(1) and ppserver.conf(5): man ppserver, man ppserver.conf.");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ppft's layout at the top: its title line, its usage line's start,
    /// and its flags one per row with the text after column 19.
    #[test]
    fn short_help_keeps_ppfts_layout() {
        let text = usage();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("Parallel Python Network Server ("),
            "{}",
            lines[0]
        );
        assert!(
            lines[1]
                .starts_with("Usage: ppserver [-hdqvar] [-f format] [-n proto] [-c config_path]"),
            "{}",
            lines[1]
        );
        let synopsis: Vec<&str> = lines[1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect();
        assert!(synopsis.len() > 3, "{text}");
        for line in synopsis {
            assert_eq!(
                line.matches('[').count(),
                line.matches(']').count(),
                "split: {line}"
            );
        }
        for row in [
            "-h                 : this help message",
            "-d                 : set log level to debug",
            "-p port            : port to listen (default: 60000)",
            "-P pid_file        : file to write PID to",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(row)),
                "{row:?} not in\n{text}"
            );
        }
        assert!(text.lines().all(|l| l.chars().count() <= WIDTH), "{text}");
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let cpus = num_cpus::get().max(1);
        assert!(
            flat.contains(&format!("the number of CPUs; here {cpus})")),
            "{text}"
        );
    }

    /// Every flag in `-h` and `--help`; every bound and key in `--help`.
    #[test]
    fn both_helps_name_every_option() {
        let (short, long) = (usage(), long_usage());
        // Wrapping may break a phrase anywhere.
        let flat = long.split_whitespace().collect::<Vec<_>>().join(" ");
        for o in OPTIONS {
            let name = o.synopsis();
            assert!(short.contains(&name), "{name} not in -h");
            assert!(
                long.contains(&format!("  {name}\n")),
                "{name} not in --help"
            );
            assert!(flat.contains(o.bounds), "{name}'s bounds not in --help");
            if let Some((_, key)) = o.key {
                assert!(flat.contains(&format!("Config key: {key} ")), "{key}");
            }
        }
        for (name, _) in ENVIRONMENT.iter().chain(EXIT_STATUS) {
            assert!(
                long.contains(&format!("  {name}\n")),
                "{name} not in --help"
            );
        }
        assert!(flat.contains("at least 16M") && flat.contains("0 to 65535"));
    }
}
