//! Auctions: many bidders on one auction at once.
//!
//! Optimistic concurrency does the work: two bids decided on the same state
//! cannot both be appended, the loser is retried on the new state, so no bid
//! is lost and the stream's bids only ever go up. `LeadingBid` projects the
//! leading bid of each auction.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tidings::projection::{ApplyError, Batch, BatchError, Projection};
use tidings::{Aggregate, Envelope, Event};

/// The events of an auction.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "auctions")]
pub enum AuctionEvent {
    /// The auction opened.
    AuctionOpened {
        /// What is sold.
        item: String,
        /// The lowest acceptable bid.
        reserve: u64,
    },
    /// A bid above the leading one.
    BidSubmitted {
        /// Who bids.
        bidder: String,
        /// How much.
        amount: u64,
    },
    /// The auction closed.
    AuctionClosed {
        /// The winner, if any bid met the reserve.
        winner: Option<String>,
    },
}

/// An auction's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Auction {
    /// Open for bids.
    pub open: bool,
    /// Closed.
    pub closed: bool,
    /// The reserve.
    pub reserve: u64,
    /// The leading bid.
    pub leading: Option<(String, u64)>,
    /// Bids accepted.
    pub bids: u64,
}

/// What can be asked of an auction.
#[derive(Debug, Clone, PartialEq)]
pub enum AuctionCommand {
    /// Open it.
    Open {
        /// What is sold.
        item: String,
        /// The reserve.
        reserve: u64,
    },
    /// Bid.
    Bid {
        /// Who.
        bidder: String,
        /// How much.
        amount: u64,
    },
    /// Close it.
    Close,
}

/// Why an auction refused a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuctionError {
    /// Opening twice.
    #[error("the auction is already open")]
    AlreadyOpen,
    /// Bidding or closing when not open.
    #[error("the auction is not open")]
    NotOpen,
    /// A bid that does not beat the leading one.
    #[error("bid {amount} does not beat {leading}")]
    TooLow {
        /// The bid.
        amount: u64,
        /// The leading bid (or the reserve minus one).
        leading: u64,
    },
}

impl Aggregate for Auction {
    const TYPE: &'static str = "auction";
    type Event = AuctionEvent;
    type Command = AuctionCommand;
    type Error = AuctionError;

    fn handle(&self, command: AuctionCommand) -> Result<Vec<AuctionEvent>, AuctionError> {
        match command {
            AuctionCommand::Open { item, reserve } => {
                if self.open || self.closed {
                    return Err(AuctionError::AlreadyOpen);
                }
                Ok(vec![AuctionEvent::AuctionOpened { item, reserve }])
            }
            AuctionCommand::Bid { bidder, amount } => {
                if !self.open {
                    return Err(AuctionError::NotOpen);
                }
                let leading = self
                    .leading
                    .as_ref()
                    .map_or(self.reserve.saturating_sub(1), |(_, a)| *a);
                if amount <= leading {
                    return Err(AuctionError::TooLow { amount, leading });
                }
                Ok(vec![AuctionEvent::BidSubmitted { bidder, amount }])
            }
            AuctionCommand::Close => {
                if !self.open {
                    return Err(AuctionError::NotOpen);
                }
                Ok(vec![AuctionEvent::AuctionClosed {
                    winner: self.leading.as_ref().map(|(b, _)| b.clone()),
                }])
            }
        }
    }

    fn apply(&mut self, event: &AuctionEvent) {
        match event {
            AuctionEvent::AuctionOpened { reserve, .. } => {
                self.open = true;
                self.reserve = *reserve;
            }
            AuctionEvent::BidSubmitted { bidder, amount } => {
                self.leading = Some((bidder.clone(), *amount));
                self.bids += 1;
            }
            AuctionEvent::AuctionClosed { .. } => {
                self.open = false;
                self.closed = true;
            }
        }
    }
}

/// The leading bid of every auction, in `auction_leading_bid`.
#[derive(Debug, Clone, Default)]
pub struct LeadingBid;

impl LeadingBid {
    /// Creates the read model table if missing.
    pub async fn create_table(pool: &PgPool) -> tidings::Result<()> {
        tidings::projection::set_up_read_model(
            pool,
            "auction_leading_bid",
            "CREATE TABLE IF NOT EXISTS auction_leading_bid (
                auction_id TEXT PRIMARY KEY, bidder TEXT, amount BIGINT NOT NULL DEFAULT 0,
                bids INTEGER NOT NULL DEFAULT 0, closed BOOLEAN NOT NULL DEFAULT false)",
        )
        .await
    }
}

#[async_trait]
impl Projection for LeadingBid {
    type Event = AuctionEvent;

    fn name(&self) -> &str {
        "auction_leading_bid"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<AuctionEvent>,
    ) -> Result<(), ApplyError> {
        Ok(self.apply_batch(conn, &Batch::one(envelope)).await?)
    }

    /// Set-based: each auction's events folded (opened, the last bid, the
    /// number of bids, closed), then one upsert for the batch. Bids arrive
    /// in stream order, so the last one is the leader.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, AuctionEvent>,
    ) -> Result<(), BatchError> {
        let (mut ids, mut opened, mut bidders, mut amounts, mut bids, mut closed) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for stream in batch.by_stream() {
            let (mut open, mut leader, mut n, mut close) = (false, None, 0i32, false);
            for (index, envelope) in &stream.events {
                match &envelope.payload {
                    AuctionEvent::AuctionOpened { .. } if open => {
                        return Err(BatchError::permanent(
                            *index,
                            format!("auction {} opened twice", stream.aggregate_id),
                        ));
                    }
                    AuctionEvent::AuctionOpened { .. } => open = true,
                    AuctionEvent::BidSubmitted { bidder, amount } => {
                        leader = Some((bidder.as_str(), *amount as i64));
                        n += 1;
                    }
                    AuctionEvent::AuctionClosed { .. } => close = true,
                }
            }
            ids.push(stream.aggregate_id);
            opened.push(open);
            bidders.push(leader.map(|(b, _)| b));
            amounts.push(leader.map(|(_, a)| a));
            bids.push(n);
            closed.push(close);
        }
        // An auction opened here is inserted (a second opening breaks the
        // primary key, as one INSERT per event would); one opened before is
        // updated; one never opened is left alone, as an UPDATE would.
        sqlx::query(
            "WITH u AS (SELECT * FROM UNNEST($1::text[], $2::bool[], $3::text[], $4::bigint[], $5::int[], $6::bool[]) \
                 AS u(id, opened, bidder, amount, bids, closed)), \
             inserted AS (INSERT INTO auction_leading_bid (auction_id, bidder, amount, bids, closed) \
                 SELECT id, bidder, coalesce(amount, 0), bids, closed FROM u WHERE opened) \
             UPDATE auction_leading_bid AS a SET bidder = coalesce(u.bidder, a.bidder), \
                 amount = coalesce(u.amount, a.amount), bids = a.bids + u.bids, closed = a.closed OR u.closed \
             FROM u WHERE NOT u.opened AND a.auction_id = u.id",
        )
        .bind(&ids)
        .bind(&opened)
        .bind(&bidders)
        .bind(&amounts)
        .bind(&bids)
        .bind(&closed)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query("TRUNCATE auction_leading_bid")
            .execute(conn)
            .await?;
        Ok(())
    }
}
