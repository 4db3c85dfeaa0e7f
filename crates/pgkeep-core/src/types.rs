//! Newtypes for PostgreSQL's domain values: LSNs, timelines, WAL file names,
//! system identifiers and backup labels. Parsing and formatting live here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// A WAL position (`XLogRecPtr`), written by PostgreSQL as `HI/LO` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Input(format!("'{s}' is not an LSN; write it as PostgreSQL does, e.g. 0/3000028"));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A timeline id (`TimeLineID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The history of a timeline, from its `<tli>.history` file: each
/// ancestor timeline with the LSN where the next one branched off it.
/// PostgreSQL writes one line per ancestor, oldest first:
/// `parent-tli<TAB>switch-lsn<TAB>reason` (`timeline.c`,
/// `writeTimeLineHistory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    /// The timeline this history leads to.
    pub timeline: TimelineId,
    /// Its ancestors, oldest first, each with the first LSN that is no
    /// longer on it (the switch point).
    pub ancestors: Vec<(TimelineId, Lsn)>,
}

impl TimelineHistory {
    /// The history of timeline 1, or of any timeline whose file lists no
    /// ancestor.
    pub fn root(timeline: TimelineId) -> TimelineHistory {
        TimelineHistory { timeline, ancestors: Vec::new() }
    }

    /// Parses the text of `timeline`'s history file; `None` when a line
    /// is malformed or the ancestors do not rise.
    pub fn parse(timeline: TimelineId, text: &str) -> Option<TimelineHistory> {
        let mut ancestors: Vec<(TimelineId, Lsn)> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let mut fields = line.split_whitespace();
            let tli: u32 = fields.next()?.parse().ok()?;
            let lsn: Lsn = fields.next()?.parse().ok()?;
            if ancestors.last().is_some_and(|(t, l)| t.0 >= tli || *l > lsn) || tli >= timeline.0 {
                return None;
            }
            ancestors.push((TimelineId(tli), lsn));
        }
        Some(TimelineHistory { timeline, ancestors })
    }

    /// Whether the WAL up to `lsn` on `timeline` is part of this
    /// timeline's past: the timeline itself, or an ancestor that it left
    /// at or after `lsn`.
    pub fn includes(&self, timeline: TimelineId, lsn: Lsn) -> bool {
        timeline == self.timeline || self.ancestors.iter().any(|(t, switch)| *t == timeline && lsn <= *switch)
    }

    /// Where this timeline left `timeline` (`None`: it never did, or
    /// `timeline` is this one).
    pub fn switch_point(&self, timeline: TimelineId) -> Option<Lsn> {
        self.ancestors.iter().find(|(t, _)| *t == timeline).map(|(_, l)| *l)
    }
}

/// The system identifier written by `initdb`: it tells one cluster from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemId(pub u64);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL segment: timeline plus segment number, for a given segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegment {
    /// Timeline the segment belongs to.
    pub timeline: TimelineId,
    /// Segment number: LSN / segment size.
    pub number: u64,
}

impl WalSegment {
    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: TimelineId, lsn: Lsn, seg_size: u64) -> Self {
        WalSegment { timeline, number: lsn.0 / seg_size }
    }

    /// The 24-hex-digit file name, e.g. `000000010000000000000003`.
    pub fn name(&self, seg_size: u64) -> String {
        let per_log = 0x1_0000_0000 / seg_size;
        format!("{:08X}{:08X}{:08X}", self.timeline.0, self.number / per_log, self.number % per_log)
    }

    /// Parses a 24-hex-digit segment file name.
    pub fn parse(name: &str, seg_size: u64) -> Option<Self> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_log = 0x1_0000_0000 / seg_size;
        (seg < per_log).then_some(WalSegment { timeline: TimelineId(tli), number: log * per_log + seg })
    }

    /// The first LSN after this segment.
    pub fn end_lsn(&self, seg_size: u64) -> Lsn {
        Lsn((self.number + 1) * seg_size)
    }
}

/// The kinds of file PostgreSQL hands to `archive_command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFileName {
    /// A WAL segment, 24 hex digits.
    Segment(String),
    /// A partial segment left by a promotion, `<segment>.partial`.
    Partial(String),
    /// A timeline history file, `<tli>.history`.
    History(String),
    /// A backup history file, `<segment>.<offset>.backup`.
    BackupHistory(String),
}

impl WalFileName {
    /// Classifies a file name; `None` when it is not a name PostgreSQL archives.
    pub fn parse(name: &str) -> Option<Self> {
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase());
        if hex(name, 24) {
            return Some(WalFileName::Segment(name.to_owned()));
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            return hex(seg, 24).then(|| WalFileName::Partial(name.to_owned()));
        }
        if let Some(tli) = name.strip_suffix(".history") {
            return hex(tli, 8).then(|| WalFileName::History(name.to_owned()));
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let ok = rest.len() == 33 && hex(&rest[..24], 24) && &rest[24..25] == "." && hex(&rest[25..], 8);
            return ok.then(|| WalFileName::BackupHistory(name.to_owned()));
        }
        None
    }

    /// The file name itself.
    pub fn as_str(&self) -> &str {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::History(s) | WalFileName::BackupHistory(s) => s,
        }
    }

    /// The archive directory the file is stored under: the first 16 hex
    /// digits (timeline and log id) for segment-like files, `history` for
    /// timeline history files.
    pub fn archive_dir(&self) -> &str {
        match self {
            WalFileName::History(_) => "history",
            other => &other.as_str()[..16],
        }
    }
}

/// A backup's label: `YYYYMMDD-HHMMSSF` for a full backup; a differential
/// or incremental one carries its full backup's label, then `_`, its own
/// time and `D` or `I` (`20261123-121500F_20261123-130000I`), so labels
/// sort in time order within a chain and name the chain they belong to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackupLabel(pub String);

impl BackupLabel {
    /// A label for a full backup started at `time`.
    pub fn full(time: chrono::DateTime<chrono::Utc>) -> Self {
        BackupLabel(format!("{}F", time.format("%Y%m%d-%H%M%S")))
    }

    /// A label for a differential (`D`) or incremental (`I`) backup on top
    /// of the full backup `full`.
    pub fn dependent(full: &BackupLabel, time: chrono::DateTime<chrono::Utc>, suffix: char) -> Self {
        let base = full.0.split('_').next().unwrap_or(&full.0);
        BackupLabel(format!("{base}_{}{suffix}", time.format("%Y%m%d-%H%M%S")))
    }

    /// The latest of the times the label carries (its own, or its full
    /// backup's for a full one); `None` for a label of another shape.
    pub fn latest_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.0
            .split('_')
            .filter_map(|part| {
                let stamp = part.get(..15)?;
                chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d-%H%M%S").ok().map(|t| t.and_utc())
            })
            .max()
    }

    /// Checks that `s` has the shape of a label (it is used in object keys).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(BackupLabel(s.to_owned()))
        } else {
            Err(Error::Input(format!("'{s}' is not a backup label")).with_hint(crate::Hint::run(crate::Operation::Info)))
        }
    }
}

impl fmt::Display for BackupLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(Lsn);

impl FromStr for SystemId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        s.trim().parse().map(SystemId).map_err(|_| Error::Input(format!("'{s}' is not a system identifier")))
    }
}
serde_as_string!(SystemId);

/// A time as the reports print it: RFC 3339, UTC, whole seconds.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Parses an RFC 3339 time (any offset) as UTC; `None` when it is not one.
pub fn parse_rfc3339(t: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(t).ok().map(|d| d.with_timezone(&chrono::Utc))
}

/// A size for people: `512 B`, `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 * 1024 * 1024;

    #[test]
    fn lsn_round_trips() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_names_follow_postgres() {
        let s = WalSegment::containing(TimelineId(1), "0/3000028".parse().unwrap(), SEG);
        assert_eq!(s.name(SEG), "000000010000000000000003");
        let s = WalSegment::containing(TimelineId(2), "1/FF000000".parse().unwrap(), SEG);
        assert_eq!(s.name(SEG), "0000000200000001000000FF");
        assert_eq!(WalSegment::parse("0000000200000001000000FF", SEG), Some(s));
        assert_eq!(s.end_lsn(SEG), "2/0".parse().unwrap());
        assert_eq!(WalSegment::parse("000000010000000000000100", SEG), None);
        let big = 1 << 30;
        let s = WalSegment::containing(TimelineId(1), "1/40000000".parse().unwrap(), big);
        assert_eq!(s.name(big), "000000010000000100000001");
    }

    #[test]
    fn wal_file_names_are_classified() {
        assert!(matches!(WalFileName::parse("000000010000000000000003"), Some(WalFileName::Segment(_))));
        assert!(matches!(WalFileName::parse("000000010000000000000003.partial"), Some(WalFileName::Partial(_))));
        assert!(matches!(WalFileName::parse("00000002.history"), Some(WalFileName::History(_))));
        let b = WalFileName::parse("000000010000000000000002.00000028.backup").unwrap();
        assert!(matches!(b, WalFileName::BackupHistory(_)));
        assert_eq!(b.archive_dir(), "0000000100000000");
        assert_eq!(WalFileName::parse("00000002.history").unwrap().archive_dir(), "history");
        assert_eq!(WalFileName::parse("postmaster.pid"), None);
        assert_eq!(WalFileName::parse("00000001000000000000000a"), None);
    }

    #[test]
    fn timeline_histories_say_which_wal_is_in_the_past() {
        let text = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000A0\tat restore point \"x\"\n";
        assert!(TimelineHistory::parse(TimelineId(3), text).is_none(), "switch points must not go back");
        let text = "1\t0/3000000\tno recovery target specified\n\n2\t0/50000A0\tat restore point \"x\"\n";
        let h = TimelineHistory::parse(TimelineId(3), text).unwrap();
        assert_eq!(h.ancestors, vec![(TimelineId(1), Lsn(0x300_0000)), (TimelineId(2), Lsn(0x500_00A0))]);
        assert!(h.includes(TimelineId(1), Lsn(0x300_0000)));
        assert!(!h.includes(TimelineId(1), Lsn(0x300_0001)), "WAL of timeline 1 after the switch is another history");
        assert!(h.includes(TimelineId(2), Lsn(0x400_0000)));
        assert!(h.includes(TimelineId(3), Lsn(u64::MAX)));
        assert!(!h.includes(TimelineId(4), Lsn(1)), "a later timeline is not an ancestor");
        assert_eq!(h.switch_point(TimelineId(2)), Some(Lsn(0x500_00A0)));
        assert!(TimelineHistory::parse(TimelineId(2), "2\t0/1\tx").is_none(), "a timeline is not its own ancestor");
        assert!(TimelineHistory::parse(TimelineId(2), "one\t0/1").is_none());
        assert_eq!(TimelineHistory::parse(TimelineId(1), "").unwrap(), TimelineHistory::root(TimelineId(1)));
    }

    #[test]
    fn labels_are_checked() {
        assert!(BackupLabel::parse("20261123-121500F").is_ok());
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-23T13:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let full = BackupLabel("20261123-121500F".into());
        let incr = BackupLabel::dependent(&full, t, 'I');
        assert_eq!(incr.0, "20261123-121500F_20261123-130000I");
        assert_eq!(BackupLabel::dependent(&incr, t, 'D').0, "20261123-121500F_20261123-130000D");
        assert!(BackupLabel::parse("../x").is_err());
        assert!(BackupLabel::parse("").is_err());
    }
}
