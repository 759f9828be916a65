//! Metrics in the Prometheus text format, and health and readiness, over a
//! small HTTP endpoint.
//!
//! Register the parts a process runs (the store, relays, projection
//! runners) with a [`Metrics`] registry and [`serve`] it: `GET /metrics`
//! renders their counters and, at scrape time, the outbox depth and age and
//! each projection's lag per partition; `GET /health` answers while the
//! process runs; `GET /ready` answers 200 only while PostgreSQL answers,
//! every registered relay is healthy (not failing, not stalled) and every
//! registered projection runner's consumer is healthy (not failing for
//! longer than its allowance, not refused by the broker).

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;
use crate::projection::RunnerStats;
use crate::relay::RelayStats;
use crate::store::StoreStats;

#[derive(Default)]
struct Parts {
    stores: Vec<Arc<StoreStats>>,
    relays: Vec<Arc<RelayStats>>,
    runners: Vec<(String, Vec<String>, Arc<RunnerStats>)>,
}

/// The metrics of one process.
#[derive(Clone)]
pub struct Metrics {
    pool: PgPool,
    kafka: Option<KafkaConfig>,
    /// One watermark client for every scrape, made at the first.
    watermarks: Arc<Mutex<Option<crate::projection::Watermarks>>>,
    parts: Arc<Mutex<Parts>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("kafka", &self.kafka)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry reading the outbox (and, with `kafka`, projection lag) from `pool`.
    pub fn new(pool: PgPool, kafka: Option<KafkaConfig>) -> Self {
        Metrics {
            pool,
            kafka,
            watermarks: Arc::default(),
            parts: Arc::default(),
        }
    }

    /// Adds a store's counters (see [`crate::Store::stats`]).
    pub fn store(&self, stats: Arc<StoreStats>) -> &Self {
        self.parts.lock().expect("metrics lock").stores.push(stats);
        self
    }

    /// Adds a relay's counters.
    pub fn relay(&self, stats: Arc<RelayStats>) -> &Self {
        self.parts.lock().expect("metrics lock").relays.push(stats);
        self
    }

    /// Adds a projection runner's counters; `topics` (with prefix) are used
    /// for its lag.
    pub fn runner(&self, projection: &str, topics: Vec<String>, stats: Arc<RunnerStats>) -> &Self {
        self.parts.lock().expect("metrics lock").runners.push((
            projection.to_owned(),
            topics,
            stats,
        ));
        self
    }

    /// Renders every metric in the Prometheus text format.
    pub async fn render(&self) -> String {
        let (stores, relays, runners) = {
            let parts = self.parts.lock().expect("metrics lock");
            (
                parts.stores.clone(),
                parts.relays.clone(),
                parts.runners.clone(),
            )
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let sum = |f: &dyn Fn(&StoreStats) -> u64| stores.iter().map(|s| f(s)).sum::<u64>() as f64;
        metric(
            "tidings_events_appended_total",
            "counter",
            "Events appended.",
            vec![(
                String::new(),
                sum(&|s| s.events_appended.load(Ordering::Relaxed)),
            )],
        );
        metric(
            "tidings_commands_total",
            "counter",
            "Commands that committed events.",
            vec![(String::new(), sum(&|s| s.commands.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_append_conflicts_total",
            "counter",
            "Optimistic concurrency conflicts (each retried or returned).",
            vec![(String::new(), sum(&|s| s.conflicts.load(Ordering::Relaxed)))],
        );

        if let Ok(status) = crate::store::outbox_status(&self.pool).await {
            metric(
                "tidings_outbox_depth",
                "gauge",
                "Outbox rows not yet published.",
                vec![(String::new(), status.depth as f64)],
            );
            metric(
                "tidings_outbox_dead_rows",
                "gauge",
                "Outbox rows set aside as refused for good.",
                vec![(String::new(), status.dead as f64)],
            );
            metric(
                "tidings_outbox_oldest_age_seconds",
                "gauge",
                "Age of the oldest outbox row (0 when empty).",
                vec![(
                    String::new(),
                    status.oldest_age.map_or(0.0, |a| a.as_secs_f64()),
                )],
            );
        }

        let relay =
            |f: &dyn Fn(&RelayStats) -> u64| relays.iter().map(|s| f(s)).sum::<u64>() as f64;
        metric(
            "tidings_relay_published_total",
            "counter",
            "Events acknowledged by the broker and removed from the outbox.",
            vec![(
                String::new(),
                relay(&|s| s.published.load(Ordering::Relaxed)),
            )],
        );
        metric(
            "tidings_relay_delivery_failures_total",
            "counter",
            "Deliveries that failed and were kept for retry.",
            vec![(String::new(), relay(&|s| s.failed.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_dead_rows_total",
            "counter",
            "Rows refused for good and set aside (tidings outbox dead list).",
            vec![(String::new(), relay(&|s| s.dead.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_purges_total",
            "counter",
            "Producer purges after a batch passed the delivery timeout.",
            vec![(String::new(), relay(&|s| s.purges.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_stalls_total",
            "counter",
            "Times a relay gave its lanes up after making no progress.",
            vec![(String::new(), relay(&|s| s.stalls.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_errors_total",
            "counter",
            "Database or broker errors the relay backed off from.",
            vec![(String::new(), relay(&|s| s.errors.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_batches_total",
            "counter",
            "Batches published.",
            vec![(String::new(), relay(&|s| s.batches.load(Ordering::Relaxed)))],
        );
        metric(
            "tidings_relay_batch_rows_total",
            "counter",
            "Rows read in batches (divide by batches for the mean batch size).",
            vec![(
                String::new(),
                relay(&|s| s.batch_rows.load(Ordering::Relaxed)),
            )],
        );
        metric(
            "tidings_relay_batch_seconds_total",
            "counter",
            "Time from reading a batch to deleting it (divide by batches for the mean latency).",
            vec![(
                String::new(),
                relay(&|s| s.batch_micros.load(Ordering::Relaxed)) / 1e6,
            )],
        );
        metric(
            "tidings_relay_lanes",
            "gauge",
            "Outbox lanes owned.",
            vec![(String::new(), relay(&|s| s.lanes.load(Ordering::Relaxed)))],
        );

        type Pick = fn(&RunnerStats) -> &std::sync::atomic::AtomicU64;
        let counters: [(&str, &str, Pick); 11] = [
            (
                "tidings_projection_applied_total",
                "Events applied to the read model.",
                |s| &s.applied,
            ),
            (
                "tidings_projection_skipped_total",
                "Messages skipped as already applied.",
                |s| &s.skipped,
            ),
            (
                "tidings_projection_ignored_total",
                "Events skipped unread by this runner (unknown types, newer versions if so configured).",
                |s| &s.ignored,
            ),
            (
                "tidings_projection_parked_total",
                "Events parked behind a dead letter.",
                |s| &s.parked,
            ),
            (
                "tidings_projection_dead_lettered_total",
                "Events dead-lettered (recorded in tidings_parked).",
                |s| &s.dead_lettered,
            ),
            (
                "tidings_projection_dead_letters_sent_total",
                "Dead letters copied to the dead letter topic.",
                |s| &s.dead_letters_sent,
            ),
            (
                "tidings_projection_dead_letter_failures_total",
                "Dead letters the dead letter topic refused for good.",
                |s| &s.dead_letter_failures,
            ),
            (
                "tidings_projection_retries_total",
                "Batches retried after a transient error.",
                |s| &s.retries,
            ),
            (
                "tidings_projection_batches_total",
                "Batches committed.",
                |s| &s.batches,
            ),
            (
                "tidings_projection_revoked_partitions_total",
                "Partitions taken from the runner by rebalances.",
                |s| &s.revoked,
            ),
            (
                "tidings_projection_stopped_partitions_total",
                "Partitions stopped because their checkpoint is beyond the partition's end.",
                |s| &s.stopped_partitions,
            ),
        ];
        for (name, help, pick) in counters {
            let samples = runners
                .iter()
                .map(|(p, _, s)| {
                    (
                        format!("{{projection=\"{p}\"}}"),
                        pick(s).load(Ordering::Relaxed) as f64,
                    )
                })
                .collect();
            metric(name, "counter", help, samples);
        }
        metric(
            "tidings_projection_assigned_partitions",
            "gauge",
            "Partitions the runner owns now.",
            runners
                .iter()
                .map(|(p, _, s)| {
                    (
                        format!("{{projection=\"{p}\"}}"),
                        s.assigned.load(Ordering::Relaxed) as f64,
                    )
                })
                .collect(),
        );
        // Parked and dead letters from PostgreSQL alone: known while the
        // broker is away.
        let mut parked = Vec::new();
        for (projection, _, _) in &runners {
            let counts: std::result::Result<(i64, i64, i64), _> = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE NOT dead_letter), count(*) FILTER (WHERE dead_letter), \
                 count(*) FILTER (WHERE dlq_error IS NOT NULL) FROM tidings_parked WHERE projection = $1",
            )
            .bind(projection)
            .fetch_one(&self.pool)
            .await;
            if let Ok(counts) = counts {
                parked.push((projection.clone(), counts));
            }
        }
        for (name, help, pick) in [
            (
                "tidings_projection_parked",
                "Events parked behind a dead letter now.",
                (|c: &(i64, i64, i64)| c.0) as fn(&(i64, i64, i64)) -> i64,
            ),
            (
                "tidings_projection_dead_letters",
                "Dead letters not re-driven or skipped yet.",
                |c| c.1,
            ),
            (
                "tidings_projection_dead_letters_undeliverable",
                "Dead letters the dead letter topic refused for good.",
                |c| c.2,
            ),
        ] {
            let samples = parked
                .iter()
                .map(|(p, c)| (format!("{{projection=\"{p}\"}}"), pick(c) as f64))
                .collect();
            metric(name, "gauge", help, samples);
        }
        let mut ignored = Vec::new();
        for (projection, _, _) in &runners {
            let counts: std::result::Result<Vec<(String, i64)>, _> = sqlx::query_as(
                "SELECT reason, sum(events)::int8 FROM tidings_projection_ignored \
                 WHERE projection = $1 GROUP BY reason ORDER BY reason",
            )
            .bind(projection)
            .fetch_all(&self.pool)
            .await;
            for (reason, events) in counts.unwrap_or_default() {
                ignored.push((
                    format!("{{projection=\"{projection}\",reason=\"{reason}\"}}"),
                    events as f64,
                ));
            }
        }
        metric(
            "tidings_projection_ignored_events",
            "gauge",
            "Events the projection skipped unread, by reason (unknown type, newer version), since its last replay.",
            ignored,
        );
        if let Some(kafka) = &self.kafka {
            let mut samples = Vec::new();
            let mut known = Vec::new();
            let watermarks = {
                let mut kept = self.watermarks.lock().expect("metrics lock");
                if kept.is_none() {
                    *kept = crate::projection::Watermarks::new(kafka).ok();
                }
                kept.clone()
            };
            for (projection, topics, _) in &runners {
                let status = match &watermarks {
                    Some(watermarks) => {
                        crate::projection::status_with(&self.pool, watermarks, projection, topics)
                            .await
                            .ok()
                    }
                    None => None,
                };
                known.push((
                    format!("{{projection=\"{projection}\"}}"),
                    if status.is_some() { 1.0 } else { 0.0 },
                ));
                for p in status.into_iter().flat_map(|s| s.partitions) {
                    samples.push((
                        format!(
                            "{{projection=\"{projection}\",topic=\"{}\",partition=\"{}\"}}",
                            p.topic, p.partition
                        ),
                        p.lag as f64,
                    ));
                }
            }
            metric(
                "tidings_projection_lag",
                "gauge",
                "Messages not yet applied, per partition.",
                samples,
            );
            metric(
                "tidings_projection_lag_known",
                "gauge",
                "1 when the lag could be read (the broker answered), else 0: no lag sample then means unknown, not 0.",
                known,
            );
        }
        out
    }

    async fn ready(&self) -> bool {
        let relays_healthy = self
            .parts
            .lock()
            .map(|parts| {
                parts
                    .relays
                    .iter()
                    .all(|r| r.healthy.load(Ordering::Relaxed))
                    && parts
                        .runners
                        .iter()
                        .all(|(_, _, r)| r.healthy.load(Ordering::Relaxed))
            })
            .unwrap_or(false);
        relays_healthy
            && tokio::time::timeout(
                std::time::Duration::from_secs(5),
                sqlx::query("SELECT 1").execute(&self.pool),
            )
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Serves `/metrics`, `/health` and `/ready` on `addr` until `shutdown`.
/// Returns the address bound (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("metrics address: {e}")))?;
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => {
                    let Ok((mut socket, _)) = accepted else { continue };
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let mut request = [0u8; 2048];
                        let Ok(n) = socket.read(&mut request).await else { return };
                        let line = String::from_utf8_lossy(&request[..n]);
                        let path = line.split_whitespace().nth(1).unwrap_or("/");
                        let (status, kind, body) = match path {
                            "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render().await),
                            "/health" => ("200 OK", "text/plain", "ok\n".to_owned()),
                            "/ready" if metrics.ready().await => ("200 OK", "text/plain", "ready\n".to_owned()),
                            "/ready" => ("503 Service Unavailable", "text/plain", "database unreachable\n".to_owned()),
                            _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                        };
                        let response = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            }
        }
    });
    Ok(bound)
}
