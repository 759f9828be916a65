//! Orders: create, pay, cancel.
//!
//! `OrderCreated` is at version 2; version 1 had no currency and is still in
//! old streams and on the topic. A JSON upcaster adds the currency on read,
//! so the rest of the code only ever sees version 2.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tidings::{Aggregate, Event, UpcastError};

/// The events of an order.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "orders")]
pub enum OrderEvent {
    /// A customer placed an order.
    #[event(version = 2, upcast(from = 1, json = order_created_v1))]
    OrderCreated {
        /// The order's id (also the aggregate id).
        order_id: String,
        /// Who ordered.
        user_id: String,
        /// The total to pay.
        amount: f64,
        /// ISO 4217 currency of `amount`.
        currency: String,
    },
    /// The order was paid in full.
    PaymentProcessed {
        /// The payment provider's reference.
        payment_id: String,
        /// The amount paid.
        amount: f64,
    },
    /// The order was cancelled before payment.
    OrderCancelled {
        /// Why.
        reason: String,
    },
}

/// Version 1 of `OrderCreated` was priced in US dollars without saying so.
pub fn order_created_v1(mut payload: Value) -> Result<Value, UpcastError> {
    let object = payload
        .as_object_mut()
        .ok_or_else(|| UpcastError::new("OrderCreated v1 payload is not an object"))?;
    object.entry("currency").or_insert(json!("USD"));
    Ok(payload)
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// No order with this id yet.
    #[default]
    New,
    /// Created, awaiting payment.
    Created,
    /// Paid.
    Paid,
    /// Cancelled.
    Cancelled,
}

/// The order aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Where the order is.
    pub status: OrderStatus,
    /// Who ordered.
    pub user_id: String,
    /// The total to pay.
    pub amount: f64,
    /// The currency.
    pub currency: String,
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// Place the order.
    Create {
        /// The order's id.
        order_id: String,
        /// Who orders.
        user_id: String,
        /// The total.
        amount: f64,
        /// The currency.
        currency: String,
    },
    /// Record a payment.
    Pay {
        /// The provider's reference.
        payment_id: String,
        /// The amount paid.
        amount: f64,
    },
    /// Cancel an unpaid order.
    Cancel {
        /// Why.
        reason: String,
    },
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// `Create` on an existing order.
    #[error("the order already exists")]
    AlreadyExists,
    /// A command on an order that was never created.
    #[error("no such order")]
    NotFound,
    /// Amounts must be positive and finite.
    #[error("invalid amount {0}")]
    InvalidAmount(f64),
    /// A payment that does not match the order's total.
    #[error("payment of {paid} does not match the order total {expected}")]
    WrongAmount {
        /// The order's total.
        expected: f64,
        /// What was paid.
        paid: f64,
    },
    /// Paying or cancelling a paid order.
    #[error("the order is already paid")]
    AlreadyPaid,
    /// Paying or cancelling a cancelled order.
    #[error("the order is cancelled")]
    Cancelled,
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    const SNAPSHOT_EVERY: u64 = 100;
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match (self.status, command) {
            (
                OrderStatus::New,
                OrderCommand::Create {
                    order_id,
                    user_id,
                    amount,
                    currency,
                },
            ) => {
                if !(amount.is_finite() && amount > 0.0) {
                    return Err(OrderError::InvalidAmount(amount));
                }
                Ok(vec![OrderEvent::OrderCreated {
                    order_id,
                    user_id,
                    amount,
                    currency,
                }])
            }
            (_, OrderCommand::Create { .. }) => Err(OrderError::AlreadyExists),
            (OrderStatus::New, _) => Err(OrderError::NotFound),
            (OrderStatus::Paid, _) => Err(OrderError::AlreadyPaid),
            (OrderStatus::Cancelled, _) => Err(OrderError::Cancelled),
            (OrderStatus::Created, OrderCommand::Pay { payment_id, amount }) => {
                if amount != self.amount {
                    return Err(OrderError::WrongAmount {
                        expected: self.amount,
                        paid: amount,
                    });
                }
                Ok(vec![OrderEvent::PaymentProcessed { payment_id, amount }])
            }
            (OrderStatus::Created, OrderCommand::Cancel { reason }) => {
                Ok(vec![OrderEvent::OrderCancelled { reason }])
            }
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderCreated {
                user_id,
                amount,
                currency,
                ..
            } => {
                self.status = OrderStatus::Created;
                self.user_id.clone_from(user_id);
                self.amount = *amount;
                self.currency.clone_from(currency);
            }
            OrderEvent::PaymentProcessed { .. } => self.status = OrderStatus::Paid,
            OrderEvent::OrderCancelled { .. } => self.status = OrderStatus::Cancelled,
        }
    }
}
