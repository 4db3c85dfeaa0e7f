//! Which pod a backup runs on (pure).
//!
//! `prefer-standby`: among the pods whose agent answers, of the stanza's
//! system, the streaming standby that replayed the most WAL; when no
//! standby streams, the primary. `primary`: the primary. A standby that
//! does not stream (its primary is gone, or it restores from the archive)
//! may be far behind and is never chosen: its backup would end wherever
//! replay stands. The engine checks again, on the standby itself, that
//! its lag is within `standby-max-lag` at start and end.

use pgkeep_agent::api::{AgentStatus, Role};
use pgkeep_core::types::Lsn;

use crate::crd::BackupTarget;

/// A pod whose agent answered.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Pod name.
    pub pod: String,
    /// Pod IP.
    pub ip: String,
    /// What its agent said.
    pub status: AgentStatus,
}

/// The choice: the pod that runs the backup, and the primary (which a
/// standby's backup must reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Index into the candidates of the pod that runs the backup.
    pub run_on: usize,
    /// Index of the primary.
    pub primary: usize,
    /// Why a standby was passed over for the primary, for the Backup's
    /// events (`prefer-standby` only).
    pub passed_over: Option<String>,
}

/// Chooses where a backup runs, or says why it cannot run.
pub fn choose(candidates: &[Candidate], target: BackupTarget) -> Result<Choice, String> {
    let primaries: Vec<usize> = candidates.iter().enumerate().filter(|(_, c)| c.status.role == Role::Primary).map(|(i, _)| i).collect();
    let primary = match primaries.as_slice() {
        [] if candidates.is_empty() => return Err("no pod of the stanza has an agent that answers".into()),
        [] => return Err("no pod of the stanza runs a primary (every server answering is in recovery)".into()),
        [one] => *one,
        many => {
            let names: Vec<&str> = many.iter().map(|&i| candidates[i].pod.as_str()).collect();
            return Err(format!(
                "more than one pod runs a primary ({}): the selector spans two clusters, or a failover is under way",
                names.join(", ")
            ));
        }
    };
    let system = &candidates[primary].status.system_id;
    if let Some(other) = candidates.iter().find(|c| &c.status.system_id != system) {
        return Err(format!(
            "pod {} runs system {} but the primary {} runs {}: the selector spans two clusters",
            other.pod, other.status.system_id, candidates[primary].pod, system
        ));
    }
    if target == BackupTarget::Primary {
        return Ok(Choice { run_on: primary, primary, passed_over: None });
    }
    let lsn = |c: &Candidate| c.status.lsn.parse::<Lsn>().unwrap_or(Lsn(0));
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.status.role == Role::Standby && c.status.streaming)
        // The highest replay; on a tie, the first pod by name, so that the
        // choice is the same on every attempt.
        .max_by(|(_, a), (_, b)| lsn(a).cmp(&lsn(b)).then_with(|| b.pod.cmp(&a.pod)));
    match best {
        Some((i, _)) => Ok(Choice { run_on: i, primary, passed_over: None }),
        None => {
            let standbys = candidates.iter().filter(|c| c.status.role == Role::Standby).count();
            let why = match standbys {
                0 => "no standby answers".to_owned(),
                n => format!("none of the {n} standbys streams from the primary"),
            };
            Ok(Choice { run_on: primary, primary, passed_over: Some(why) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_agent::api::ArchiverStats;

    fn pod(name: &str, role: Role, lsn: &str, streaming: bool, system: &str) -> Candidate {
        Candidate {
            pod: name.into(),
            ip: "127.0.0.1".into(),
            status: AgentStatus {
                stanza: "s".into(),
                role,
                system_id: system.into(),
                pg_version: 150000,
                lsn: lsn.into(),
                streaming,
                archive: ArchiverStats::default(),
                running: None,
            },
        }
    }

    #[test]
    fn prefer_standby_takes_the_streaming_standby_that_replayed_most() {
        let c = vec![
            pod("pg-0", Role::Primary, "0/9000000", false, "7"),
            pod("pg-1", Role::Standby, "0/8000000", true, "7"),
            pod("pg-2", Role::Standby, "0/8800000", true, "7"),
            // Furthest of all, but not streaming: never chosen.
            pod("pg-3", Role::Standby, "0/9000000", false, "7"),
        ];
        let got = choose(&c, BackupTarget::PreferStandby).unwrap();
        assert_eq!((c[got.run_on].pod.as_str(), c[got.primary].pod.as_str()), ("pg-2", "pg-0"));
        assert_eq!(got.passed_over, None);
        // LSNs compare as numbers, not as text.
        let c = vec![
            pod("pg-0", Role::Primary, "10/0", false, "7"),
            pod("pg-1", Role::Standby, "9/FFFFFFFF", true, "7"),
            pod("pg-2", Role::Standby, "A/0", true, "7"),
        ];
        assert_eq!(c[choose(&c, BackupTarget::PreferStandby).unwrap().run_on].pod, "pg-2");
    }

    #[test]
    fn equal_standbys_give_the_same_choice_every_time() {
        let c = vec![
            pod("pg-2", Role::Standby, "0/5000000", true, "7"),
            pod("pg-0", Role::Primary, "0/5000000", false, "7"),
            pod("pg-1", Role::Standby, "0/5000000", true, "7"),
        ];
        assert_eq!(c[choose(&c, BackupTarget::PreferStandby).unwrap().run_on].pod, "pg-1");
    }

    #[test]
    fn without_a_streaming_standby_prefer_standby_falls_back_to_the_primary_and_says_why() {
        let c = vec![pod("pg-0", Role::Primary, "0/9000000", false, "7"), pod("pg-1", Role::Standby, "0/9000000", false, "7")];
        let got = choose(&c, BackupTarget::PreferStandby).unwrap();
        assert_eq!(c[got.run_on].pod, "pg-0");
        assert_eq!(got.passed_over.as_deref(), Some("none of the 1 standbys streams from the primary"));
        let c = vec![pod("pg-0", Role::Primary, "0/9000000", false, "7")];
        assert_eq!(choose(&c, BackupTarget::PreferStandby).unwrap().passed_over.as_deref(), Some("no standby answers"));
    }

    #[test]
    fn target_primary_ignores_standbys() {
        let c = vec![pod("pg-1", Role::Standby, "0/9000000", true, "7"), pod("pg-0", Role::Primary, "0/9000000", false, "7")];
        let got = choose(&c, BackupTarget::Primary).unwrap();
        assert_eq!((got.run_on, got.primary), (1, 1));
    }

    #[test]
    fn no_primary_two_primaries_or_two_systems_are_refused() {
        assert!(choose(&[], BackupTarget::Primary).unwrap_err().contains("no pod"));
        let standbys = vec![pod("pg-1", Role::Standby, "0/1", true, "7")];
        assert!(choose(&standbys, BackupTarget::PreferStandby).unwrap_err().contains("no pod of the stanza runs a primary"));
        let two = vec![pod("a", Role::Primary, "0/1", false, "7"), pod("b", Role::Primary, "0/1", false, "7")];
        assert!(choose(&two, BackupTarget::PreferStandby).unwrap_err().contains("more than one pod runs a primary (a, b)"));
        let mixed = vec![pod("a", Role::Primary, "0/1", false, "7"), pod("b", Role::Standby, "0/1", true, "8")];
        assert!(choose(&mixed, BackupTarget::PreferStandby).unwrap_err().contains("runs system 8"));
    }
}
