//! The spans tidings opens, with their fields, as a subscriber sees them.
//! A test binary of its own, since it installs the process's subscriber.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidings::EventContext;
use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig};
use tidings::relay::{Relay, RelayConfig};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::summary::OrderSummary;
use tidings_tests::{TestDb, brokers, store_with_prefix};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Seen = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

/// Records every tidings span with its fields (those set at creation and
/// those recorded later).
struct Spans(Seen);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        if !attrs.metadata().name().starts_with("tidings.") {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        fields.insert("#id".into(), id.into_u64().to_string());
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        let mut seen = self.0.lock().unwrap();
        let key = id.into_u64().to_string();
        if let Some((_, fields)) = seen
            .iter_mut()
            .rev()
            .find(|(_, f)| f.get("#id") == Some(&key))
        {
            values.record(&mut Fields(fields));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_relay_and_apply_spans_carry_what_the_docs_say() {
    let seen: Seen = Arc::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(Spans(Arc::clone(&seen)))
            .with(tracing_subscriber::filter::LevelFilter::DEBUG),
    )
    .expect("the only subscriber of this test binary");
    let db = TestDb::new().await;
    let (store, prefix) = store_with_prefix(&db);
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    let context = EventContext::new()
        .correlation_id("req-7")
        .causation_id("cmd-3");
    let create = OrderCommand::Create {
        order_id: "ORD-1".into(),
        user_id: "U".into(),
        amount: 1.0,
        currency: "EUR".into(),
    };
    store
        .execute_with::<Order>("ORD-1", create, &context)
        .await
        .unwrap();
    let kafka = KafkaConfig::new(brokers());
    let relay = Relay::new(db.pool.clone(), RelayConfig::new(kafka.clone())).unwrap();
    let runner = Runner::new(
        db.pool.clone(),
        summary.clone(),
        RunnerConfig::new(kafka).topic_prefix(&prefix),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay = tokio::spawn(relay.run(until(stopped.clone())));
    let runner = tokio::spawn(runner.run(until(stopped.clone())));
    let started = Instant::now();
    while summary.rows(&db.pool).await.unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    runner.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let find = |name: &str| {
        seen.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect::<Vec<_>>()
    };
    let execute = find("tidings.execute");
    assert!(
        execute.iter().any(
            |f| f.get("aggregate_id").map(String::as_str) == Some("ORD-1")
                && f.get("correlation_id").map(String::as_str) == Some("req-7")
                && f.get("causation_id").map(String::as_str) == Some("cmd-3")
        ),
        "{execute:?}"
    );
    let apply = find("tidings.projection.apply");
    assert!(
        apply.iter().any(
            |f| f.get("aggregate_id").map(String::as_str) == Some("ORD-1")
                && f.get("correlation_id").map(String::as_str) == Some("req-7")
                && f.get("causation_id").map(String::as_str) == Some("cmd-3")
        ),
        "{apply:?}"
    );
    let batches = find("tidings.relay.batch");
    assert!(
        batches
            .iter()
            .any(|f| f.get("rows").map(String::as_str) == Some("1")
                && f.get("lanes").is_some_and(|l| l != "0")),
        "{batches:?}"
    );
}
