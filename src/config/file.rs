//! The config file (`-c`): read over the flags before it, in configobj's
//! INI syntax ([`crate::config::inifile`]).

use std::path::Path;

use crate::config::inifile;
use crate::config::options::{self, Action};
use crate::config::settings::apply;
use crate::config::{Config, ConfigError, Origin};

/// Reads a config file over `cfg`, like ppft's `-c`: the file's values
/// replace what flags before `-c` set, and flags after it replace the
/// file's. Unlike ppft, a value that does not parse is an error, not
/// silently ignored.
pub(crate) fn apply_file(cfg: &mut Config, path: &Path) -> Result<(), ConfigError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag: "-c",
        path: path.to_path_buf(),
        source,
    })?;
    let sections = inifile::parse(&text).map_err(|source| ConfigError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    for (section, keys) in &sections {
        for (key, (value, line)) in keys {
            let Some(opt) = options::by_key(key) else {
                cfg.notes.push(format!(
                    "config file {shown}, line {line}: unknown key [{section}] {key}, ignored"
                ));
                continue;
            };
            let (home, _) = opt.key.unwrap_or((options::Section::General, ""));
            if home.name() != section {
                // ppft reads each key from its own section only; a key
                // elsewhere is most likely misplaced, so say where it goes.
                cfg.notes.push(format!(
                    "config file {shown}, line {line}: {key} belongs in [{home}], not \
                     [{section}]; ignored",
                    home = home.name()
                ));
                continue;
            }
            let (Action::Value(setting) | Action::Switch(setting)) = opt.action else {
                continue;
            };
            let at = Origin::Key {
                path: path.to_path_buf(),
                section: section.clone(),
                key: key.clone(),
                line: *line,
            };
            apply(cfg, setting, &at, value)?;
        }
    }
    Ok(())
}
