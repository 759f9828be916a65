//! Given/when/then tests of the orders aggregate: no infrastructure.

use tidings::testing::given;
use tidings_examples::orders::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus};

fn created(amount: f64) -> OrderEvent {
    OrderEvent::OrderCreated {
        order_id: "ORD-1".into(),
        user_id: "USR-1".into(),
        amount,
        currency: "EUR".into(),
    }
}

#[test]
fn an_order_is_created_once() {
    let order = given::<Order>([])
        .when(OrderCommand::Create {
            order_id: "ORD-1".into(),
            user_id: "USR-1".into(),
            amount: 12.5,
            currency: "EUR".into(),
        })
        .then([created(12.5)]);
    assert_eq!(order.status, OrderStatus::Created);

    given::<Order>([created(12.5)])
        .when(OrderCommand::Create {
            order_id: "ORD-1".into(),
            user_id: "USR-2".into(),
            amount: 1.0,
            currency: "EUR".into(),
        })
        .then_error(OrderError::AlreadyExists);
}

#[test]
fn amounts_must_be_positive() {
    let error = given::<Order>([])
        .when(OrderCommand::Create {
            order_id: "ORD-1".into(),
            user_id: "USR-1".into(),
            amount: -1.0,
            currency: "EUR".into(),
        })
        .error();
    assert_eq!(error, OrderError::InvalidAmount(-1.0));
}

#[test]
fn payment_must_match_the_total() {
    given::<Order>([created(10.0)])
        .when(OrderCommand::Pay {
            payment_id: "P-1".into(),
            amount: 9.0,
        })
        .then_error(OrderError::WrongAmount {
            expected: 10.0,
            paid: 9.0,
        });
    let order = given::<Order>([created(10.0)])
        .when(OrderCommand::Pay {
            payment_id: "P-1".into(),
            amount: 10.0,
        })
        .then([OrderEvent::PaymentProcessed {
            payment_id: "P-1".into(),
            amount: 10.0,
        }]);
    assert_eq!(order.status, OrderStatus::Paid);
}

#[test]
fn a_paid_order_cannot_be_cancelled_or_paid_again() {
    let history = [
        created(10.0),
        OrderEvent::PaymentProcessed {
            payment_id: "P".into(),
            amount: 10.0,
        },
    ];
    given::<Order>(history.clone())
        .when(OrderCommand::Cancel {
            reason: "changed my mind".into(),
        })
        .then_error(OrderError::AlreadyPaid);
    given::<Order>(history)
        .when(OrderCommand::Pay {
            payment_id: "P2".into(),
            amount: 10.0,
        })
        .then_error(OrderError::AlreadyPaid);
}

#[test]
fn cancellation_is_final() {
    let order = given::<Order>([created(10.0)])
        .when(OrderCommand::Cancel {
            reason: "out of stock".into(),
        })
        .then([OrderEvent::OrderCancelled {
            reason: "out of stock".into(),
        }]);
    assert_eq!(order.status, OrderStatus::Cancelled);
    given::<Order>([
        created(10.0),
        OrderEvent::OrderCancelled { reason: "x".into() },
    ])
    .when(OrderCommand::Pay {
        payment_id: "P".into(),
        amount: 10.0,
    })
    .then_error(OrderError::Cancelled);
}

#[test]
fn commands_on_a_missing_order_are_refused() {
    given::<Order>([])
        .when(OrderCommand::Cancel { reason: "x".into() })
        .then_error(OrderError::NotFound);
}

mod auctions {
    use tidings::testing::given;
    use tidings_examples::auctions::{Auction, AuctionCommand, AuctionError, AuctionEvent};

    fn opened() -> AuctionEvent {
        AuctionEvent::AuctionOpened {
            item: "guitar".into(),
            reserve: 100,
        }
    }

    #[test]
    fn bids_must_beat_the_reserve_and_the_leader() {
        given::<Auction>([opened()])
            .when(AuctionCommand::Bid {
                bidder: "a".into(),
                amount: 99,
            })
            .then_error(AuctionError::TooLow {
                amount: 99,
                leading: 99,
            });
        let auction = given::<Auction>([
            opened(),
            AuctionEvent::BidSubmitted {
                bidder: "a".into(),
                amount: 120,
            },
        ])
        .when(AuctionCommand::Bid {
            bidder: "b".into(),
            amount: 121,
        })
        .then([AuctionEvent::BidSubmitted {
            bidder: "b".into(),
            amount: 121,
        }]);
        assert_eq!(auction.leading, Some(("b".into(), 121)));
    }

    #[test]
    fn a_closed_auction_takes_no_bid() {
        given::<Auction>([opened(), AuctionEvent::AuctionClosed { winner: None }])
            .when(AuctionCommand::Bid {
                bidder: "a".into(),
                amount: 500,
            })
            .then_error(AuctionError::NotOpen);
    }
}

// The harness itself: each check fails when what it checks does not hold
// (a harness that stopped comparing would leave every test above green).

fn create(amount: f64) -> OrderCommand {
    OrderCommand::Create {
        order_id: "ORD-1".into(),
        user_id: "USR-1".into(),
        amount,
        currency: "EUR".into(),
    }
}

#[test]
#[should_panic(expected = "the command produced other events than expected")]
fn then_fails_on_other_events() {
    given::<Order>([]).when(create(12.5)).then([created(99.0)]);
}

#[test]
#[should_panic(expected = "the command produced other events than expected")]
fn then_fails_on_fewer_events() {
    given::<Order>([]).when(create(12.5)).then([]);
}

#[test]
#[should_panic(expected = "the command was refused")]
fn then_fails_on_a_refusal() {
    given::<Order>([created(1.0)])
        .when(create(12.5))
        .then([created(12.5)]);
}

#[test]
#[should_panic(expected = "the command was refused with another error")]
fn then_error_fails_on_another_error() {
    given::<Order>([])
        .when(create(-1.0))
        .then_error(OrderError::AlreadyExists);
}

#[test]
#[should_panic(expected = "the command produced")]
fn then_error_fails_on_success() {
    given::<Order>([])
        .when(create(1.0))
        .then_error(OrderError::AlreadyExists);
}

#[test]
#[should_panic(expected = "expected an error, the command produced")]
fn error_fails_on_success() {
    given::<Order>([]).when(create(1.0)).error();
}
