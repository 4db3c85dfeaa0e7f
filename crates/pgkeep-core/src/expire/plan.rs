//! Which backups retention expires: pure functions over a catalog, so every
//! rule is unit-tested on synthetic chains.
//!
//! The rules, in order:
//! 1. Chains. A full backup is kept when it is one of the newest
//!    `retention-full`, or when the recovery window needs it (below). A full
//!    that is not kept expires with every backup built on it. With neither
//!    rule configured every full is kept.
//! 2. Differentials. With `retention-diff`, a diff that is not one of the
//!    newest that many diffs expires with the incrs built on it, unless the
//!    window needs it.
//! 3. Dependents. A backup whose prior expires expires too: a kept backup
//!    always has its whole chain.
//!
//! The recovery window (`retention-window`) needs every backup that stopped
//! inside it, the newest backup that stopped before it began (the one a
//! recovery to the window's first second starts from), and their chains.
//!
//! WAL: a segment is needed by a kept backup when it is at or after that
//! backup's start. Segments before the oldest kept backup's start (on any
//! timeline) are removed; timeline history files are always kept.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::config::Retention;
use crate::error::{Error, Result};
use crate::repo::{BackupType, Manifest};
use crate::types::BackupLabel;

/// The decision for a catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpirePlan {
    /// Backups to remove, dependents before the backups they build on.
    pub expire: Vec<BackupLabel>,
    /// Backups kept, oldest first.
    pub keep: Vec<BackupLabel>,
}

/// Applies `policy` to `backups` (oldest first) at `now`.
pub fn by_policy(backups: &[Manifest], policy: &Retention, now: DateTime<Utc>) -> ExpirePlan {
    let by_label: HashMap<&BackupLabel, &Manifest> = backups.iter().map(|m| (&m.label, m)).collect();
    let mut needed_by_window: HashSet<&BackupLabel> = HashSet::new();
    if let Some(window) = policy.window {
        let cutoff = now - window;
        let inside = backups.iter().filter(|m| m.stop_time > cutoff);
        let before = backups.iter().filter(|m| m.stop_time <= cutoff).max_by_key(|m| m.stop_time);
        for m in inside.chain(before) {
            needed_by_window.extend(chain(m, &by_label));
        }
    }
    let fulls: Vec<&Manifest> = backups.iter().filter(|m| m.kind == BackupType::Full).collect();
    let kept_fulls: HashSet<&BackupLabel> = match (policy.full, policy.window) {
        (None, None) => fulls.iter().map(|m| &m.label).collect(),
        (count, _) => {
            let newest = count.map_or(0, |n| fulls.len().saturating_sub(n as usize));
            let keep = |i: usize, m: &Manifest| (count.is_some() && i >= newest) || needed_by_window.contains(&m.label);
            fulls.iter().enumerate().filter(|(i, m)| keep(*i, m)).map(|(_, m)| &m.label).collect()
        }
    };
    let diffs: Vec<&Manifest> = backups.iter().filter(|m| m.kind == BackupType::Diff).collect();
    let dropped_diffs: HashSet<&BackupLabel> = match policy.diff {
        None => HashSet::new(),
        Some(n) => {
            let newest = diffs.len().saturating_sub(n as usize);
            diffs[..newest].iter().map(|m| &m.label).filter(|l| !needed_by_window.contains(l)).collect()
        }
    };
    // Oldest first, so a prior is decided before its dependents.
    let mut kept: HashSet<&BackupLabel> = HashSet::new();
    for m in backups {
        let keep = match (m.kind, &m.prior) {
            (BackupType::Full, _) => kept_fulls.contains(&m.label),
            (_, Some(prior)) => kept.contains(prior) && !dropped_diffs.contains(&m.label),
            // A dependent without a prior is malformed; keep it for a person to look at.
            (_, None) => true,
        };
        if keep {
            kept.insert(&m.label);
        }
    }
    ExpirePlan {
        expire: backups.iter().rev().filter(|m| !kept.contains(&m.label)).map(|m| m.label.clone()).collect(),
        keep: backups.iter().filter(|m| kept.contains(&m.label)).map(|m| m.label.clone()).collect(),
    }
}

/// Removing one backup: `label` and, with `with_dependents`, every backup
/// built on it; without, refused when there are any.
pub fn by_label(backups: &[Manifest], label: &BackupLabel, with_dependents: bool) -> Result<ExpirePlan> {
    if !backups.iter().any(|m| &m.label == label) {
        let known: Vec<&str> = backups.iter().map(|m| m.label.0.as_str()).collect();
        return Err(Error::NotFound(format!(
            "backup {label} does not exist; the backups are: {}",
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        )));
    }
    let mut gone: HashSet<&BackupLabel> = HashSet::from([label]);
    for m in backups {
        if m.prior.as_ref().is_some_and(|p| gone.contains(p)) {
            gone.insert(&m.label);
        }
    }
    if gone.len() > 1 && !with_dependents {
        let deps: Vec<&str> = backups.iter().filter(|m| gone.contains(&m.label) && &m.label != label).map(|m| m.label.0.as_str()).collect();
        return Err(Error::Refused(format!(
            "backup {label} has {} backup(s) built on it ({}), which could not be restored without it; remove them too",
            deps.len(),
            deps.join(", ")
        ))
        .with_hint(crate::Hint::retry(crate::Opt::WithDependents)));
    }
    Ok(ExpirePlan {
        expire: backups.iter().rev().filter(|m| gone.contains(&m.label)).map(|m| m.label.clone()).collect(),
        keep: backups.iter().filter(|m| !gone.contains(&m.label)).map(|m| m.label.clone()).collect(),
    })
}

/// `m` and every backup it builds on.
fn chain<'a>(m: &'a Manifest, by_label: &HashMap<&BackupLabel, &'a Manifest>) -> Vec<&'a BackupLabel> {
    let mut out = vec![&m.label];
    let mut at = m;
    while let Some(prior) = at.prior.as_ref().and_then(|p| by_label.get(p)) {
        out.push(&prior.label);
        at = prior;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_window;
    use chrono::Duration;

    /// A catalog from a compact description: one entry per backup,
    /// `(label, type, prior, stop day)`.
    fn catalog(spec: &[(&str, BackupType, Option<&str>, i64)]) -> Vec<Manifest> {
        let day0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        spec.iter()
            .enumerate()
            .map(|(i, (l, k, p, day))| Manifest::for_test(l, *k, *p, day0 + Duration::days(*day), 1000 + i as u64 * 100, (1, 2)))
            .collect()
    }

    fn labels(v: &[BackupLabel]) -> Vec<&str> {
        v.iter().map(|l| l.0.as_str()).collect()
    }

    use BackupType::{Diff as D, Full as F, Incr as I};

    fn week() -> Vec<Manifest> {
        catalog(&[
            ("F1", F, None, 0),
            ("F1i1", I, Some("F1"), 1),
            ("F1d1", D, Some("F1"), 2),
            ("F1i2", I, Some("F1d1"), 3),
            ("F2", F, None, 4),
            ("F2d1", D, Some("F2"), 5),
            ("F2i1", I, Some("F2d1"), 6),
            ("F2d2", D, Some("F2"), 7),
            ("F3", F, None, 8),
            ("F3i1", I, Some("F3"), 9),
        ])
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap() + Duration::days(10)
    }

    #[test]
    fn count_of_fulls_keeps_whole_chains_and_expires_dependents_first() {
        let p = by_policy(&week(), &Retention { full: Some(2), ..Default::default() }, now());
        assert_eq!(labels(&p.expire), ["F1i2", "F1d1", "F1i1", "F1"]);
        assert_eq!(labels(&p.keep), ["F2", "F2d1", "F2i1", "F2d2", "F3", "F3i1"]);
        let p = by_policy(&week(), &Retention { full: Some(1), ..Default::default() }, now());
        assert_eq!(labels(&p.keep), ["F3", "F3i1"]);
        let p = by_policy(&week(), &Retention { full: Some(5), ..Default::default() }, now());
        assert!(p.expire.is_empty());
    }

    #[test]
    fn count_of_diffs_expires_old_diffs_with_their_incrs() {
        let p = by_policy(&week(), &Retention { full: Some(3), diff: Some(1), window: None }, now());
        // F1d1 and F2d1 are older than the newest diff (F2d2): they and their incrs go.
        assert_eq!(labels(&p.expire), ["F2i1", "F2d1", "F1i2", "F1d1"]);
        assert_eq!(labels(&p.keep), ["F1", "F1i1", "F2", "F2d2", "F3", "F3i1"]);
    }

    #[test]
    fn the_window_keeps_the_backup_a_recovery_to_its_first_second_starts_from() {
        // Window of 4.5 days from day 10: starts at day 5.5. F2d1 (day 5) is
        // the newest backup that stopped before; it needs F2.
        let w = Retention { window: Some(Duration::hours(108)), ..Default::default() };
        let p = by_policy(&week(), &w, now());
        assert_eq!(labels(&p.keep), ["F2", "F2d1", "F2i1", "F2d2", "F3", "F3i1"]);
        // Starting at day 3.5: F1i2 (day 3) is the start point, and with
        // it F1d1 and F1; F1i1, built on the kept F1, stays with its chain.
        let w = Retention { window: Some(Duration::hours(156)), ..Default::default() };
        assert!(by_policy(&week(), &w, now()).expire.is_empty());
        // A window longer than the catalog keeps everything.
        let p = by_policy(&week(), &Retention { window: Some(Duration::days(100)), ..Default::default() }, now());
        assert!(p.expire.is_empty());
    }

    #[test]
    fn count_and_window_together_keep_what_either_needs() {
        let both = Retention { full: Some(1), diff: None, window: Some(Duration::hours(108)) };
        let p = by_policy(&week(), &both, now());
        assert_eq!(labels(&p.keep), ["F2", "F2d1", "F2i1", "F2d2", "F3", "F3i1"]);
        // retention-diff never drops a diff the window needs.
        let with_diff = Retention { diff: Some(1), ..both };
        let p = by_policy(&week(), &with_diff, now());
        assert_eq!(labels(&p.keep), ["F2", "F2d1", "F2i1", "F2d2", "F3", "F3i1"]);
    }

    #[test]
    fn no_policy_expires_nothing() {
        assert!(by_policy(&week(), &Retention::default(), now()).expire.is_empty());
        assert!(by_policy(&[], &Retention { full: Some(1), ..Default::default() }, now()).expire.is_empty());
    }

    #[test]
    fn removing_one_backup_refuses_while_others_depend_on_it() {
        let e = by_label(&week(), &BackupLabel("F2d1".into()), false).unwrap_err();
        assert!(e.to_string().contains("F2i1") && e.hint() == Some(&crate::Hint::retry(crate::Opt::WithDependents)), "{e}");
        let p = by_label(&week(), &BackupLabel("F2".into()), true).unwrap();
        assert_eq!(labels(&p.expire), ["F2d2", "F2i1", "F2d1", "F2"]);
        let p = by_label(&week(), &BackupLabel("F3i1".into()), false).unwrap();
        assert_eq!(labels(&p.expire), ["F3i1"]);
        assert!(matches!(by_label(&week(), &BackupLabel("nope".into()), true), Err(Error::NotFound(_))));
    }

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("30d").unwrap(), Duration::days(30));
        assert_eq!(parse_window("12h").unwrap(), Duration::hours(12));
        assert_eq!(parse_window("2w").unwrap(), Duration::weeks(2));
        assert_eq!(parse_window("90m").unwrap(), Duration::minutes(90));
        for bad in ["", "d", "30", "30x", "-1d", "0d", "1.5d"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
