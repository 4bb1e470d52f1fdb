//! Python `logging` format strings (`-f`), so log lines can keep the shape
//! ppft users have set up their log collection for. Supports the `%(key)s`
//! fields a server's records have, with Python's width/alignment flags
//! (`%(levelname)-8s`).

use std::fmt::Write as _;
use std::time::SystemTime;

/// ppft's default format.
pub const DEFAULT_FORMAT: &str = "%(asctime)s - %(name)s - %(levelname)s - %(message)s";

/// The logger name in records, as ppft's (`logging.getLogger("pp")`).
const LOGGER_NAME: &str = "pp";

#[derive(Debug, Clone, PartialEq)]
enum Field {
    AscTime,
    Created,
    Msecs,
    Name,
    LevelName,
    LevelNo,
    Message,
    Process,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field {
        field: Field,
        left: bool,
        width: usize,
    },
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq)]
pub struct LogFormat(Vec<Part>);

impl LogFormat {
    /// Parses a Python `%`-style logging format; errors say what is wrong.
    pub fn parse(fmt: &str) -> Result<LogFormat, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = fmt;
        while let Some(pos) = rest.find('%') {
            text.push_str(&rest[..pos]);
            rest = &rest[pos + 1..];
            if let Some(r) = rest.strip_prefix('%') {
                text.push('%');
                rest = r;
                continue;
            }
            let r = rest
                .strip_prefix('(')
                .ok_or_else(|| format!("'%' must be followed by '(name)' or '%' in {fmt:?}"))?;
            let close = r
                .find(')')
                .ok_or_else(|| format!("unclosed '%(' in {fmt:?}"))?;
            let key = &r[..close];
            let mut r = &r[close + 1..];
            let left = if let Some(x) = r.strip_prefix('-') {
                r = x;
                true
            } else {
                false
            };
            let digits = r.len() - r.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let width = r[..digits].parse().unwrap_or(0);
            r = &r[digits..];
            if let Some(x) = r.strip_prefix('.') {
                r = x.trim_start_matches(|c: char| c.is_ascii_digit());
            }
            let conv = r
                .chars()
                .next()
                .filter(|c| "sdfir".contains(*c))
                .ok_or_else(|| {
                    format!("missing conversion (e.g. 's') after %({key}) in {fmt:?}")
                })?;
            rest = &r[conv.len_utf8()..];
            let field = match key {
                "asctime" => Field::AscTime,
                "created" => Field::Created,
                "msecs" => Field::Msecs,
                "name" => Field::Name,
                "levelname" => Field::LevelName,
                "levelno" => Field::LevelNo,
                "message" => Field::Message,
                "process" => Field::Process,
                other => return Err(format!("unsupported log field %({other}) in {fmt:?}")),
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Field { field, left, width });
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(LogFormat(parts))
    }

    /// Renders one record.
    pub fn render(
        &self,
        out: &mut String,
        level: log::Level,
        message: &std::fmt::Arguments<'_>,
        now: SystemTime,
    ) {
        for part in &self.0 {
            let (field, left, width) = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Field { field, left, width } => (field, *left, *width),
            };
            let value = match field {
                Field::AscTime => asctime(now),
                Field::Created => format!("{:.6}", unix_secs(now)),
                Field::Msecs => format!("{}", (unix_secs(now).fract() * 1000.0) as u32),
                Field::Name => LOGGER_NAME.to_string(),
                Field::LevelName => python_level(level).to_string(),
                Field::LevelNo => python_levelno(level).to_string(),
                Field::Message => message.to_string(),
                Field::Process => std::process::id().to_string(),
            };
            let _ = if left {
                write!(out, "{value:<width$}")
            } else {
                write!(out, "{value:>width$}")
            };
        }
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Python's level names; trace has no Python level and shows as DEBUG.
fn python_level(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARNING",
        log::Level::Info => "INFO",
        log::Level::Debug | log::Level::Trace => "DEBUG",
    }
}

fn python_levelno(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug | log::Level::Trace => 10,
    }
}

/// `2026-11-26 03:38:07,662` in local time, like Python's default asctime.
fn asctime(now: SystemTime) -> String {
    let secs = unix_secs(now);
    let whole = secs.floor() as nix::libc::time_t;
    let millis = ((secs - secs.floor()) * 1000.0) as u32;
    // SAFETY: localtime_r only writes the tm we pass; a zeroed tm is valid.
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !nix::libc::localtime_r(&whole, &mut tm).is_null() };
    if !ok {
        return format!("{whole},{millis:03}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02},{millis:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(fmt: &str, level: log::Level, msg: &str) -> String {
        let f = LogFormat::parse(fmt).unwrap();
        let mut out = String::new();
        f.render(
            &mut out,
            level,
            &format_args!("{msg}"),
            SystemTime::UNIX_EPOCH,
        );
        out
    }

    #[test]
    fn default_format_shape() {
        let line = render(DEFAULT_FORMAT, log::Level::Warn, "hello");
        assert!(line.ends_with(" - pp - WARNING - hello"), "{line}");
        // "YYYY-MM-DD HH:MM:SS,mmm"
        let ts = line.split(" - ").next().unwrap();
        assert_eq!(ts.len(), 23, "{ts}");
        assert_eq!(&ts[19..20], ",");
    }

    #[test]
    fn width_flags_and_percent() {
        assert_eq!(
            render("[%(levelname)-8s] %(message)s 100%%", log::Level::Info, "m"),
            "[INFO    ] m 100%"
        );
        assert_eq!(
            render("%(levelno)3d|%(name)s", log::Level::Error, ""),
            " 40|pp"
        );
    }

    #[test]
    fn bad_formats_are_errors() {
        assert!(LogFormat::parse("%(bogus)s").unwrap_err().contains("bogus"));
        assert!(LogFormat::parse("%(message)").is_err());
        assert!(LogFormat::parse("%s").is_err());
        assert!(LogFormat::parse("%(message").is_err());
    }
}
