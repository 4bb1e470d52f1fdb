//! The subset of configobj's INI syntax that ppserver config files use:
//! `[section]` headers, `key = value` lines, `#` comments (whole-line or
//! after an unquoted value), and values in single or double quotes.
//! Written by hand because configobj's quoting and inline comments differ
//! from the common INI crates, and the subset is small.

use std::collections::BTreeMap;

/// Sections by name, each a map of keys to raw string values, plus the line
/// each key came from for error messages.
pub type Sections = BTreeMap<String, BTreeMap<String, (String, usize)>>;

/// A line that is not valid config-file syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// Parses the text of a config file. Errors name the line.
pub fn parse(text: &str) -> Result<Sections, SyntaxError> {
    let mut sections = Sections::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let err = |message: String| SyntaxError {
            line: lineno,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = strip_comment(rest)
                .trim_end()
                .strip_suffix(']')
                .ok_or_else(|| err("section header without closing ']'".into()))?;
            // configobj nests sections with [[sub]]; ppserver has none.
            let name = name.trim();
            if name.is_empty() || name.contains('[') || name.contains(']') {
                return Err(err(format!("bad section header {line:?}")));
            }
            sections.entry(name.to_string()).or_default();
            current = Some(name.to_string());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err(format!("expected 'key = value', got {line:?}")))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(err("empty key".into()));
        }
        let section = current
            .as_ref()
            .ok_or_else(|| err(format!("{key:?} is outside any [section]")))?;
        let value = unquote(value.trim()).map_err(err)?;
        if let Some(s) = sections.get_mut(section) {
            s.insert(key.to_string(), (value, lineno));
        }
    }
    Ok(sections)
}

/// Drops a `#` comment that follows unquoted text.
fn strip_comment(s: &str) -> &str {
    s.split_once('#').map_or(s, |(before, _)| before)
}

/// A value: quoted (the quotes removed, a comment may follow), or bare (up
/// to a `#` comment, trimmed).
fn unquote(v: &str) -> Result<String, String> {
    let mut chars = v.chars();
    match chars.next() {
        Some(q @ ('"' | '\'')) => {
            let body = &v[1..];
            let end = body
                .find(q)
                .ok_or_else(|| format!("unterminated quote in {v:?}"))?;
            let after = body[end + 1..].trim();
            if !after.is_empty() && !after.starts_with('#') {
                return Err(format!("unexpected text after quoted value {v:?}"));
            }
            Ok(body[..end].to_string())
        }
        _ => Ok(strip_comment(v).trim().to_string()),
    }
}

/// configobj's `as_bool`.
pub fn as_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppserver_config() {
        let text = "# ppserver config\n\
                    [general]\n\
                    secret = \"my # secret\"  # quoted keeps the hash\n\
                    workers = 4\n\
                    debug = yes\n\
                    \n\
                    [network]\n\
                    port=60001 # inline comment\n\
                    interface = '127.0.0.1'\n";
        let s = parse(text).unwrap();
        assert_eq!(s["general"]["secret"].0, "my # secret");
        assert_eq!(s["general"]["workers"].0, "4");
        assert_eq!(s["general"]["debug"], ("yes".to_string(), 5));
        assert_eq!(s["network"]["port"].0, "60001");
        assert_eq!(s["network"]["interface"].0, "127.0.0.1");
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("[general\nx=1").unwrap_err().line, 1);
        assert_eq!(parse("x = 1").unwrap_err().line, 1);
        assert_eq!(parse("[a]\njunk").unwrap_err().line, 2);
        let e = parse("[a]\nx = \"open").unwrap_err();
        assert!(
            e.to_string().starts_with("line 2: unterminated quote"),
            "{e}"
        );
    }

    #[test]
    fn bools_like_configobj() {
        assert_eq!(as_bool("Yes"), Some(true));
        assert_eq!(as_bool("off"), Some(false));
        assert_eq!(as_bool("maybe"), None);
    }
}
