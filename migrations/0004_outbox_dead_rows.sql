-- Outbox rows refused for good (too large for the broker, not authorised,
-- an invalid topic, unreadable stored headers): the relay moves them here
-- with the reason, so one bad row does not hold up any other aggregate.
-- The later rows of the same aggregate stay in the outbox, held, until the
-- dead row is retried (moved back under its own id), so order holds.
CREATE TABLE tidings_outbox_dead (
    id             BIGINT PRIMARY KEY,
    lane           INTEGER     NOT NULL,
    topic          TEXT        NOT NULL,
    message_key    TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    sequence       BIGINT      NOT NULL,
    event_id       UUID        NOT NULL,
    event_type     TEXT,
    event_version  INTEGER,
    headers        JSONB,
    envelope       TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    reason         TEXT        NOT NULL,
    dead_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tidings_outbox_dead_stream ON tidings_outbox_dead (aggregate_type, aggregate_id);
