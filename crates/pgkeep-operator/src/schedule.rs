//! Cron schedules and when a ScheduledBackup fires (pure).
//!
//! A schedule has six fields with seconds first (`0 0 2 * * *`, as
//! CloudNativePG's), or the classic five (`0 2 * * *`, seconds 0).
//! Weekdays are POSIX (0 or 7 is Sunday). Times are in UTC unless the
//! ScheduledBackup names an IANA time zone; then, as Vixie cron does, a
//! time skipped by a daylight-saving jump runs once at the jump's end, and
//! a time that occurs twice runs once, at its first occurrence.
//!
//! Missed ticks (the operator was down, or the schedule was suspended):
//! when it looks again, one backup is made for the latest tick missed,
//! however many were: a backup repeated for each would only queue
//! identical work behind a busy database.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `expr` (5 or 6 fields) in time zone `tz` (default UTC).
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Schedule, String> {
        let fields = expr.split_whitespace().count();
        if !(fields == 5 || fields == 6 || expr.trim_start().starts_with('@')) {
            return Err(format!(
                "schedule '{expr}' has {fields} fields: give 6 (seconds first, e.g. '0 0 2 * * *') or 5 (e.g. '0 2 * * *')"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| format!("schedule '{expr}' is not a cron expression: {e}"))?;
        let tz = match tz {
            None | Some("") => Tz::UTC,
            Some(name) => {
                Tz::from_str(name).map_err(|_| format!("time zone '{name}' is not an IANA time zone name (like Europe/Paris)"))?
            }
        };
        Ok(Schedule { cron, tz })
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok().map(|d| d.with_timezone(&Utc))
    }
}

/// What a ScheduledBackup should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make the Backup of this tick now.
    Fire {
        /// The tick.
        tick: DateTime<Utc>,
        /// Ticks missed before it and not fired (0 normally).
        missed: u64,
    },
    /// Nothing to do before `next`.
    Wait {
        /// The next tick.
        next: Option<DateTime<Utc>>,
    },
}

/// Decides, from the last tick fired (`last`, or the resource's creation
/// when none fired yet), whether a tick is due at `now`. `immediate`: the
/// resource asks for a backup at creation and none fired yet.
pub fn decide(s: &Schedule, last: Option<DateTime<Utc>>, created: DateTime<Utc>, now: DateTime<Utc>, immediate: bool) -> Decision {
    if immediate && last.is_none() {
        return Decision::Fire { tick: created, missed: 0 };
    }
    let base = last.unwrap_or(created);
    let Some(mut due) = s.next_after(base) else { return Decision::Wait { next: None } };
    if due > now {
        return Decision::Wait { next: Some(due) };
    }
    // The latest tick not after now; a schedule every second missed for a
    // year is 3e7 steps: bounded, and far from any real case.
    let mut missed = 0;
    while let Some(n) = s.next_after(due).filter(|n| *n <= now) {
        due = n;
        missed += 1;
        if missed > 50_000_000 {
            break;
        }
    }
    Decision::Fire { tick: due, missed }
}

/// The name of the Backup made for `tick`: the same tick always gives the
/// same name, so a restarted operator cannot make it twice.
pub fn backup_name(scheduled: &str, tick: DateTime<Utc>) -> String {
    let suffix = tick.format("%Y%m%d%H%M%S").to_string();
    // Object names are at most 253 characters; keep room for the suffix.
    let head: String = scheduled.chars().take(253 - suffix.len() - 1).collect();
    format!("{head}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn six_fields_have_seconds_and_five_fields_start_on_the_minute() {
        let every5 = Schedule::parse("*/5 * * * * *", None).unwrap();
        assert_eq!(every5.next_after(t(2026, 1, 1, 0, 0, 0)), Some(t(2026, 1, 1, 0, 0, 5)));
        assert_eq!(every5.next_after(t(2026, 1, 1, 0, 0, 3)), Some(t(2026, 1, 1, 0, 0, 5)));
        let nightly = Schedule::parse("0 0 2 * * *", None).unwrap();
        assert_eq!(nightly.next_after(t(2026, 1, 1, 2, 0, 0)), Some(t(2026, 1, 2, 2, 0, 0)));
        let five = Schedule::parse("30 2 * * *", None).unwrap();
        assert_eq!(five.next_after(t(2026, 1, 1, 0, 0, 0)), Some(t(2026, 1, 1, 2, 30, 0)));
        // POSIX weekdays: 0 and 7 are Sunday (2026-01-04 is one).
        for sunday in ["0 3 * * 0", "0 3 * * 7", "0 0 3 * * SUN"] {
            assert_eq!(Schedule::parse(sunday, None).unwrap().next_after(t(2026, 1, 1, 0, 0, 0)), Some(t(2026, 1, 4, 3, 0, 0)), "{sunday}");
        }
    }

    #[test]
    fn bad_schedules_and_zones_are_refused_in_one_line() {
        for bad in ["* * * *", "1 2 3 4 5 6 7", "61 * * * * *", "0 25 * * *", "every day"] {
            let e = Schedule::parse(bad, None).unwrap_err();
            assert!(e.starts_with(&format!("schedule '{bad}'")), "{e}");
            assert!(!e.contains('\n'));
        }
        assert!(Schedule::parse("0 2 * * *", Some("Mars/Olympus")).unwrap_err().contains("IANA"));
    }

    #[test]
    fn daylight_saving_jumps_run_each_local_time_once() {
        // Paris springs forward on 2026-03-29 at 02:00 (to 03:00): 02:30
        // does not exist that day and runs at 03:00 local (01:00 UTC).
        let s = Schedule::parse("0 30 2 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(s.next_after(t(2026, 3, 28, 12, 0, 0)), Some(t(2026, 3, 29, 1, 0, 0)));
        assert_eq!(s.next_after(t(2026, 3, 29, 1, 0, 0)), Some(t(2026, 3, 30, 0, 30, 0)));
        // It falls back on 2026-10-25 at 03:00 (to 02:00): 02:30 happens
        // twice and runs once, the first time (00:30 UTC), then not again
        // at 01:30 UTC.
        assert_eq!(s.next_after(t(2026, 10, 24, 12, 0, 0)), Some(t(2026, 10, 25, 0, 30, 0)));
        assert_eq!(s.next_after(t(2026, 10, 25, 0, 30, 0)), Some(t(2026, 10, 26, 1, 30, 0)));
    }

    #[test]
    fn a_due_tick_fires_and_missed_ticks_make_one_backup_for_the_latest() {
        let s = Schedule::parse("0 0 * * * *", None).unwrap(); // hourly
        let created = t(2026, 1, 1, 0, 10, 0);
        assert_eq!(decide(&s, None, created, t(2026, 1, 1, 0, 30, 0), false), Decision::Wait { next: Some(t(2026, 1, 1, 1, 0, 0)) });
        assert_eq!(decide(&s, None, created, t(2026, 1, 1, 1, 0, 2), false), Decision::Fire { tick: t(2026, 1, 1, 1, 0, 0), missed: 0 });
        // The operator was down from 01:00 to 05:20: one backup, for 05:00.
        let last = Some(t(2026, 1, 1, 1, 0, 0));
        assert_eq!(decide(&s, last, created, t(2026, 1, 1, 5, 20, 0), false), Decision::Fire { tick: t(2026, 1, 1, 5, 0, 0), missed: 3 });
        // Once fired, the next is an hour on.
        let last = Some(t(2026, 1, 1, 5, 0, 0));
        assert_eq!(decide(&s, last, created, t(2026, 1, 1, 5, 20, 0), false), Decision::Wait { next: Some(t(2026, 1, 1, 6, 0, 0)) });
    }

    #[test]
    fn immediate_fires_once_at_creation() {
        let s = Schedule::parse("0 0 0 1 1 *", None).unwrap(); // yearly
        let created = t(2026, 5, 1, 0, 0, 0);
        assert_eq!(decide(&s, None, created, created, true), Decision::Fire { tick: created, missed: 0 });
        // After that, the schedule rules.
        assert_eq!(decide(&s, Some(created), created, created, true), Decision::Wait { next: Some(t(2027, 1, 1, 0, 0, 0)) });
    }

    #[test]
    fn backup_names_are_stable_per_tick_and_valid() {
        assert_eq!(backup_name("nightly", t(2026, 1, 2, 3, 4, 5)), "nightly-20260102030405");
        let long = "x".repeat(300);
        assert_eq!(backup_name(&long, t(2026, 1, 2, 3, 4, 5)).len(), 253);
    }
}
