//! Talking to PostgreSQL: one connection, the queries the engine needs, and
//! the WAL page header check that tells one cluster's WAL from another's.

pub mod checksum;
pub mod version;

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::{PgAddress, StanzaOptions};
use crate::error::{Error, Result};
use crate::types::{Lsn, SystemId, TimelineId};

/// The control file, relative to the data directory: a backup copies it
/// last, a restore writes it last.
pub const CONTROL_FILE: &str = "global/pg_control";

/// A connection to the stanza's server.
pub struct Pg {
    client: Client,
    /// `host:port` for messages.
    pub describe: String,
}

/// What `pg_backup_start` returned.
#[derive(Debug, Clone)]
pub struct BackupStart {
    /// Redo LSN of the backup checkpoint.
    pub lsn: Lsn,
    /// Timeline at start.
    pub timeline: TimelineId,
    /// Next xid (snapshot xmin) at start.
    pub xid: u64,
}

/// What `pg_backup_stop` returned.
#[derive(Debug, Clone)]
pub struct BackupStop {
    /// End LSN of the backup.
    pub lsn: Lsn,
    /// Content for `backup_label`.
    pub label_file: String,
    /// Content for `tablespace_map`, if there are tablespaces.
    pub tablespace_map: Option<String>,
    /// Next xid (snapshot xmax) after stop.
    pub xid: u64,
}

/// What a standby reports (see [`Pg::standby_state`]).
#[derive(Debug, Clone)]
pub struct StandbyState {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `pg_last_wal_replay_lsn()`; `None` on a primary.
    pub replay: Option<Lsn>,
    /// `pg_stat_wal_receiver.status` (`streaming`, `starting`, ...);
    /// `None` when no WAL receiver runs.
    pub receiver: Option<String>,
    /// The timeline the WAL receiver receives, else that of the minimum
    /// recovery point.
    pub timeline: Option<TimelineId>,
}

impl Pg {
    /// Connects to the stanza's primary (`pg-*`).
    pub async fn connect(opts: &StanzaOptions) -> Result<Pg> {
        Pg::connect_to(&opts.primary(), "pg-host/pg-port/pg-user").await
    }

    /// Connects to `addr`; the error says which server and which `keys`
    /// to check. A server that is down, unreachable or still starting is a
    /// [`Error::Postgres`] (worth trying again); one that refuses the
    /// login is an [`Error::Input`].
    pub async fn connect_to(addr: &PgAddress, keys: &str) -> Result<Pg> {
        let describe = addr.describe();
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&addr.host)
            .port(addr.port)
            .user(&addr.user)
            .dbname(&addr.database)
            .application_name("pgkeep")
            .connect_timeout(Duration::from_secs(10));
        // As libpq: a password, when the server asks for one, comes from
        // PGPASSWORD (in a pod, from the Stanza's credentials Secret).
        if let Some(password) = std::env::var_os("PGPASSWORD") {
            cfg.password(password.as_encoded_bytes());
        }
        let (client, conn) = cfg.connect(NoTls).await.map_err(|e| {
            let what = format!("cannot connect to PostgreSQL at {describe} as user {}", addr.user);
            match login_refused(&e) {
                true => Error::Input(format!("{what}: {}; check {keys}", crate::error::one_line(&e))),
                false => Error::postgres(format!("{what} (check that the server runs and {keys})"))(e),
            }
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Pg { client, describe })
    }

    fn err(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        Error::postgres(format!("PostgreSQL at {} failed to {what}", self.describe))
    }

    async fn one_text(&self, sql: &str, what: &str) -> Result<String> {
        let row = self.client.query_one(sql, &[]).await.map_err(self.err(what))?;
        Ok(row.get::<_, String>(0))
    }

    /// The cluster's system identifier.
    pub async fn system_id(&self) -> Result<SystemId> {
        self.one_text("SELECT system_identifier::text FROM pg_control_system()", "report its system identifier").await?.parse()
    }

    /// `server_version_num`, refused when pgkeep does not support its
    /// major ([`version::SUPPORTED`]).
    pub async fn version_num(&self) -> Result<u32> {
        let v = self.one_text("SELECT current_setting('server_version_num')", "report its version").await?;
        let num = v.parse().map_err(|_| Error::Input(format!("unexpected server_version_num '{v}'")))?;
        version::of_version(num)?;
        Ok(num)
    }

    /// WAL segment size in bytes.
    pub async fn wal_segment_size(&self) -> Result<u64> {
        let v = self.one_text("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'", "report wal_segment_size").await?;
        v.parse().map_err(|_| Error::Input(format!("unexpected wal_segment_size '{v}'")))
    }

    /// A setting's current value.
    pub async fn setting(&self, name: &str) -> Result<String> {
        let row = self.client.query_one("SELECT current_setting($1)", &[&name]).await.map_err(self.err("report settings"))?;
        Ok(row.get(0))
    }

    /// Whether the cluster has data checksums on (`initdb -k` or
    /// `pg_checksums --enable`): `current_setting('data_checksums')`.
    pub async fn data_checksums(&self) -> Result<bool> {
        let v = self.setting("data_checksums").await?;
        match v.as_str() {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(Error::Input(format!("unexpected data_checksums '{v}' from the server at {}", self.describe))),
        }
    }

    /// The server's data directory.
    pub async fn data_directory(&self) -> Result<String> {
        self.setting("data_directory").await
    }

    /// Whether the server is a standby.
    pub async fn in_recovery(&self) -> Result<bool> {
        let row = self.client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(self.err("report recovery state"))?;
        Ok(row.get(0))
    }

    /// Tablespaces other than the built-in ones: (oid, name, location).
    pub async fn tablespaces(&self) -> Result<Vec<(u32, String, String)>> {
        let rows = self
            .client
            .query(
                "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace WHERE pg_tablespace_location(oid) <> '' ORDER BY oid",
                &[],
            )
            .await
            .map_err(self.err("list tablespaces"))?;
        Ok(rows.iter().map(|r| (r.get::<_, i64>(0) as u32, r.get(1), r.get(2))).collect())
    }

    /// Starts a non-exclusive backup on this connection (fast checkpoint).
    pub async fn backup_start(&self, label: &str) -> Result<BackupStart> {
        let row = self
            .client
            .query_one(
                "SELECT lsn::text, (SELECT timeline_id::int8 FROM pg_control_checkpoint()), pg_snapshot_xmin(pg_current_snapshot())::text::int8 \
                 FROM pg_backup_start($1, true) AS lsn",
                &[&label],
            )
            .await
            .map_err(self.err("start the backup (pg_backup_start)"))?;
        Ok(BackupStart {
            lsn: row.get::<_, String>(0).parse()?,
            timeline: TimelineId(row.get::<_, i64>(1) as u32),
            xid: row.get::<_, i64>(2) as u64,
        })
    }

    /// Stops the backup. PostgreSQL switches to a new WAL segment but does
    /// not wait for the archiver here: the caller waits for the segments in
    /// the repository itself, with a timeout and a clear error, instead of
    /// hanging when archiving is broken.
    pub async fn backup_stop(&self) -> Result<BackupStop> {
        let row = self
            .client
            .query_one("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)", &[])
            .await
            .map_err(self.err("stop the backup (pg_backup_stop)"))?;
        let map: Option<String> = row.get(2);
        let xid = self
            .client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[])
            .await
            .map_err(self.err("report the next transaction id"))?;
        Ok(BackupStop {
            lsn: row.get::<_, String>(0).parse()?,
            label_file: row.get(1),
            tablespace_map: map.filter(|m| !m.is_empty()),
            xid: xid.get::<_, i64>(0) as u64,
        })
    }

    /// Writes a restore point and switches WAL; returns the name of the
    /// segment that was completed.
    pub async fn switch_wal(&self) -> Result<String> {
        self.client
            .query_one("SELECT pg_create_restore_point('pgkeep archive check')::text", &[])
            .await
            .map_err(self.err("create a restore point"))?;
        self.one_text("SELECT pg_walfile_name(pg_switch_wal())", "switch WAL (pg_switch_wal)").await
    }

    /// The timeline WAL is inserted on and the insert position
    /// (`pg_walfile_name` names the segment with the insert timeline,
    /// which after a promotion is the new one even before the first
    /// checkpoint on it).
    pub async fn wal_position(&self) -> Result<(TimelineId, Lsn)> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())", &[])
            .await
            .map_err(self.err("report its WAL position"))?;
        let name: String = row.get(1);
        let timeline = name
            .get(..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .ok_or_else(|| Error::Input(format!("unexpected WAL file name '{name}' from the server at {}", self.describe)))?;
        Ok((TimelineId(timeline), row.get::<_, String>(0).parse()?))
    }

    /// How a standby stands: whether it is in recovery, what it replayed,
    /// and its WAL receiver.
    pub async fn standby_state(&self) -> Result<StandbyState> {
        let row = self
            .client
            .query_one(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
                 (SELECT status FROM pg_stat_wal_receiver), \
                 coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT min_recovery_end_timeline FROM pg_control_recovery()))::int8",
                &[],
            )
            .await
            .map_err(self.err("report its replication state"))?;
        let replay: Option<String> = row.get(1);
        Ok(StandbyState {
            in_recovery: row.get(0),
            replay: replay.map(|l| l.parse()).transpose()?,
            receiver: row.get(2),
            timeline: row.get::<_, Option<i64>>(3).map(|t| TimelineId(t as u32)),
        })
    }

    /// The timeline of a standby's minimum recovery point
    /// (`pg_control_recovery()`): after `pg_backup_stop` on a standby, the
    /// timeline of the backup's end.
    pub async fn min_recovery_timeline(&self) -> Result<TimelineId> {
        let row = self
            .client
            .query_one("SELECT min_recovery_end_timeline::int8 FROM pg_control_recovery()", &[])
            .await
            .map_err(self.err("report its minimum recovery point"))?;
        Ok(TimelineId(row.get::<_, i64>(0) as u32))
    }

    /// Switches WAL (`pg_switch_wal`), so that the segment in progress is
    /// archived.
    pub async fn switch_wal_only(&self) -> Result<()> {
        self.client.query_one("SELECT pg_switch_wal()", &[]).await.map_err(self.err("switch WAL (pg_switch_wal)"))?;
        Ok(())
    }

    /// Current WAL insert position.
    pub async fn current_lsn(&self) -> Result<Lsn> {
        self.one_text("SELECT pg_current_wal_lsn()::text", "report its WAL position").await?.parse()
    }

    /// `pg_stat_archiver`: what the server's archiver did since its
    /// statistics were reset.
    pub async fn archiver(&self) -> Result<Archiver> {
        let row = self
            .client
            .query_one(
                "SELECT archived_count, last_archived_wal, \
                 to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                 failed_count, last_failed_wal, \
                 to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                 FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(self.err("report its archiver (pg_stat_archiver)"))?;
        Ok(Archiver {
            archived_count: row.get(0),
            last_archived_wal: row.get(1),
            last_archived_time: row.get(2),
            failed_count: row.get(3),
            last_failed_wal: row.get(4),
            last_failed_time: row.get(5),
        })
    }
}

/// `pg_stat_archiver` (see [`Pg::archiver`]); times in RFC 3339, UTC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archiver {
    /// Segments archived.
    pub archived_count: i64,
    /// The last segment archived.
    pub last_archived_wal: Option<String>,
    /// When.
    pub last_archived_time: Option<String>,
    /// Failed attempts.
    pub failed_count: i64,
    /// The last segment that failed.
    pub last_failed_wal: Option<String>,
    /// When.
    pub last_failed_time: Option<String>,
}

/// Whether a failed connection was refused by the server itself (bad
/// password, no such role or database, no `pg_hba.conf` entry): trying
/// again cannot help. A server that is down, shutting down or starting
/// (SQLSTATE 57P01-57P03) is not refusing.
fn login_refused(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let Some(code) = e.code() else { return false };
    [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ]
    .contains(code)
}

/// Reads the system identifier from the long page header at the start of
/// a WAL segment (`XLogLongPageHeaderData.xlp_sysid`). `None` when the data
/// does not start with a long page header.
pub fn wal_system_id(segment: &[u8]) -> Option<SystemId> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    if segment.len() < 40 {
        return None;
    }
    let info = u16::from_le_bytes([segment[2], segment[3]]);
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    let id = u64::from_le_bytes(segment[24..32].try_into().ok()?);
    Some(SystemId(id))
}

/// The system identifier `global/pg_control` holds: its first field,
/// `ControlFileData.system_identifier` (a `uint64`, in every release since
/// 8.0; `src/include/catalog/pg_control.h`). `None` when truncated.
pub fn control_system_id(pg_control: &[u8]) -> Option<SystemId> {
    Some(SystemId(u64::from_le_bytes(pg_control.get(..8)?.try_into().ok()?)))
}

/// The system of the data directory `dir` from its `global/pg_control`;
/// `None` when there is none. PostgreSQL runs `restore_command` in its
/// data directory, so `archive-get` learns there which system asks.
pub fn data_dir_system_id(dir: &std::path::Path) -> Option<SystemId> {
    control_system_id(&std::fs::read(dir.join(CONTROL_FILE)).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_system_id_of_a_long_page_header() {
        let mut page = vec![0u8; 8192];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
        page[24..32].copy_from_slice(&7_301_234_567_890_123_456u64.to_le_bytes());
        assert_eq!(wal_system_id(&page), Some(SystemId(7_301_234_567_890_123_456)));
        page[2] = 0;
        assert_eq!(wal_system_id(&page), None);
        assert_eq!(wal_system_id(&page[..10]), None);
    }
}
