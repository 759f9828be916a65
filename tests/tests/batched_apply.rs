//! Set-based projections (`Projection::apply_batch`) against real
//! PostgreSQL and the real broker: how the runner handles a batch refused
//! naming its event, refused without naming one, a panic, and the
//! cardinality error a batch that is not folded per row raises; and what a
//! batch of duplicates writes; and a stream another transaction creates
//! while a batch claims it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::PgConnection;
use tidings::Envelope;
use tidings::projection::{ApplyError, Batch, BatchError, Projection};
use tidings_tests::gauges::{
    GaugeEvent, GaugeView, create_gauge_view, gauge_runner, one_partition_topic, produce,
    upsert_folded, v1,
};
use tidings_tests::{TestDb, scaled};

/// How the projection under test misbehaves on a negative value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Returns `BatchError::Permanent` naming the event.
    Names,
    /// Runs a set-based statement that fails on the negative reading (`?`
    /// on the sqlx error: unattributed).
    Unattributed,
    /// Panics.
    Panics,
    /// Never refuses, but writes the batch with one upsert not folded per
    /// gauge: two events of one gauge make it a cardinality error.
    Unfolded,
}

/// One call of `apply_batch`: the (gauge, sequence) of its events, and
/// whether it failed.
type Call = (Vec<(String, u64)>, bool);

/// A set-based gauge view that records its calls.
struct Recorded {
    mode: Mode,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Recorded {
    async fn write(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, GaugeEvent>,
    ) -> Result<(), BatchError> {
        if self.mode == Mode::Unfolded {
            let ids: Vec<&str> = batch
                .events()
                .iter()
                .map(|e| e.aggregate_id.as_str())
                .collect();
            let values: Vec<i64> = batch
                .events()
                .iter()
                .map(|e| {
                    let GaugeEvent::Set { value } = e.payload;
                    value
                })
                .collect();
            sqlx::query(
                "INSERT INTO gauge_view AS g (id, value, events) SELECT i, v, 1 FROM UNNEST($1::text[], $2::bigint[]) AS u(i, v) \
                 ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, events = g.events + 1",
            )
            .bind(&ids)
            .bind(&values)
            .execute(conn)
            .await?;
            return Ok(());
        }
        let bad = batch.events().iter().position(|e| {
            let GaugeEvent::Set { value } = e.payload;
            value < 0
        });
        match (self.mode, bad) {
            (Mode::Names, Some(index)) => {
                return Err(BatchError::permanent(index, "a negative gauge reading"));
            }
            (Mode::Panics, Some(_)) => panic!("a negative gauge reading"),
            // A set-based statement that fails on one row of the batch
            // (folding would hide the negative reading from the CHECK):
            // class 22 through `?`, no event named.
            (Mode::Unattributed, Some(_)) => {
                sqlx::query("SELECT v / 0 FROM UNNEST($1::bigint[]) AS u(v) WHERE v < 0")
                    .bind(vec![-1i64])
                    .execute(&mut *conn)
                    .await?;
            }
            _ => {}
        }
        // Folded per gauge (the table's CHECK guards against a negative
        // value reaching it).
        upsert_folded(conn, batch).await
    }
}

#[async_trait]
impl Projection for Recorded {
    type Event = GaugeEvent;

    fn name(&self) -> &str {
        GaugeView.name()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<GaugeEvent>,
    ) -> Result<(), ApplyError> {
        Ok(self.apply_batch(conn, &Batch::one(envelope)).await?)
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, GaugeEvent>,
    ) -> Result<(), BatchError> {
        let events = batch
            .events()
            .iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence))
            .collect();
        let at = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((events, true));
            calls.len() - 1
        };
        self.write(conn, batch).await?;
        self.calls.lock().unwrap()[at].1 = false;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        GaugeView.reset(conn).await
    }
}

const GAUGES: usize = 10;
const PER: u64 = 10;
/// G-3's fourth reading is negative.
const BAD: (&str, u64) = ("G-3", 4);

/// Produces `PER` readings of each of `GAUGES` gauges, interleaved, to one
/// partition (G-3's fourth negative), runs `mode`'s projection, and waits
/// until every gauge is where it should end. Returns the calls made and
/// the parked rows (sequence, dead letter, reason) of G-3.
async fn run(mode: Mode) -> (Vec<Call>, Vec<(i64, bool, String)>) {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    if mode != Mode::Unfolded {
        sqlx::query("ALTER TABLE gauge_view ADD CHECK (value >= 0)")
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let (prefix, topic, producer) = one_partition_topic().await;
    for sequence in 1..=PER {
        for g in 0..GAUGES {
            let id = format!("G-{g}");
            let value = if (id.as_str(), sequence) == BAD {
                "-1".to_owned()
            } else {
                sequence.to_string()
            };
            produce(&producer, &topic, &id, &v1(&id, sequence, &value)).await;
        }
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let projection = Recorded {
        mode,
        calls: Arc::clone(&calls),
    };
    let (stop, task) = gauge_runner(&db, &prefix, projection);
    // With the unfolded upsert nothing is refused: every gauge reaches PER.
    let expected = |id: &str| {
        if id == BAD.0 && mode != Mode::Unfolded {
            BAD.1 as i64 - 1
        } else {
            PER as i64
        }
    };
    let started = Instant::now();
    loop {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT id, value, events FROM gauge_view ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_parked")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let settled = rows.len() == GAUGES
            && rows
                .iter()
                .all(|(id, value, n)| *n == expected(id) && *value == expected(id))
            && (mode == Mode::Unfolded || parked as u64 == PER - BAD.1 + 1);
        if settled {
            break;
        }
        assert!(
            started.elapsed() < scaled(Duration::from_secs(60)),
            "{mode:?}: not settled: {rows:?}, {parked} parked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parked: Vec<(i64, bool, String)> = sqlx::query_as(
        "SELECT sequence, dead_letter, reason FROM tidings_parked WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(BAD.0)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let calls = calls.lock().unwrap().clone();
    (calls, parked)
}

/// The events of `call` without G-3's from the bad one on.
fn without_the_bad_stream(call: &Call) -> Vec<(String, u64)> {
    call.0
        .iter()
        .filter(|(id, seq)| !(id == BAD.0 && *seq >= BAD.1))
        .cloned()
        .collect()
}

/// The first call that failed and the calls after it.
fn after_the_refusal(calls: &[Call]) -> (&Call, &[Call]) {
    let at = calls
        .iter()
        .position(|(_, failed)| *failed)
        .expect("a call refused the batch");
    (&calls[at], &calls[at + 1..])
}

fn assert_dead_letter_then_parked(parked: &[(i64, bool, String)], reason: &str) {
    assert_eq!(parked.len() as u64, PER - BAD.1 + 1, "{parked:?}");
    assert_eq!(parked[0].0 as u64, BAD.1);
    assert!(
        parked[0].1,
        "the bad reading is the dead letter: {parked:?}"
    );
    assert!(parked[0].2.contains(reason), "{:?}", parked[0].2);
    assert!(
        parked[1..].iter().all(|(_, dead, _)| !dead),
        "G-3's later readings are parked behind it: {parked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_naming_its_event_dead_letters_it_and_applies_the_rest_as_one_batch() {
    let (calls, parked) = run(Mode::Names).await;
    assert_dead_letter_then_parked(&parked, "a negative gauge reading");
    let (refused, after) = after_the_refusal(&calls);
    assert!(refused.0.contains(&(BAD.0.to_owned(), BAD.1)));
    // Planned again without the bad stream's tail, still as one batch.
    assert_eq!(
        after[0].0,
        without_the_bad_stream(refused),
        "the next call is the same batch without G-3 from its bad reading on"
    );
    assert!(!after[0].1, "and it applies");
    assert_eq!(
        calls.iter().filter(|(_, failed)| *failed).count(),
        1,
        "refused once: {calls:?}"
    );
}

/// What the calls after an unattributed refusal must be: the refused
/// batch's events one at a time, in order, the bad stream's tail left out
/// after its bad reading.
fn assert_located_one_by_one(calls: &[Call]) {
    let (refused, after) = after_the_refusal(calls);
    let expected: Vec<(String, u64)> = refused
        .0
        .iter()
        .filter(|(id, seq)| !(id == BAD.0 && *seq > BAD.1))
        .cloned()
        .collect();
    let singles: Vec<(String, u64)> = after[..expected.len()]
        .iter()
        .map(|(events, _)| {
            assert_eq!(events.len(), 1, "one event per call: {events:?}");
            events[0].clone()
        })
        .collect();
    assert_eq!(singles, expected, "the refused batch again, event by event");
    for (events, failed) in &after[..expected.len()] {
        assert_eq!(
            *failed,
            events[0] == (BAD.0.to_owned(), BAD.1),
            "only the bad reading fails: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_a_set_based_statement_refuses_is_located_event_by_event_and_only_the_culprit_dead_lettered()
 {
    let (calls, parked) = run(Mode::Unattributed).await;
    assert_dead_letter_then_parked(&parked, "division by zero");
    assert_located_one_by_one(&calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_panics_is_located_event_by_event_and_only_the_culprit_dead_lettered() {
    let (calls, parked) = run(Mode::Panics).await;
    assert_dead_letter_then_parked(&parked, "panicked: a negative gauge reading");
    assert_located_one_by_one(&calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfolded_upsert_touching_a_row_twice_is_applied_event_by_event_not_retried_forever() {
    // Here the table has no CHECK: every reading applies, and the run
    // waits for PER readings on every gauge.
    let (calls, parked) = run(Mode::Unfolded).await;
    assert!(parked.is_empty(), "nothing dead-lettered: {parked:?}");
    assert!(
        calls
            .iter()
            .any(|(events, failed)| *failed && events.len() > GAUGES),
        "a batch holding two readings of a gauge was refused: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|(events, failed)| !*failed && events.len() == 1),
        "and then applied one reading at a time: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_duplicates_rewrites_no_stream_row_and_changes_no_read_model_row() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    let mut sent = Vec::new();
    for sequence in 1..=5 {
        for g in 0..5 {
            let id = format!("G-{g}");
            let value = v1(&id, sequence, &sequence.to_string());
            produce(&producer, &topic, &id, &value).await;
            sent.push((id, value));
        }
    }
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    let checkpoint = async || -> i64 {
        sqlx::query_scalar("SELECT coalesce(max(next_offset), 0) FROM tidings_checkpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let started = Instant::now();
    while checkpoint().await < sent.len() as i64 {
        assert!(started.elapsed() < scaled(Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Row versions: xmin changes with every rewrite of a row.
    let versions = async || -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT aggregate_id, xmin::text FROM tidings_projection_streams UNION ALL \
             SELECT id, xmin::text FROM gauge_view ORDER BY 1, 2",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let before = versions().await;
    assert_eq!(before.len(), 10);
    // The same envelopes again at new offsets, as a relay republishing.
    for (id, value) in &sent {
        produce(&producer, &topic, id, value).await;
    }
    let started = Instant::now();
    while checkpoint().await < 2 * sent.len() as i64 {
        assert!(started.elapsed() < scaled(Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        versions().await,
        before,
        "no stream or read model row rewritten"
    );
    let events: i64 = sqlx::query_scalar("SELECT sum(events)::bigint FROM gauge_view")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, sent.len() as i64, "each reading applied once");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_by_another_transaction_while_a_batch_claims_it_is_planned_again_not_applied_twice()
 {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    // Another transaction (an instance that applied G-1's first reading)
    // creates G-1's position and has not committed yet: the runner's lock
    // statement cannot see it, so its batch plans G-1 as a new stream.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
         VALUES ($1, 'gauge', 'G-1', 1)",
    )
    .bind(GaugeView.name())
    .execute(&mut *other)
    .await
    .unwrap();
    produce(&producer, &topic, "G-1", &v1("G-1", 1, "1")).await;
    produce(&producer, &topic, "G-1", &v1("G-1", 2, "2")).await;
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    // The batch's claim of G-1 waits on the other transaction's row:
    // evidence that the interleaving under test happened.
    tidings_tests::wait_until(
        "the runner's claim of G-1 waiting on the other transaction",
        Duration::from_secs(30),
        async || {
            tidings_tests::waits_on_lock(&db.pool, "INSERT INTO tidings_projection_streams").await
        },
    )
    .await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM gauge_view")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied, 0, "nothing applied while the claim waits");
    other.commit().await.unwrap();
    // The claim finds the row made meanwhile: the batch is rolled back and
    // planned again on the committed position, so the first reading, which
    // the other transaction took, is a duplicate and only the second applies.
    tidings_tests::wait_until(
        "G-1's second reading applied",
        Duration::from_secs(30),
        async || {
            sqlx::query_scalar::<_, i64>("SELECT value FROM gauge_view WHERE id = 'G-1'")
                .fetch_optional(&db.pool)
                .await
                .unwrap()
                == Some(2)
        },
    )
    .await;
    let (events, position): (i64, i64) = sqlx::query_as(
        "SELECT g.events, s.last_sequence FROM gauge_view g, tidings_projection_streams s \
         WHERE g.id = 'G-1' AND s.aggregate_id = 'G-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (events, position),
        (1, 2),
        "G-1's first reading is not applied again; its position moved on to 2"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
