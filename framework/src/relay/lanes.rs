//! Lane ownership: which relay publishes which aggregates.
//!
//! Every outbox row carries a lane (a hash of its aggregate). A relay owns a
//! lane while it holds a PostgreSQL session advisory lock on it, on a
//! connection kept for that purpose. One lane, one relay, so one aggregate's
//! rows are only ever published by one relay at a time, in id order. When a
//! relay dies, its connection closes and PostgreSQL releases its locks: the
//! others take the lanes over at their next rebalance.
//!
//! Advisory locks are per database; their lock classes are derived from the
//! schema the outbox lives in (`current_schema()`), so several tidings
//! installations in one database (one per schema, through `search_path`)
//! never share lanes. Relays share lanes fairly: each holds a *presence*
//! lock, counts the relays present and owns at most `ceil(lanes / relays)`
//! lanes.
//!
//! Every call on the lock session has a client-side deadline, and the
//! session asks the server to drop it within seconds once the relay goes
//! silent (TCP keepalives, `tcp_user_timeout`), so a crashed relay host
//! frees its lanes in seconds, not hours.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::within;
use crate::error::{Error, Result};
use crate::store::OUTBOX_LANES;

/// Advisory lock class of lane locks in the `public` schema ("tdng").
const LANE_CLASS: i32 = 0x7464_6e67;
/// Advisory lock class of presence locks in the `public` schema ("tdnp").
const PRESENCE_CLASS: i32 = 0x7464_6e70;

/// The lock classes of the session's schema: the historical constants in
/// `public`, a hash of the schema's name elsewhere.
const CLASSES: &str = "SELECT CASE WHEN current_schema() = 'public' THEN $1 \
    ELSE hashtext('tidings.lanes.' || current_schema()) END, \
    CASE WHEN current_schema() = 'public' THEN $2 \
    ELSE hashtext('tidings.presence.' || current_schema()) END";

/// The server drops a silent lock session after about this long.
const KEEPALIVES: &str = "SELECT set_config('tcp_keepalives_idle', '5', false), \
    set_config('tcp_keepalives_interval', '2', false), \
    set_config('tcp_keepalives_count', '3', false), \
    set_config('tcp_user_timeout', '10000', false)";

/// The lanes a relay holds, and the connection that holds them.
pub(crate) struct Lanes {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    owned: BTreeSet<i32>,
    presence: i32,
    /// (lane class, presence class) of the session's schema.
    classes: (i32, i32),
    timeout: Duration,
}

impl Lanes {
    pub(crate) fn new(options: PgConnectOptions, timeout: Duration) -> Self {
        Lanes {
            options,
            conn: None,
            owned: BTreeSet::new(),
            presence: fastrand::i32(0..),
            classes: (LANE_CLASS, PRESENCE_CLASS),
            timeout,
        }
    }

    /// The lanes owned now.
    pub(crate) fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Whether no lane is owned.
    pub(crate) fn is_empty(&self) -> bool {
        self.owned.is_empty()
    }

    /// Reconnects if needed, then takes free lanes up to the fair share and,
    /// with `may_release` (nothing of this relay's lanes in flight), gives
    /// back those above it. Returns whether lanes should be given back but
    /// `may_release` forbade it. On a connection failure every lane is
    /// considered lost (PostgreSQL releases them with the session).
    pub(crate) async fn rebalance(&mut self, may_release: bool) -> Result<bool> {
        let limit = self.timeout;
        let attempt = within(limit, "rebalancing lanes", self.try_rebalance(may_release)).await;
        match attempt {
            Ok(surplus) => Ok(surplus),
            Err(e) => {
                self.owned.clear();
                if let Some(conn) = self.conn.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                }
                Err(e)
            }
        }
    }

    async fn try_rebalance(&mut self, may_release: bool) -> Result<bool> {
        if self.conn.is_none() {
            let mut conn = self
                .options
                .connect()
                .await
                .map_err(Error::db("connecting the relay's lane-lock session"))?;
            sqlx::query(KEEPALIVES)
                .execute(&mut conn)
                .await
                .map_err(Error::db("setting the lane-lock session's keepalives"))?;
            self.classes = sqlx::query_as(CLASSES)
                .bind(LANE_CLASS)
                .bind(PRESENCE_CLASS)
                .fetch_one(&mut conn)
                .await
                .map_err(Error::db("reading the outbox schema"))?;
            // A fresh presence id per session: a stale session of this relay
            // that the server has not reaped yet cannot block the new one.
            loop {
                self.presence = fastrand::i32(0..);
                let registered: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(self.classes.1)
                    .bind(self.presence)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(Error::db("registering the relay"))?;
                if registered {
                    break;
                }
            }
            self.conn = Some(conn);
            self.owned.clear();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let relays: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid::bigint = $1 AND objsubid = 2 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(self.classes.1))
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db("counting relays"))?;
        let relays = relays.max(1) as u32;
        let share = OUTBOX_LANES.div_ceil(relays) as usize;

        // Give back lanes above the fair share (only with nothing in flight,
        // so no row of those lanes is still on its way).
        if self.owned.len() > share && !may_release {
            return Ok(true);
        }
        while self.owned.len() > share {
            let lane = *self.owned.iter().next_back().expect("not empty");
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(self.classes.0)
                .bind(lane)
                .execute(&mut *conn)
                .await
                .map_err(Error::db("releasing a lane"))?;
            self.owned.remove(&lane);
        }
        // Take free lanes up to the share, starting at a random lane so that
        // relays do not all contend for the same ones.
        let mut wanted = share.saturating_sub(self.owned.len());
        if wanted > 0 {
            let held: Vec<i32> = sqlx::query_scalar(
                "SELECT objid::bigint::int FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND classid::bigint = $1 AND objsubid = 2 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind(i64::from(self.classes.0))
            .fetch_all(&mut *conn)
            .await
            .map_err(Error::db("listing taken lanes"))?;
            let start = fastrand::u32(0..OUTBOX_LANES);
            let free = (0..OUTBOX_LANES)
                .map(|i| ((i + start) % OUTBOX_LANES) as i32)
                .filter(|lane| !held.contains(lane) && !self.owned.contains(lane))
                .collect::<Vec<_>>();
            for lane in free {
                if wanted == 0 {
                    break;
                }
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(self.classes.0)
                    .bind(lane)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(Error::db("taking a lane"))?;
                if locked {
                    self.owned.insert(lane);
                    wanted -= 1;
                }
            }
        }
        Ok(false)
    }

    /// Releases every lane and the presence lock.
    pub(crate) async fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing says goodbye to the server; a silent one is not waited for.
            let _ = tokio::time::timeout(self.timeout, conn.close()).await;
        }
        self.owned.clear();
    }
}
