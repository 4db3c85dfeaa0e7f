//! `pgkeep`: the command line over `pgkeep-core`. It parses flags and the
//! config file, calls the engine, and prints results (text or JSON) and
//! one-line errors. Exit status: 0 on success; 1 on failure, except
//! `archive-get`, which exits 1 only when the archive does not have the
//! file and 255 on any other failure so that PostgreSQL stops recovery.

mod cli;
mod commands;
mod hint;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pgkeep_core::restrict_file_modes();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("pgkeep: {first} (see pgkeep --help)");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgkeep: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let is_archive_get = matches!(cli.command, cli::Command::ArchiveGet { .. });
    let stanza = cli.stanza.clone();
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let not_found =
                matches!(e.downcast_ref::<pgkeep_core::Error>().map(pgkeep_core::Error::kind), Some(pgkeep_core::Error::NotFound(_)));
            let msg = hint::line(&e, stanza.as_deref());
            if is_archive_get && not_found {
                // PostgreSQL asks for files that do not exist yet as a matter
                // of course; say it on one line, exit 1.
                eprintln!("pgkeep: {msg}");
                return ExitCode::from(1);
            }
            eprintln!("pgkeep: {msg}");
            ExitCode::from(if is_archive_get { 255 } else { 1 })
        }
    }
}
