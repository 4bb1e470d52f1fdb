//! The man pages `ppserver(1)` and `ppserver.conf(5)` and the sample
//! config file, generated from [`crate::config::options`]; the copies in
//! `docs/` are checked against these by `tests/docs.rs`.
//!
//! The roff is written here directly: a page is a handful of requests
//! (`.TH`, `.SH`, `.TP`, `.nf`), and escaping `-`, `\` and a leading `.`
//! or `'` is all the text needs.

use crate::config::help::{facts, synopsis, version};
use crate::config::options::{DefaultIs, Opt, Section, ENVIRONMENT, EXIT_STATUS, OPTIONS, SIGNALS};

/// Text as roff: backslashes and hyphens escaped (so `-p` stays a minus
/// sign a reader can copy), and a line that would start with `.` or `'`
/// (a request) guarded.
pub fn roff(text: &str) -> String {
    text.lines()
        .map(|line| {
            let escaped = line.replace('\\', "\\e").replace('-', "\\-");
            if escaped.starts_with('.') || escaped.starts_with('\'') {
                format!("\\&{escaped}")
            } else {
                escaped
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn header(name: &str, section: u8, title: &str) -> String {
    format!(
        ".\\\" Generated from src/config/options.rs; do not edit.\n\
         .\\\" Regenerate: PPSERVER_REGENERATE_DOCS=1 cargo test --test docs\n\
         .TH {} {section} \"\" \"{}\" \"{title}\"\n\
         .ad l\n\
         .nh\n",
        name.to_uppercase(),
        version()
    )
}

fn section(out: &mut String, title: &str) {
    out.push_str(&format!(".SH {title}\n"));
}

fn paragraph(out: &mut String, text: &str) {
    out.push_str(".PP\n");
    out.push_str(&roff(text));
    out.push('\n');
}

fn tagged(out: &mut String, tag: &str, text: &str) {
    out.push_str(".TP\n");
    out.push_str(tag);
    out.push('\n');
    out.push_str(&roff(text));
    out.push('\n');
}

fn example(out: &mut String, text: &str) {
    out.push_str(".PP\n.RS\n.nf\n");
    out.push_str(&roff(text));
    out.push_str("\n.fi\n.RE\n");
}

/// `\fB-p\fR \fIport\fR`.
fn option_tag(o: &Opt) -> String {
    let names: Vec<String> = o.flags().map(|f| format!("\\fB{}\\fR", roff(f))).collect();
    let mut tag = names.join(", ");
    if let Some(v) = o.value {
        tag.push_str(&format!(" \\fI{}\\fR", roff(v)));
    }
    tag
}

const DESCRIPTION: &str = "ppserver runs the jobs that Parallel Python clients (ppft, pp, pathos) \
send it, on a pool of Python worker processes, as the ppserver of ppft and pp does: the same \
flags, config file, wire protocol and worker interpreter, so clients need no change. It is \
written in Rust and adds bounds on memory, connections and time, a drain on stop, metrics and \
fair sharing between client hosts.";

/// `ppserver(1)`.
pub fn man_page() -> String {
    let mut out = header("ppserver", 1, "User Commands");
    section(&mut out, "NAME");
    out.push_str("ppserver \\- Parallel Python network server\n");
    section(&mut out, "SYNOPSIS");
    out.push_str(&format!(".B ppserver\n{}\n", roff(&synopsis())));
    section(&mut out, "DESCRIPTION");
    paragraph(&mut out, DESCRIPTION);
    paragraph(
        &mut out,
        "Flags are parsed getopt-style: -dr, -p60000 and -p 60000 are alike, and a long \
         option's value may follow an = (--max-frame-size=64M). Sizes take K, M, G or T \
         suffixes (powers of 1024). Flags after -c override the config file, described in \
         ppserver.conf(5).",
    );
    section(&mut out, "OPTIONS");
    for o in OPTIONS {
        let mut text = o.long_text();
        let facts = facts(o, true, false);
        if !facts.is_empty() {
            text.push(' ');
            text.push_str(&facts);
        }
        tagged(&mut out, &option_tag(o), &text);
    }
    for (title, rows) in [("ENVIRONMENT", ENVIRONMENT), ("SIGNALS", SIGNALS)] {
        section(&mut out, title);
        for (name, text) in rows {
            tagged(&mut out, &format!("\\fB{}\\fR", roff(name)), text);
        }
    }
    section(&mut out, "FILES");
    tagged(
        &mut out,
        "\\fIppserver.conf\\fR",
        "The config file, read only where -c names it; see ppserver.conf(5). \
         docs/ppserver.conf.sample in the source lists every key with its default.",
    );
    tagged(
        &mut out,
        "\\fIpid_file\\fR, \\fIready_file\\fR",
        "Written while the server runs when -P and --ready-file name them, and removed \
         when it stops; after a reload (SIGUSR2) the new process's.",
    );
    section(&mut out, "EXIT STATUS");
    for (name, text) in EXIT_STATUS {
        tagged(&mut out, &format!("\\fB{name}\\fR"), text);
    }
    section(&mut out, "EXAMPLES");
    paragraph(
        &mut out,
        "Four workers on port 60000, the secret from a file:",
    );
    example(
        &mut out,
        "ppserver -w 4 -p 60000 --secret-file /etc/ppserver/secret",
    );
    paragraph(
        &mut out,
        "With autodiscovery on one subnet, serving only its clients:",
    );
    example(
        &mut out,
        "ppserver -a -b 192.0.2.255 --allow 192.0.2.0/24 --secret-file /etc/ppserver/secret",
    );
    paragraph(&mut out, "From a config file, with debug logging on top:");
    example(&mut out, "ppserver -c /etc/ppserver.conf -d");
    section(&mut out, "SEE ALSO");
    out.push_str("\\fBppserver.conf\\fR(5)\n");
    out
}

/// The options a section's keys belong to, in the table's order.
fn keys_of(section: Section) -> impl Iterator<Item = (&'static str, &'static Opt)> {
    OPTIONS.iter().filter_map(move |o| match o.key {
        Some((s, k)) if s == section => Some((k, o)),
        _ => None,
    })
}

/// `ppserver.conf(5)`.
pub fn conf_man_page() -> String {
    let mut out = header("ppserver.conf", 5, "File Formats");
    section(&mut out, "NAME");
    out.push_str("ppserver.conf \\- configuration file for ppserver\n");
    section(&mut out, "SYNOPSIS");
    out.push_str(".B ppserver \\-c\n.I path\n");
    section(&mut out, "DESCRIPTION");
    paragraph(
        &mut out,
        "The file ppserver reads where -c names it, in the INI syntax of Python's \
         configobj, as ppft's server reads it: [general] and [network] section headers, \
         key = value lines, # comments (whole lines, or after an unquoted value), and \
         values in single or double quotes (a quoted value may hold a #).",
    );
    paragraph(
        &mut out,
        "The file's values replace what flags before -c set, and flags after -c replace \
         the file's. A list (allow, broadcast, announce, preload) given in the file \
         replaces the list flags before -c gave; flags after it add to it. Switches take \
         true/false, yes/no, on/off or 1/0. Sizes take K, M, G or T suffixes (powers of \
         1024). A value that does not parse stops the server with status 2, naming the key \
         and line. A key the server does not know, or one in the wrong section, is a \
         warning and is ignored.",
    );
    for s in [Section::General, Section::Network] {
        section(&mut out, &format!("THE [{}] SECTION", s.name()));
        for (key, o) in keys_of(s) {
            let mut text = o.long_text();
            let mut facts = facts(o, false, true);
            if o.value.is_none() {
                facts.push_str(" Accepts: true/false, yes/no, on/off, 1/0. Default: false.");
            }
            text.push(' ');
            text.push_str(facts.trim_start());
            tagged(&mut out, &format!("\\fB{}\\fR", roff(key)), &text);
        }
    }
    section(&mut out, "THE USERS FILE");
    paragraph(
        &mut out,
        "The file the users key (--users) names, in the same syntax: one section per \
         user, named after the user (the name default is kept for the -s secret's user, \
         who joins them when -s or secret_file is given). A login is the user whose \
         secret gives the client's answer to the nonce. A mistake (a missing or repeated \
         secret, an unknown key, a bad value) stops the server, naming the file, line and \
         user. The file holds every user's secret: a file group or others can read is \
         a warning. Each section takes these keys:",
    );
    for (key, text) in crate::config::users::KEYS {
        tagged(&mut out, &format!("\\fB{}\\fR", roff(key)), text);
    }
    example(
        &mut out,
        "[alice]\nsecret = a long random string\nuid = 64001\nmax_workers = 4\nweight = 2\n\n\
         [bob]\nsecret = another one\nmax_queued = 1000\njob_timeout = 600",
    );
    section(&mut out, "EXAMPLE");
    example(
        &mut out,
        "[general]\nworkers = 8\nsecret_file = /etc/ppserver/secret\ndrain_timeout = 60\n\
         worker_memory_limit = 2G\n\n[network]\nport = 60000\nautodiscovery = yes\n\
         broadcast = 192.0.2.255\nallow = 192.0.2.0/24, 127.0.0.1",
    );
    paragraph(
        &mut out,
        "docs/ppserver.conf.sample in the source lists every key with its default.",
    );
    section(&mut out, "SEE ALSO");
    out.push_str("\\fBppserver\\fR(1)\n");
    out
}

/// A value as the config file writes it: quoted when it holds a `#` or
/// spaces, which a bare value would lose.
fn conf_value(v: &str) -> String {
    if v.contains('#') || v.contains(' ') {
        format!("\"{v}\"")
    } else {
        v.to_string()
    }
}

/// The sample config file: every key with its default, commented out.
pub fn sample_config() -> String {
    let mut out = String::from(
        "# ppserver.conf: every key ppserver reads, with its default, commented out.\n\
         # Generated from src/config/options.rs; see ppserver.conf(5).\n\
         # Use: ppserver -c /etc/ppserver.conf (flags after -c override the file).\n",
    );
    for s in [Section::General, Section::Network] {
        out.push_str(&format!("\n[{}]\n", s.name()));
        for (key, o) in keys_of(s) {
            let flags: Vec<&str> = o.flags().collect();
            out.push_str(&crate::config::help::wrap(
                &format!(
                    "{} ({}).",
                    o.long_text().trim_end_matches('.'),
                    flags.join(", ")
                ),
                "\n# ",
                "# ",
                79,
            ));
            out.push('\n');
            match o.default {
                DefaultIs::Value(v) => out.push_str(&format!("#{key} = {}\n", conf_value(v))),
                DefaultIs::Text(t) => out.push_str(&format!("# Default: {t}.\n#{key} =\n")),
                DefaultIs::Unsaid => out.push_str(&format!("#{key} = no\n")),
            }
        }
    }
    out
}
