//! Recovery targets and the choice of the backup to restore from. Pure
//! functions over the catalog of backups, unit-tested on synthetic ones.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::{Error, Hint, Operation, Opt, Result};
use crate::repo::Manifest;
use crate::types::{BackupLabel, Lsn, TimelineHistory, TimelineId};

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

/// A 32-bit transaction id widened to the 64-bit one (epoch and xid) of
/// its epoch nearest `reference`, as PostgreSQL reads xids within 2^31 of
/// the next one; a 64-bit id is returned as it is. Backups record 64-bit
/// ids, and `txid_current()` gives them, but `xmin`, `pg_stat_activity`
/// and the server log show 32-bit ones.
pub fn widen_xid(xid: u64, reference: u64) -> u64 {
    if xid > u64::from(u32::MAX) {
        return xid;
    }
    let diff = (xid as u32).wrapping_sub(reference as u32) as i32;
    reference.checked_add_signed(i64::from(diff)).unwrap_or(xid)
}

/// Chooses the backup to restore: `set` when given (it must be able to
/// reach the target), else the newest backup in `eligible` that ends
/// before the target. `backups` is oldest first.
pub fn choose<'a>(
    backups: &'a [Manifest],
    target: &Target,
    set: Option<&BackupLabel>,
    eligible: impl Fn(&Manifest) -> bool,
) -> Result<&'a Manifest> {
    let first =
        backups.first().ok_or_else(|| Error::Input("the repository holds no backup".into()).with_hint(Hint::run(Operation::Backup)))?;
    let newest_xid = backups.iter().map(|m| m.stop_xid).max().unwrap_or(0);
    let target_xid = |x: u64| widen_xid(x, newest_xid);
    let reaches = |m: &Manifest| -> bool {
        match target {
            Target::End | Target::Immediate | Target::Name(_) => true,
            Target::Time(t) => m.stop_time <= *t,
            Target::Lsn(l) => m.stop_lsn <= *l,
            Target::Xid(x) => m.stop_xid <= target_xid(*x),
        }
    };
    if let Some(label) = set {
        let m = backups
            .iter()
            .find(|m| &m.label == label)
            .ok_or_else(|| Error::Input(format!("backup {label} does not exist")).with_hint(Hint::run(Operation::Info)))?;
        if !reaches(m) {
            return Err(Error::Input(format!("backup {label} ends after the recovery target; choose an earlier backup or a later target")));
        }
        return Ok(m);
    }
    if let Some(m) = backups.iter().rev().find(|m| eligible(m) && reaches(m)) {
        return Ok(m);
    }
    // A transaction that was running during the first backup may still
    // commit after its end: the first backup can reach it.
    let first_eligible = backups.iter().find(|m| eligible(m));
    if let (Target::Xid(x), Some(first)) = (target, first_eligible) {
        if first.start_xid <= target_xid(*x) {
            return Ok(first);
        }
    }
    let Some(first) = first_eligible else {
        return Err(Error::Input(format!(
            "no backup is in the history of the timeline recovery follows (the newest backup, {}, is on timeline {})",
            backups.last().map_or(&first.label, |m| &m.label),
            backups.last().map_or(first.timeline, |m| m.timeline)
        ))
        .with_hint(Hint::any_of([Hint::retry(Opt::Set), Hint::retry(Opt::TargetTimeline)])));
    };
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

/// The backup to restore and the `recovery_target_timeline` to write
/// (pure). `asked` is `--target-timeline`; `path` the history of the
/// timeline recovery follows (the one asked for by number, else the
/// newest in the archive), `None` when unknown or `current` was asked.
///
/// Without `--set`, only backups in `path` are candidates. The timeline
/// written is the one asked for; else `current` (the backup's own) for
/// `--target-immediate`, whose target is on that timeline, and for a
/// backup outside `path` (its timeline was abandoned: an in-place restore
/// to an earlier point, say), which PostgreSQL's default `latest` would
/// refuse to start from; else none (PostgreSQL follows the newest).
pub fn choose_with_timeline<'a>(
    backups: &'a [Manifest],
    target: &Target,
    set: Option<&BackupLabel>,
    asked: Option<&str>,
    path: Option<&TimelineHistory>,
) -> Result<(&'a Manifest, Option<String>)> {
    let on_path = |m: &Manifest| path.is_none_or(|h| h.includes(m.timeline, m.stop_lsn));
    let m = choose(backups, target, set, on_path)?;
    let timeline = match asked {
        Some(t) if !on_path(m) => {
            let h = path.map_or(TimelineId(0), |h| h.timeline);
            return Err(Error::Input(format!(
                "backup {} (timeline {}, ending at {}) is not in the history of timeline {h}, so recovery cannot follow target timeline {t} from it; restore another backup, or leave the target timeline out to stay on the backup's timeline",
                m.label, m.timeline, m.stop_lsn
            )));
        }
        Some(t) => Some(t.to_owned()),
        None if matches!(target, Target::Immediate) || !on_path(m) => Some("current".to_owned()),
        None => None,
    };
    Ok((m, timeline))
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
        let label = |t: Target| choose(&c, &t, None, |_| true).map(|m| m.label.0.clone());
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
            let e = choose(&c, &t, None, |_| true).unwrap_err().to_string();
            assert!(e.contains("before") && e.contains("first backup"), "{e}");
        }
        assert!(choose(&[], &Target::End, None, |_| true).is_err());
    }

    #[test]
    fn a_named_set_must_reach_the_target() {
        let c = catalog();
        let b = BackupLabel("B".into());
        assert!(choose(&c, &Target::Lsn(Lsn(1500)), Some(&b), |_| true).is_err());
        assert_eq!(choose(&c, &Target::Immediate, Some(&b), |_| true).unwrap().label, b);
        assert!(choose(&c, &Target::End, Some(&BackupLabel("C".into())), |_| true).is_err());
    }

    #[test]
    fn a_32_bit_xid_is_read_in_the_epoch_nearest_the_backups() {
        let epoch = |e: u64, x: u64| (e << 32) | x;
        assert_eq!(widen_xid(150, epoch(1, 100)), epoch(1, 150));
        assert_eq!(widen_xid(4_294_967_000, epoch(2, 100)), epoch(1, 4_294_967_000), "just before the wrap");
        assert_eq!(widen_xid(50, epoch(1, 4_294_967_000)), epoch(2, 50), "just after the wrap");
        assert_eq!(widen_xid(epoch(3, 7), epoch(1, 1)), epoch(3, 7), "a 64-bit id stays");
        assert_eq!(widen_xid(7, 100), 7);
        // Backups after the first epoch: a 32-bit target still finds one.
        let c = vec![backup("A", "2026-11-20T10:00:00Z", 1000, (epoch(1, 100), epoch(1, 110)))];
        assert_eq!(choose(&c, &Target::Xid(150), None, |_| true).unwrap().label.0, "A");
        assert!(choose(&c, &Target::Xid(50), None, |_| true).is_err(), "ended before the backup");
    }

    #[test]
    fn an_abandoned_timeline_is_restored_on_its_own_timeline() {
        // A on timeline 1; an in-place restore to A's end made timeline 2
        // at 0/1000 (so B, on timeline 1 up to 0/2000, was abandoned); C
        // on timeline 2.
        let mut c = vec![
            backup("A", "2026-11-20T10:00:00Z", 0x1000, (100, 110)),
            backup("B", "2026-11-21T10:00:00Z", 0x2000, (200, 210)),
            backup("C", "2026-11-22T10:00:00Z", 0x3000, (300, 310)),
        ];
        c[2].timeline = TimelineId(2);
        let latest = TimelineHistory::parse(TimelineId(2), "1\t0/1000\tx").unwrap();
        let pick = |t: Target, set: Option<&str>, asked: Option<&str>| {
            let set = set.map(|s| BackupLabel(s.into()));
            choose_with_timeline(&c, &t, set.as_ref(), asked, Some(&latest)).map(|(m, tl)| (m.label.0.clone(), tl))
        };
        assert_eq!(pick(Target::End, None, None).unwrap(), ("C".into(), None));
        assert_eq!(pick(Target::Immediate, None, None).unwrap(), ("C".into(), Some("current".into())));
        let before_c = Target::Time(parse_time("2026-11-21T12:00:00Z").unwrap());
        assert_eq!(pick(before_c.clone(), None, None).unwrap(), ("A".into(), None), "B is not in timeline 2's past");
        assert_eq!(pick(Target::End, Some("B"), None).unwrap(), ("B".into(), Some("current".into())));
        assert_eq!(pick(Target::Immediate, Some("B"), None).unwrap(), ("B".into(), Some("current".into())));
        assert_eq!(pick(Target::End, Some("A"), None).unwrap(), ("A".into(), None));
        let e = pick(Target::End, Some("B"), Some("latest")).unwrap_err().to_string();
        assert!(e.contains("not in the history of timeline 2"), "{e}");
        assert_eq!(pick(Target::End, Some("A"), Some("1")).unwrap(), ("A".into(), Some("1".into())));
        let only_b = &c[1..2];
        let e = choose_with_timeline(only_b, &Target::End, None, None, Some(&latest)).unwrap_err().to_string();
        assert!(e.contains("no backup is in the history"), "{e}");
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
