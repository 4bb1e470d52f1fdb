//! What a config says, as a list of `(key, value)` a reload compares: the
//! old process passes its summary to the new one, which logs what
//! changed ([`changes`]), so an operator sees what a reload did.
//!
//! The summary never holds the secret, nor anything made from it: it
//! travels in the environment, which stays readable in
//! `/proc/PID/environ`. A list (`--allow`, `-b`, `--preload`) is a
//! [`Value::Set`], whose change is told as what was added and removed; a
//! key is a flag's name, or a name of its own for what no flag sets. A
//! new setting joins the summary with one line in [`Config::summary`];
//! a key only one side knows (an upgrade that added it) is told as such.

use crate::config::Config;

/// A setting's value as the summary holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// One value, as text.
    One(String),
    /// A list, whose order does not matter.
    Set(Vec<String>),
}

/// One setting: its key and value.
pub type Entry = (String, Value);

/// Separates the items of a [`Value::Set`] in [`encode`]'s text.
const ITEM_SEP: char = '\t';

fn one(key: &str, value: impl ToString) -> Entry {
    (key.to_string(), Value::One(value.to_string()))
}

fn set<T: ToString>(key: &str, items: impl IntoIterator<Item = T>) -> Entry {
    (
        key.to_string(),
        Value::Set(items.into_iter().map(|i| i.to_string()).collect()),
    )
}

fn or_none<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_string(), |v| v.to_string())
}

fn seconds(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

impl Config {
    /// Every setting a reload may change, without the secret.
    pub fn summary(&self) -> Vec<Entry> {
        let path = |p: &Option<std::path::PathBuf>| or_none(p.as_ref().map(|p| p.display()));
        let mut entries = vec![
            one("version", env!("CARGO_PKG_VERSION")),
            one("-i", &self.interface),
            one("-p", self.port),
            one("-w", self.workers),
            one("-r", self.restart),
            one("-n", or_none(self.proto)),
            one("-k", seconds(self.socket_timeout)),
            one("-t", or_none(self.idle_exit.map(seconds))),
            one("-d", self.debug),
            one("-v", self.verbose),
            one("-q", self.quiet),
            one("-a", self.autodiscovery),
            set("-b", &self.broadcast),
            set("--announce", &self.announce),
            one("--advertise-ncpus", or_none(self.advertise_ncpus)),
            one("-P", path(&self.pid_file)),
            one("--ready-file", path(&self.ready_file)),
            one(
                "secret",
                if self.secret_is_default {
                    "pp's default"
                } else {
                    "given (never shown)"
                },
            ),
            one("--python", path(&self.python)),
            one("--worker-module", or_none(self.worker_module.as_ref())),
            one("--pp-version", or_none(self.pp_version.as_ref())),
            one("--max-frame-size", self.max_frame_size),
            one("--max-connections", self.max_connections),
            one("--max-handshakes", self.max_handshakes),
            one(
                "--max-handshakes-per-address",
                or_none(self.max_handshakes_per_address),
            ),
            one("--drain-timeout", seconds(self.drain_timeout)),
            one("--memory-limit", self.memory_limit),
            one("--metrics", or_none(self.metrics)),
            one("--max-jobs-per-worker", self.max_jobs_per_worker),
            one("--keep-abandoned", self.keep_abandoned),
            set("--allow", self.allow.networks()),
            one("--login-delay", seconds(self.login_delay)),
            one("--job-timeout", or_none(self.job_timeout.map(seconds))),
            one("--worker-start", self.worker_start.name()),
            set("--preload", &self.preload),
            one(
                "--worker-memory-limit",
                or_none(self.worker_memory_limit.as_ref().map(|l| &l.text)),
            ),
            set("--proxy-protocol", self.proxy_protocol.iter()),
            one(
                "--users",
                path(&self.users.as_ref().map(|f| f.path.clone())),
            ),
            one(
                "--isolate",
                if self.isolates_users() {
                    "user"
                } else {
                    "none"
                },
            ),
        ];
        // The users by name, then each user's settings (never the secret):
        // a user added or removed shows in the first, a changed limit in
        // the second.
        let users: Vec<&crate::config::users::User> = self
            .users
            .iter()
            .flat_map(|f| f.users.iter().map(|u| u.as_ref()))
            .collect();
        entries.push(set("users", users.iter().map(|u| &u.name)));
        for u in users {
            entries.push(one(&format!("{USER_PREFIX}{}", u.name), user_settings(u)));
        }
        entries
    }
}

/// The key of one user's settings in a summary: `user alice`.
const USER_PREFIX: &str = "user ";

/// A user's settings as a summary shows them, without the secret.
fn user_settings(u: &crate::config::users::User) -> String {
    let mut parts = vec![format!("weight {}", u.weight)];
    if let Some(c) = &u.credentials {
        parts.push(format!("uid {} gid {}", c.uid, c.gid));
    }
    if let Some(n) = u.max_workers {
        parts.push(format!("max_workers {n}"));
    }
    if let Some(n) = u.max_queued {
        parts.push(format!("max_queued {n}"));
    }
    if let Some(t) = u.job_timeout {
        parts.push(format!("job_timeout {}", t.as_secs()));
    }
    parts.join(", ")
}

/// The summary as text, one entry a line: `key=value`, or `key[]=` and
/// the items separated by tabs. Tabs and line ends inside a value become
/// spaces: the text is for telling what changed, not for restoring it.
pub fn encode(entries: &[Entry]) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let mut out = String::new();
    for (key, value) in entries {
        match value {
            Value::One(v) => out.push_str(&format!("{}={}\n", clean(key), clean(v))),
            Value::Set(items) => {
                let items: Vec<String> = items.iter().map(|i| clean(i)).collect();
                out.push_str(&format!(
                    "{}[]={}\n",
                    clean(key),
                    items.join(&ITEM_SEP.to_string())
                ));
            }
        }
    }
    out
}

/// [`encode`]'s text back as entries; lines that do not parse are left
/// out (the text comes from another process, maybe another version).
pub fn decode(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            Some(match key.strip_suffix("[]") {
                Some(key) => (
                    key.to_string(),
                    Value::Set(
                        value
                            .split(ITEM_SEP)
                            .filter(|i| !i.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                ),
                None => (key.to_string(), Value::One(value.to_string())),
            })
        })
        .collect()
}

/// What differs from `old` in `new`, one line each (`-w: 2 -> 3`,
/// `--allow: added 10.0.0.0/8; removed 192.0.2.0/24`), in `new`'s order
/// and then the keys only `old` has.
pub fn changes(old: &[Entry], new: &[Entry]) -> Vec<String> {
    let find = |list: &[Entry], key: &str| -> Option<Value> {
        list.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let mut out = Vec::new();
    for (key, value) in new {
        match (find(old, key), value) {
            // A user added: the users entry says so.
            (None, _) if key.starts_with(USER_PREFIX) => {}
            (None, _) => out.push(format!(
                "{key}: {} (not known to the previous process)",
                show(value)
            )),
            (Some(before), _) if &before == value => {}
            (Some(Value::Set(before)), Value::Set(after)) => {
                let added: Vec<&str> = after
                    .iter()
                    .filter(|i| !before.contains(i))
                    .map(String::as_str)
                    .collect();
                let removed: Vec<&str> = before
                    .iter()
                    .filter(|i| !after.contains(i))
                    .map(String::as_str)
                    .collect();
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!("added {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    parts.push(format!("removed {}", removed.join(", ")));
                }
                if parts.is_empty() {
                    parts.push("reordered".to_string());
                }
                out.push(format!("{key}: {}", parts.join("; ")));
            }
            (Some(before), _) => out.push(format!("{key}: {} -> {}", show(&before), show(value))),
        }
    }
    for (key, value) in old {
        if find(new, key).is_none() && !key.starts_with(USER_PREFIX) {
            out.push(format!("{key}: {} before, no longer known", show(value)));
        }
    }
    out
}

/// A value as the log shows it.
fn show(value: &Value) -> String {
    match value {
        Value::One(v) => v.clone(),
        Value::Set(items) if items.is_empty() => "none".to_string(),
        Value::Set(items) => items.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_survives_its_text_and_holds_no_secret() {
        let mut cfg = Config {
            secret: "very-secret-words".into(),
            secret_is_default: false,
            preload: vec!["numpy".into(), "json".into()],
            ..Config::default()
        };
        cfg.allow.extend_from("10.0.0.0/8, 192.0.2.7").unwrap();
        let summary = cfg.summary();
        let text = encode(&summary);
        assert!(!text.contains("very-secret-words"), "{text}");
        assert_eq!(decode(&text), summary);
        assert!(changes(&summary, &summary).is_empty());
    }

    #[test]
    fn changes_tell_values_and_what_lists_gained_and_lost() {
        let old = Config {
            workers: 2,
            ..Config::default()
        };
        let mut new = Config {
            workers: 3,
            ..Config::default()
        };
        new.allow.extend_from("127.0.0.2").unwrap();
        let mut before = old.summary();
        before.push(("gone".into(), Value::One("x".into())));
        let mut after = new.summary();
        after.push((
            "future".into(),
            Value::Set(vec!["ann".into(), "bob".into()]),
        ));
        assert_eq!(
            changes(&before, &after),
            vec![
                "-w: 2 -> 3".to_string(),
                "--allow: added 127.0.0.2/32".to_string(),
                "future: ann, bob (not known to the previous process)".to_string(),
                "gone: x before, no longer known".to_string(),
            ]
        );
        let mut narrower = Config::default();
        narrower.allow.extend_from("10.0.0.0/8,127.0.0.2").unwrap();
        let mut wider = Config::default();
        wider.allow.extend_from("127.0.0.2,192.0.2.0/24").unwrap();
        assert_eq!(
            changes(&narrower.summary(), &wider.summary()),
            vec!["--allow: added 192.0.2.0/24; removed 10.0.0.0/8".to_string()]
        );
    }

    #[test]
    fn changes_tell_users_added_removed_and_changed_without_secrets() {
        use crate::config::users;
        use std::path::Path;
        use std::sync::Arc;
        let file = |text: &str| Some(Arc::new(users::parse(Path::new("/u"), text).unwrap()));
        let old = Config {
            users: file("[alice]\nsecret = a1\n[bob]\nsecret = b1\n"),
            ..Config::default()
        };
        let new = Config {
            users: file("[alice]\nsecret = a2\nweight = 3\n[carol]\nsecret = c1\n"),
            ..Config::default()
        };
        let said = changes(&decode(&encode(&old.summary())), &new.summary());
        assert_eq!(
            said,
            [
                "users: added carol; removed bob",
                "user alice: weight 1 -> weight 3"
            ],
            "{said:?}"
        );
        let text = encode(&new.summary());
        for secret in ["a2", "c1"] {
            assert!(!text.contains(&format!("={secret}")), "{text}");
        }
    }

    #[test]
    fn lines_from_elsewhere_that_do_not_parse_are_left_out() {
        assert_eq!(
            decode("no equals sign\n-w=4\nempty[]=\n"),
            vec![
                ("-w".to_string(), Value::One("4".into())),
                ("empty".to_string(), Value::Set(Vec::new())),
            ]
        );
    }
}
