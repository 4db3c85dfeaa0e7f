//! Recovery targets and the choice of the backup to restore from. Pure
//! functions over the catalog of backups, unit-tested on synthetic ones.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::{Error, Result};
use crate::repo::Manifest;
use crate::types::{BackupLabel, Lsn};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Replay all archived WAL.
    End,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// Stop at a commit time.
    Time(DateTime<Utc>),
    /// Stop at a WAL position.
    Lsn(Lsn),
    /// Stop at a transaction's commit.
    Xid(u64),
    /// Stop at a restore point created with `pg_create_restore_point`.
    Name(String),
}

/// What to do at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TargetAction {
    /// Open for writes on a new timeline.
    #[default]
    Promote,
    /// Pause recovery (read-only queries allowed).
    Pause,
    /// Shut the server down.
    Shutdown,
}

impl TargetAction {
    /// The value of `recovery_target_action`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// Parses a target time: RFC 3339 (`2026-11-23T12:15:55Z`) or PostgreSQL's
/// timestamptz text (`2026-11-23 12:15:55.123456+00`). A zone is required.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z", "%Y-%m-%d %H:%M%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, fmt) {
            return Ok(d.with_timezone(&Utc));
        }
    }
    if NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").is_ok() {
        return Err(Error::Input(format!("target time '{s}' has no time zone; add one, e.g. '{t}+00'")));
    }
    Err(Error::Input(format!("'{s}' is not a time; use RFC 3339 (2026-11-23T12:15:55Z) or PostgreSQL's form (2026-11-23 12:15:55+00)")))
}

/// The time as written into `recovery_target_time`.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// Chooses the backup to restore: `set` when given (it must be able to
/// reach the target), else the newest backup that ends before the target.
/// `backups` is oldest first.
pub fn choose<'a>(backups: &'a [Manifest], target: &Target, set: Option<&BackupLabel>) -> Result<&'a Manifest> {
    let first = backups.first().ok_or_else(|| Error::Input("the repository holds no backup: run `pgkeep backup` first".into()))?;
    let reaches = |m: &Manifest| -> bool {
        match target {
            Target::End | Target::Immediate | Target::Name(_) => true,
            Target::Time(t) => m.stop_time <= *t,
            Target::Lsn(l) => m.stop_lsn <= *l,
            Target::Xid(x) => m.stop_xid <= *x,
        }
    };
    if let Some(label) = set {
        let m = backups
            .iter()
            .find(|m| &m.label == label)
            .ok_or_else(|| Error::Input(format!("backup {label} does not exist; `pgkeep info` lists the backups")))?;
        if !reaches(m) {
            return Err(Error::Input(format!("backup {label} ends after the recovery target; choose an earlier backup or a later target")));
        }
        return Ok(m);
    }
    if let Some(m) = backups.iter().rev().find(|m| reaches(m)) {
        return Ok(m);
    }
    // A transaction that was running during the first backup may still
    // commit after its end: the first backup can reach it.
    if let Target::Xid(x) = target {
        if first.start_xid <= *x {
            return Ok(first);
        }
    }
    let what = match target {
        Target::Time(t) => {
            format!("target time {} is before the end of the first backup ({})", format_time(t), format_time(&first.stop_time))
        }
        Target::Lsn(l) => format!("target LSN {l} is before the end of the first backup ({})", first.stop_lsn),
        Target::Xid(x) => format!("transaction {x} ended before the first backup (which starts at xid {})", first.start_xid),
        _ => unreachable!("every backup reaches the other targets"),
    };
    Err(Error::Input(format!("{what}; no backup can be restored to it, choose a later target")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::BackupType;

    fn backup(label: &str, stop: &str, lsn: u64, xids: (u64, u64)) -> Manifest {
        Manifest::for_test(label, BackupType::Full, None, parse_time(stop).unwrap(), lsn, xids)
    }

    fn catalog() -> Vec<Manifest> {
        vec![backup("A", "2026-11-20T10:00:00Z", 1000, (100, 110)), backup("B", "2026-11-21T10:00:00Z", 2000, (200, 210))]
    }

    #[test]
    fn picks_the_newest_backup_that_ends_before_the_target() {
        let c = catalog();
        let label = |t: Target| choose(&c, &t, None).map(|m| m.label.0.clone());
        assert_eq!(label(Target::End).unwrap(), "B");
        assert_eq!(label(Target::Immediate).unwrap(), "B");
        assert_eq!(label(Target::Time(parse_time("2026-11-20 12:00:00+00").unwrap())).unwrap(), "A");
        assert_eq!(label(Target::Time(parse_time("2026-11-22T00:00:00+02:00").unwrap())).unwrap(), "B");
        assert_eq!(label(Target::Lsn(Lsn(1999))).unwrap(), "A");
        assert_eq!(label(Target::Lsn(Lsn(2000))).unwrap(), "B");
        assert_eq!(label(Target::Xid(150)).unwrap(), "A");
        assert_eq!(label(Target::Xid(105)).unwrap(), "A", "running during A");
    }

    #[test]
    fn refuses_targets_before_the_first_backup() {
        let c = catalog();
        for t in [Target::Time(parse_time("2026-11-19T00:00:00Z").unwrap()), Target::Lsn(Lsn(10)), Target::Xid(50)] {
            let e = choose(&c, &t, None).unwrap_err().to_string();
            assert!(e.contains("before") && e.contains("first backup"), "{e}");
        }
        assert!(choose(&[], &Target::End, None).is_err());
    }

    #[test]
    fn a_named_set_must_reach_the_target() {
        let c = catalog();
        let b = BackupLabel("B".into());
        assert!(choose(&c, &Target::Lsn(Lsn(1500)), Some(&b)).is_err());
        assert_eq!(choose(&c, &Target::Immediate, Some(&b)).unwrap().label, b);
        assert!(choose(&c, &Target::End, Some(&BackupLabel("C".into()))).is_err());
    }

    #[test]
    fn parses_both_time_forms() {
        let a = parse_time("2026-11-23T12:15:55.5Z").unwrap();
        assert_eq!(a, parse_time("2026-11-23 12:15:55.5+00").unwrap());
        assert_eq!(a, parse_time("2026-11-23 14:15:55.500000+02:00").unwrap());
        assert_eq!(format_time(&a), "2026-11-23 12:15:55.500000+00");
        assert!(parse_time("2026-11-23 12:15:55").unwrap_err().to_string().contains("time zone"));
        assert!(parse_time("yesterday").is_err());
    }
}
