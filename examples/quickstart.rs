//! Quick start: `scripts/dev.sh quickstart`.
//!
//! Shows the plumbing tidings stands on: it creates the `tidings_quickstart`
//! database, applies the migrations, sends keyed events through the broker
//! with an idempotent producer and reads them back in a consumer group.
//! Uses `DATABASE_URL` and `KAFKA_BROKERS` (the script sets both).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server: PgConnectOptions = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
        .parse()?;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());

    let mut admin = server.connect().await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tidings_quickstart')",
    )
    .fetch_one(&mut admin)
    .await?;
    if !exists {
        admin.execute("CREATE DATABASE tidings_quickstart").await?;
    }
    let pool = sqlx::PgPool::connect_with(server.database("tidings_quickstart")).await?;
    tidings::MIGRATOR.run(&pool).await?;
    println!("1. database tidings_quickstart migrated");

    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let topic = format!("quickstart-{}", uuid::Uuid::now_v7().simple());
    let kafka_admin: AdminClient<DefaultClientContext> = config.create()?;
    kafka_admin
        .create_topics(
            [&NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    println!("2. topic {topic} created on {brokers}");

    let producer: FutureProducer = config
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let events = [
        ("ORD-1", "OrderCreated"),
        ("ORD-1", "PaymentProcessed"),
        ("ORD-2", "OrderCreated"),
    ];
    for (key, event) in events {
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload(event),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    println!("3. produced {} keyed events", events.len());

    let consumer: StreamConsumer = config
        .set("group.id", "quickstart")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    for _ in 0..events.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        println!(
            "4. consumed {} key={} partition={} offset={}",
            String::from_utf8_lossy(message.payload().unwrap_or_default()),
            String::from_utf8_lossy(message.key().unwrap_or_default()),
            message.partition(),
            message.offset()
        );
    }
    println!("done");
    Ok(())
}
