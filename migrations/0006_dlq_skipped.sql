-- Dead-lettered events an operator chose to discard (`dlq skip`): kept with
-- who-knows-why for the record, so that the stream behind them moves on.
CREATE TABLE tidings_dlq_skipped (
    id              BIGINT PRIMARY KEY,
    projection      TEXT        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    sequence        BIGINT,
    topic           TEXT        NOT NULL,
    partition       INTEGER     NOT NULL,
    "offset"        BIGINT      NOT NULL,
    reason          TEXT        NOT NULL,
    message_key     TEXT,
    headers         JSONB       NOT NULL,
    value           BYTEA,
    parked_at       TIMESTAMPTZ NOT NULL,
    note            TEXT        NOT NULL,
    skipped_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
