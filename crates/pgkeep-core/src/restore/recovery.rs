//! Step 4 of a restore: `backup_label` and the recovery settings
//! (`postgresql.auto.conf` and the signal file) that make PostgreSQL fetch
//! WAL with `pgkeep archive-get` and stop at the target, or run as a
//! standby.

use std::path::Path;

use super::files::write_file;
use super::*;
use crate::error::{Error, Result};
use crate::repo::Manifest;
use crate::types::BackupLabel;

/// The recovery settings pgkeep owns; earlier values of these in
/// `postgresql.auto.conf` (from the source or an earlier restore) are
/// dropped so only ours apply.
pub(super) const RECOVERY_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
];

/// The lines appended to `postgresql.auto.conf`.
pub fn recovery_settings(label: &BackupLabel, opts: &RestoreOptions) -> Vec<String> {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let mut lines = vec![format!("# recovery settings written by pgkeep restore of backup {label}")];
    lines.push(format!("restore_command = {}", quote(&opts.restore_command)));
    let target = match &opts.target {
        None | Some(Target::End) => None,
        Some(Target::Immediate) => Some(("recovery_target", "immediate".to_owned())),
        Some(Target::Time(t)) => Some(("recovery_target_time", target::format_time(t))),
        Some(Target::Lsn(l)) => Some(("recovery_target_lsn", l.to_string())),
        Some(Target::Xid(x)) => Some(("recovery_target_xid", x.to_string())),
        Some(Target::Name(n)) => Some(("recovery_target_name", n.clone())),
    };
    if let Some(conninfo) = opts.primary_conninfo.as_deref().filter(|_| opts.standby) {
        lines.push(format!("primary_conninfo = {}", quote(conninfo)));
    }
    if let Some((key, value)) = target.filter(|_| !opts.standby) {
        lines.push(format!("{key} = {}", quote(&value)));
        if opts.exclusive && key != "recovery_target" {
            lines.push("recovery_target_inclusive = false".into());
        }
        lines.push(format!("recovery_target_action = {}", quote(opts.action.as_str())));
    }
    if let Some(tl) = &opts.timeline {
        lines.push(format!("recovery_target_timeline = {}", quote(tl)));
    }
    if opts.archive_mode == Some(ArchiveMode::Off) {
        lines.push("archive_mode = 'off'".into());
    }
    lines
}

/// What `settings_elsewhere` drops besides [`RECOVERY_KEYS`]: settings the
/// caller owns, which `postgresql.auto.conf` (read last) would override.
const CALLER_KEYS: &[&str] = &[
    "archive_mode",
    "archive_command",
    "archive_library",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_min_apply_delay",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
];

/// The parameter a line of a configuration file sets (`key = value` or
/// `key value`), lower-cased; empty for comments and blank lines.
fn line_key(line: &str) -> String {
    let l = line.trim_start();
    if l.starts_with('#') {
        return String::new();
    }
    l.split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or("").to_ascii_lowercase()
}

pub(super) fn write_recovery_settings(root: &Path, m: &Manifest, opts: &RestoreOptions) -> Result<()> {
    let auto = root.join("postgresql.auto.conf");
    let old = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = line_key(l);
            let key = key.as_str();
            let ours = RECOVERY_KEYS.contains(&key)
                || (opts.settings_elsewhere && CALLER_KEYS.contains(&key))
                || (key == "archive_mode" && opts.archive_mode == Some(ArchiveMode::Off))
                || (key == "primary_conninfo" && opts.primary_conninfo.is_some() && opts.standby);
            !ours && !l.starts_with("# recovery settings written by pgkeep")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if !opts.settings_elsewhere {
        for l in recovery_settings(&m.label, opts) {
            text.push_str(&l);
            text.push('\n');
        }
    }
    write_file(&auto, text.as_bytes())?;
    // With both files PostgreSQL runs as a standby: remove the other one
    // (a delta restore over a standby, or a standby made of a primary).
    let (signal, other) = match opts.standby {
        true => ("standby.signal", "recovery.signal"),
        false => ("recovery.signal", "standby.signal"),
    };
    match std::fs::remove_file(root.join(other)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot remove {}", root.join(other).display()))(e)),
    }
    write_file(&root.join(signal), b"")
}

/// Validates a `--target-timeline` value.
pub fn parse_timeline(s: &str) -> Result<String> {
    match s {
        "latest" | "current" => Ok(s.to_owned()),
        n if n.parse::<u32>().is_ok_and(|n| n > 0) => Ok(n.to_owned()),
        hex if hex.starts_with("0x") && u32::from_str_radix(&hex[2..], 16).is_ok() => Ok(hex.to_owned()),
        _ => Err(Error::Input(format!("target timeline '{s}' must be latest, current or a timeline number"))),
    }
}

/// `backup_label` (it tells PostgreSQL where recovery starts), then the
/// recovery settings, both synced.
pub(super) fn write_label_and_settings(root: &Path, m: &Manifest, opts: &RestoreOptions) -> Result<()> {
    super::files::write_file(&root.join("backup_label"), m.backup_label.as_bytes())?;
    write_recovery_settings(root, m, opts)
}

#[cfg(test)]
mod tests {
    use super::line_key;

    #[test]
    fn a_line_names_its_key_with_or_without_equals() {
        assert_eq!(line_key("archive_library = 'x'"), "archive_library");
        assert_eq!(line_key("  Archive_Command 'x'"), "archive_command");
        assert_eq!(line_key("restore_command='x'"), "restore_command");
        assert_eq!(line_key("# restore_command = 'x'"), "");
        assert_eq!(line_key(""), "");
    }
}
