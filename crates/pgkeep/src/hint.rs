//! How the command line words the engine's hints (`pgkeep_core::Hint`):
//! as its own commands and flags. The engine's messages say what is wrong;
//! what to do, when it is an operation or an option, comes as data and is
//! worded here (the operator words the same data as its resources'
//! fields).

use pgkeep_core::{Error, Hint, Operation, Opt};

/// The one line printed for `e`: its message, then its hint, worded for
/// the command line. `stanza` is the stanza named on the command line.
pub fn line(e: &anyhow::Error, stanza: Option<&str>) -> String {
    let msg = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
    match e.downcast_ref::<Error>().and_then(Error::hint) {
        Some(hint) => format!("{msg}; {}", words(hint, stanza)),
        None => msg,
    }
}

/// [`line`] for an engine error on its own.
pub fn core_line(e: &Error, stanza: Option<&str>) -> String {
    let msg = pgkeep_core::error::OneLine(e).to_string();
    match e.hint() {
        Some(hint) => format!("{msg}; {}", words(hint, stanza)),
        None => msg,
    }
}

/// Failures in several repositories as one line: `repo 2: ...; repo 3:
/// ...`, each with its hint.
pub fn per_repo(failed: &[(usize, Error)], stanza: &pgkeep_core::Stanza) -> String {
    failed.iter().map(|(n, e)| format!("repo {n}: {}", core_line(e, Some(stanza.name())))).collect::<Vec<_>>().join("; ")
}

/// `hint` as the command line's commands and flags.
pub fn words(hint: &Hint, stanza: Option<&str>) -> String {
    let pgkeep = match stanza {
        Some(s) => format!("pgkeep --stanza {s}"),
        None => "pgkeep".to_owned(),
    };
    match hint {
        Hint::Run { operation } => {
            let (verb, command, after) = match operation {
                Operation::StanzaCreate => ("run", "stanza-create", " first"),
                Operation::StanzaUpgrade => ("run", "stanza-upgrade", ""),
                Operation::Backup => ("run", "backup", " first"),
                Operation::Info => ("see", "info", ""),
                Operation::Verify => ("see", "verify", ""),
            };
            format!("{verb} `{pgkeep} {command}`{after}")
        }
        Hint::Retry { option } => match option {
            Opt::Force => "pass --force".into(),
            Opt::ForceInsteadOfDelta => "pass --force instead of --delta".into(),
            Opt::ForceTablespaces => "pass --force-tablespaces to replace it too".into(),
            Opt::TablespaceMap => "pass --tablespace-map OID=DIR to restore it elsewhere".into(),
            Opt::WithDependents => "pass --with-dependents".into(),
            Opt::Set => "pass --set LABEL".into(),
            Opt::TargetTimeline => "check --target-timeline".into(),
            Opt::PgData => "pass --pg-data DIR".into(),
            Opt::Config => "pass --config FILE or set PGKEEP_CONFIG".into(),
            Opt::Stanza => "check --stanza (or PGKEEP_STANZA)".into(),
            Opt::Location => "pass --location".into(),
            Opt::Repo => "check --repo".into(),
        },
        Hint::AnyOf { hints } => hints.iter().map(|h| words(h, stanza)).collect::<Vec<_>>().join(", or "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_is_worded_as_this_programs_commands_and_flags() {
        let e = Error::Input("stanza 'x' does not exist in repo 1 (/r)".into()).with_hint(Hint::run(Operation::StanzaCreate));
        assert_eq!(core_line(&e, Some("x")), "stanza 'x' does not exist in repo 1 (/r); run `pgkeep --stanza x stanza-create` first");
        let e = anyhow::Error::from(
            Error::Refused("busy".into()).with_hint(Hint::any_of([Hint::run(Operation::StanzaUpgrade), Hint::retry(Opt::Stanza)])),
        );
        assert_eq!(line(&e, None), "busy; run `pgkeep stanza-upgrade`, or check --stanza (or PGKEEP_STANZA)");
        assert_eq!(line(&anyhow::Error::from(Error::Input("plain".into())), None), "plain");
    }
}
