-- The event store: one row per event, append-only.
-- Order within a stream is `sequence` (1, 2, 3, ... with no gaps);
-- `global_position` orders all events of the store by insertion.
CREATE TABLE tidings_events (
    global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    sequence        BIGINT      NOT NULL CHECK (sequence >= 1),
    event_type      TEXT        NOT NULL,
    event_version   INTEGER     NOT NULL CHECK (event_version >= 1),
    recorded_at     TIMESTAMPTZ NOT NULL,
    correlation_id  TEXT,
    causation_id    TEXT,
    metadata        JSONB       NOT NULL DEFAULT '{}'::jsonb,
    payload         JSONB       NOT NULL,
    -- Optimistic concurrency: two writers cannot both append the same sequence.
    CONSTRAINT tidings_events_stream_sequence UNIQUE (aggregate_type, aggregate_id, sequence)
);

-- The transactional outbox: rows written in the same transaction as the events,
-- claimed and deleted by the relay once the broker acknowledged them.
-- The envelope is stored as the exact bytes that go on the wire.
CREATE TABLE tidings_outbox (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lane           INTEGER     NOT NULL,
    topic          TEXT        NOT NULL,
    message_key    TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    sequence       BIGINT      NOT NULL,
    event_id       UUID        NOT NULL,
    headers        JSONB       NOT NULL,
    envelope       TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tidings_outbox_lane_id ON tidings_outbox (lane, id);

-- Snapshots: the latest state of a stream at a sequence, versioned by the
-- aggregate's snapshot version so that an incompatible one is ignored.
CREATE TABLE tidings_snapshots (
    aggregate_type   TEXT        NOT NULL,
    aggregate_id     TEXT        NOT NULL,
    sequence         BIGINT      NOT NULL,
    snapshot_version INTEGER     NOT NULL,
    state            JSONB       NOT NULL,
    taken_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Wake relays on commit: one notification per inserting statement (and
-- PostgreSQL folds identical ones within a transaction), never one per row.
CREATE FUNCTION tidings_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tidings_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER tidings_outbox_notify AFTER INSERT ON tidings_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tidings_outbox_notify();
