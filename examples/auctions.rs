//! Auctions: `cargo run -p tidings-examples --example auctions`
//! (after `scripts/dev.sh up`; uses `DATABASE_URL` and `KAFKA_BROKERS`).
//!
//! Shows optimistic concurrency doing its job: 20 bidders bid on one auction
//! at the same time, each raising the leading bid they saw. Conflicting
//! appends are retried on the new state, so no accepted bid is lost and the
//! stream's bids only go up. The leading bid projection ends equal to the
//! aggregate's state.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tidings::{ExecuteError, Store, StoreConfig};
use tidings_examples::auctions::{Auction, AuctionCommand, AuctionError, LeadingBid};
use tidings_examples::demo::{
    BoxError, fresh_database, kafka, spawn_projection, spawn_relay, unique_prefix, wait_until,
};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let pool = fresh_database("tidings_auctions").await?;
    LeadingBid::create_table(&pool).await?;
    let prefix = unique_prefix("auctions");
    let store = Store::with_config(
        pool.clone(),
        StoreConfig::default()
            .topic_prefix(&prefix)
            .max_conflict_retries(100),
    );
    store
        .execute::<Auction>(
            "AUC-1",
            AuctionCommand::Open {
                item: "a 1962 guitar".into(),
                reserve: 100,
            },
        )
        .await?;

    let bidders: Vec<_> = (0..20)
        .map(|b| {
            let store = store.clone();
            tokio::spawn(async move {
                let (mut accepted, mut outbid, mut retries) = (0u32, 0u32, 0u32);
                for _ in 0..5 {
                    let seen = store
                        .load::<Auction>("AUC-1")
                        .await?
                        .state
                        .leading
                        .map_or(100, |(_, a)| a);
                    let bid = AuctionCommand::Bid {
                        bidder: format!("bidder-{b:02}"),
                        amount: seen + 1 + fastrand::u64(0..10),
                    };
                    match store.execute::<Auction>("AUC-1", bid).await {
                        Ok(c) => {
                            accepted += 1;
                            retries += c.retries;
                        }
                        Err(ExecuteError::Rejected(AuctionError::TooLow { .. })) => outbid += 1,
                        Err(e) => return Err::<_, BoxError>(e.into()),
                    }
                }
                Ok((accepted, outbid, retries))
            })
        })
        .collect();
    let (mut accepted, mut outbid, mut retries) = (0, 0, 0);
    for bidder in bidders {
        let (a, o, r) = bidder.await??;
        accepted += a;
        outbid += o;
        retries += r;
    }
    store
        .execute::<Auction>("AUC-1", AuctionCommand::Close)
        .await?;
    let auction = store.load::<Auction>("AUC-1").await?;
    println!(
        "1. 20 bidders: {accepted} bids accepted, {outbid} refused as too low, {retries} conflicts retried"
    );

    let stream = store.read_stream("auction", "AUC-1").await?;
    let amounts: Vec<u64> = stream
        .iter()
        .filter_map(|e| e.payload["amount"].as_u64())
        .collect();
    let rising = amounts.windows(2).all(|w| w[0] < w[1]);
    println!(
        "2. stream: {} events, bids strictly rising: {rising}",
        stream.len()
    );

    let kafka = kafka();
    let (relay, _) = spawn_relay(&pool, &kafka)?;
    let (runner, stats) = spawn_projection(&pool, LeadingBid, &kafka, &prefix)?;
    let total = stream.len() as u64;
    wait_until(
        "the leading bid projection",
        Duration::from_secs(60),
        || async { Ok(stats.applied.load(Ordering::Relaxed) >= total) },
    )
    .await?;
    let (bidder, amount, bids, closed): (String, i64, i32, bool) = sqlx::query_as(
        "SELECT bidder, amount, bids, closed FROM auction_leading_bid WHERE auction_id = 'AUC-1'",
    )
    .fetch_one(&pool)
    .await?;
    let (leader, top) = auction.state.leading.clone().ok_or("no bid")?;
    println!("3. read model: {bidder} leads with {amount} after {bids} bids (closed: {closed})");
    let matches = bidder == leader
        && amount as u64 == top
        && bids as u64 == auction.state.bids
        && bids as u32 == accepted;
    println!("   equal to the aggregate: {matches}");
    runner.stop().await?;
    relay.stop().await?;
    if !(rising && matches) {
        return Err("the auction's invariants do not hold".into());
    }
    Ok(())
}
